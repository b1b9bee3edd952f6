"""The prefix tree of state chains, and where a shared prefix may be cut without hurting tokens.

Every state value of a module is a path in one tree whose edges are *symbols*: one character of
constant text, a role marker ``("role.begin", role)`` / ``("role.end", role)``, or a dynamic value
``("dyn", function index, value name)`` for an op whose text is only known at run time (append,
gen, select, gen.chain, join), which no other state can share. ``start`` is the root; a fork's
results sit on their operand's node. Two states share a prefix exactly when their paths do.

The tree is path-compressed: a node's ``edge`` is a run of characters (or one marker), so a batch
of a thousand programs under one 2,000-character prompt costs a few string comparisons each, not
a dictionary step per character. A point of the tree is a ``Pos``: a node and a depth (symbols
from the root) within that node's edge. Splitting an edge keeps its lower part in the old node
object, so a ``Pos`` taken before a split still names the same point; ``resolve`` moves it up to
the node whose edge holds the depth, and ``build_state_tree`` hands out resolved positions only.

Cuts: a shared prefix is planned as its own state so the engine can prefill it once. A cut inside
a word would tokenize differently from the full text, so cuts are only placed where
``clean_cut`` holds: next to a role marker or dynamic value, after a newline, or before a space.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmir_lang.ir import Module
from llmir_lang.ir import ops as K

Symbol = str | tuple[str, ...] | tuple[str, int, str]


@dataclass(eq=False, slots=True)
class Node:
    """A node of the compressed tree: the path from the root ends with ``edge``, at ``depth``
    symbols. ``edge`` is a run of text (``str``) or one marker symbol (a tuple)."""

    parent: Node | None
    edge: str | tuple
    depth: int
    children: dict[Symbol, Node] = field(default_factory=dict)

    @property
    def start(self) -> int:
        """The depth just above this node's edge (its parent's depth)."""
        return self.depth - (len(self.edge) if isinstance(self.edge, str) else 1)


Pos = tuple[Node, int]  # a point of the tree: (node, depth), start < depth <= node.depth or the root


def resolve(pos: Pos) -> Pos:
    """The node whose edge holds ``pos``'s depth (edges may have been split since it was taken)."""
    node, d = pos
    while node.parent is not None and d <= node.start:
        node = node.parent
    return node, d


def _common_len(a: str, b: str) -> int:
    """Length of the common prefix of ``a`` and ``b`` (C-speed comparisons, log many)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _split(node: Node, d: int) -> Node:
    """Cut ``node``'s edge at depth ``d`` (inside it); the new upper part is returned, the old
    object keeps the lower part, its children and every ``Pos`` that named it."""
    assert isinstance(node.edge, str) and node.parent is not None
    k = d - node.start
    upper = Node(node.parent, node.edge[:k], d)
    node.parent.children[node.edge[0]] = upper
    node.edge, node.parent = node.edge[k:], upper
    upper.children[node.edge[0]] = node
    return upper


def extend_text(pos: Pos, text: str) -> Pos:
    """The point reached from ``pos`` by the characters of ``text``, creating what is missing."""
    node, d = resolve(pos)
    i = 0
    while i < len(text):
        if d < node.depth:  # inside a text edge: follow it as far as the text agrees
            off = d - node.start
            assert isinstance(node.edge, str)
            m = _common_len(node.edge[off:], text[i:])
            d, i = d + m, i + m
            if i == len(text) or d == node.depth:
                continue
            node = _split(node, d)  # the text leaves the edge here
        child = node.children.get(text[i])
        if child is None:
            child = Node(node, text[i:], d + len(text) - i)
            node.children[text[i]] = child
            return child, child.depth
        node = child
    return node, d


def extend_symbol(pos: Pos, symbol: tuple) -> Pos:
    """The point reached from ``pos`` by one marker ``symbol``."""
    node, d = resolve(pos)
    if d < node.depth:
        node = _split(node, d)
    child = node.children.get(symbol)
    if child is None:
        child = Node(node, symbol, d + 1)
        node.children[symbol] = child
    return child, d + 1


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


def end_is_clean(node: Node) -> bool:
    """True if a cut right after ``node``'s edge is clean for every way the tree continues."""
    before = node.edge[-1] if isinstance(node.edge, str) else node.edge
    return all(clean_cut(before, s) for s in node.children)


@dataclass(slots=True)
class StateTree:
    """The prefix tree of a module: ``node_of[(function index, value name)]`` is every state's
    resolved position."""

    root: Node
    node_of: dict[tuple[int, str], Pos]

    def release(self) -> None:
        """Break the tree's parent/child cycles, so reference counting frees it at once instead of
        leaving a few thousand nodes for the cyclic collector (call when done with it)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            node.children = {}
            node.parent = None
        self.node_of = {}


def build_state_tree(module: Module) -> StateTree:
    root = Node(None, "", 0)
    node_of: dict[tuple[int, str], Pos] = {}
    for fi, fn in enumerate(module.functions):
        for op in fn.ops:
            if op.kind == K.START:
                node_of[(fi, op.result.name)] = (root, 0)
                continue
            if op.kind in (K.VAR, K.RETURN):
                continue
            base = node_of[(fi, op.state.name)]
            if op.kind == K.FORK:
                for r in op.results:
                    node_of[(fi, r.name)] = base
            elif op.kind == K.TEXT:
                node_of[(fi, op.result.name)] = extend_text(base, op.label or "")
            elif op.kind in (K.ROLE_BEGIN, K.ROLE_END):
                node_of[(fi, op.result.name)] = extend_symbol(base, (op.kind, op.label or ""))
            else:
                node_of[(fi, op.result.name)] = extend_symbol(base, ("dyn", fi, op.result.name))
    for key, pos in node_of.items():
        node_of[key] = resolve(pos)
    return StateTree(root, node_of)


def shared_nodes(tree: StateTree, min_length: int = 1) -> set[Pos]:
    """The points to plan as shared prefixes: each branching node of the tree, moved back to the
    nearest clean cut; the root and points shallower than ``min_length`` symbols are left out."""
    out: set[Pos] = set()
    stack = [tree.root]
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if len(node.children) < 2:
            continue
        cut = _clean_at_or_above(node)
        if cut[1] >= max(min_length, 1):
            out.add(cut)
    return out


def _clean_at_or_above(node: Node) -> Pos:
    """The deepest clean point at or above the end of ``node``: its end if a cut there is clean
    for every child, else the last clean cut inside its edge (found with string searches, not a
    step per character: a long run of text without spaces, such as minified JSON, costs nothing),
    else the same question one node up; the root at worst."""
    while node.parent is not None:
        if end_is_clean(node):
            return node, node.depth
        if isinstance(node.edge, str):
            k = _last_clean(node.edge, len(node.edge) - 1)
            if k > 0:
                return node, node.start + k
        node = node.parent
    return node, 0


def _last_clean(edge: str, last: int) -> int:
    """The largest ``k`` in ``[1, last]`` where ``clean_cut(edge[k - 1], edge[k])``, or -1."""
    best = -1
    for ch in " \t":  # before a space or tab that follows no whitespace
        k = edge.rfind(ch, 1, last + 1)
        while k > 0 and edge[k - 1].isspace():
            k = edge.rfind(ch, 1, k)
        best = max(best, k)
    p = edge.rfind("\n", 0, last)  # after a newline that is not followed by another
    while p >= 0 and edge[p + 1] == "\n":
        p = edge.rfind("\n", 0, p)
    if p >= 0:
        best = max(best, p + 1)
    return best


def by_node(points: set[Pos]) -> dict[Node, list[int]]:
    """``points`` grouped by node: each node's depths, ascending."""
    out: dict[Node, list[int]] = {}
    for node, d in points:
        out.setdefault(node, []).append(d)
    for depths in out.values():
        depths.sort()
    return out


def shared_inside(start: Pos, end: Pos, shared: dict[Node, list[int]]) -> list[Pos]:
    """The shared points (``by_node`` of them) strictly between ``start`` and ``end`` (resolved
    positions, ``end`` on a path down from ``start``), shallowest first."""
    found: list[Pos] = []
    node: Node | None = end[0]
    while node is not None and node.depth > start[1]:
        found.extend((node, d) for d in reversed(shared.get(node, ())) if start[1] < d < end[1])
        node = node.parent
    found.reverse()
    return found
