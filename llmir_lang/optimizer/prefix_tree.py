"""The prefix tree of state chains, and where a shared prefix may be cut without hurting tokens.

Every state value of a module is a path in one tree whose edges are *symbols*: one character of
constant text, a role marker ``("role.begin", role)`` / ``("role.end", role)``, or a dynamic value
``("dyn", function index, value name)`` for an op whose text is only known at run time (append,
gen, select, gen.chain, join), which no other state can share. ``start`` is the root; a fork's
results sit on their operand's node. Two states share a prefix exactly when their paths do.

Cuts: a shared prefix is planned as its own state so the engine can prefill it once. A cut inside
a word would tokenize differently from the full text, so cuts are only placed where
``clean_cut`` holds: next to a role marker or dynamic value, after a newline, or before a space.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from llmir_lang.ir import Module
from llmir_lang.ir import ops as K

Symbol = str | tuple[str, ...] | tuple[str, int, str]


@dataclass(eq=False, slots=True)
class TrieNode:
    """A node of the prefix tree: the state reached by the symbols from the root to it."""

    parent: TrieNode | None
    symbol: Symbol | None
    depth: int
    children: dict[Symbol, TrieNode] = field(default_factory=dict)

    def child(self, symbol: Symbol) -> TrieNode:
        node = self.children.get(symbol)
        if node is None:
            node = TrieNode(self, symbol, self.depth + 1)
            self.children[symbol] = node
        return node

    def walk(self, symbols: Iterable[Symbol]) -> list[TrieNode]:
        """The nodes reached after each of ``symbols`` in turn, creating missing ones."""
        out: list[TrieNode] = []
        node = self
        for s in symbols:
            node = node.child(s)
            out.append(node)
        return out


def clean_cut(before: Symbol | None, after: Symbol | None) -> bool:
    """True if text may be cut between the symbols ``before`` and ``after`` without splitting a
    token of any common tokenizer (BPE and SentencePiece both attach a space to the next word)."""
    if before is None or after is None:
        return True
    if not isinstance(before, str) or not isinstance(after, str):
        return True
    if before == "\n":
        return after != "\n"
    return after in " \t" and not before.isspace()


def node_is_clean(node: TrieNode) -> bool:
    """True if a cut right after ``node`` is clean for every way the tree continues from it."""
    return all(clean_cut(node.symbol, s) for s in node.children)


@dataclass(slots=True)
class StateTree:
    """The prefix tree of a module: ``node_of[(function index, value name)]`` for every state."""

    root: TrieNode
    node_of: dict[tuple[int, str], TrieNode]


def build_state_tree(module: Module) -> StateTree:
    root = TrieNode(None, None, 0)
    node_of: dict[tuple[int, str], TrieNode] = {}
    for fi, fn in enumerate(module.functions):
        for op in fn.ops:
            if op.kind == K.START:
                node_of[(fi, op.result.name)] = root
                continue
            if op.kind in (K.VAR, K.RETURN):
                continue
            base = node_of[(fi, op.state.name)]
            if op.kind == K.FORK:
                for r in op.results:
                    node_of[(fi, r.name)] = base
            elif op.kind == K.TEXT:
                path = base.walk(op.label or "")
                node_of[(fi, op.result.name)] = path[-1] if path else base
            elif op.kind in (K.ROLE_BEGIN, K.ROLE_END):
                node_of[(fi, op.result.name)] = base.child((op.kind, op.label or ""))
            else:
                node_of[(fi, op.result.name)] = base.child(("dyn", fi, op.result.name))
    return StateTree(root, node_of)


def shared_nodes(tree: StateTree, min_length: int = 1) -> set[TrieNode]:
    """The nodes to plan as shared prefixes: each branching node of the tree, moved back to the
    nearest clean cut; the root and nodes shallower than ``min_length`` symbols are left out."""
    out: set[TrieNode] = set()
    stack = [tree.root]
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if len(node.children) < 2:
            continue
        cut: TrieNode | None = node
        while cut is not None and cut.depth > 0 and not node_is_clean(cut):
            cut = cut.parent
        if cut is not None and cut.depth >= max(min_length, 1):
            out.add(cut)
    return out
