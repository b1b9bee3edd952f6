"""``select-trie``: score all choices of a ``select`` in one batched extend, sharing prefixes.

For each ``select`` the pass builds the trie of its choices, cut only at clean token cuts
(``prefix_tree.clean_cut``: before a space, after a newline), and annotates the op with:

- ``score = "batched"``: all choices are scored in one extend over the shared prompt (the
  select's state), one row per trie node, not one request per choice.
- ``trie = [{parent = P, text = T}, ...]``: the trie nodes in preorder; ``parent`` is the index
  of the parent node (-1: the node hangs off the prompt) and ``text`` the choice text it adds.
- ``trie_ends = [N0, N1, ...]``: for choice ``i``, the node where it ends; the choice's text is
  the concatenation of ``text`` from the root down to that node.

Lowering contract: tokenize each choice after the prompt, put one sequence per trie node into a
single extend batch whose prefix is the prompt (cached once), and let node ``n`` reuse the KV of
its parent; the score of choice ``i`` is the sum (or the normalized mean, per ``choices_method``)
of the token logprobs along its path. Choices whose texts share a node share its KV.
"""

from __future__ import annotations

from dataclasses import replace

from llmir_lang.ir import Module, Op
from llmir_lang.ir import ops as K
from llmir_lang.ir.attrs import AttrValue
from llmir_lang.optimizer.pass_manager import register_pass
from llmir_lang.optimizer.prefix_tree import clean_cut


@register_pass("select-trie")
def select_trie(module: Module) -> Module:
    """Annotate each select with the trie of its choices, to be scored in one batched extend."""
    return Module(tuple(replace(fn, ops=tuple(_annotate(op) for op in fn.ops)) for fn in module.functions))


def _annotate(op: Op) -> Op:
    if op.kind != K.SELECT:
        return op
    choices = op.attrs["choices"]
    assert isinstance(choices, tuple)
    nodes, ends = choice_trie([str(c) for c in choices])
    trie: tuple[AttrValue, ...] = tuple({"parent": p, "text": t} for p, t in nodes)
    return replace(op, attrs={**op.attrs, "score": "batched", "trie": trie, "trie_ends": tuple(ends)})


def choice_trie(choices: list[str]) -> tuple[list[tuple[int, str]], list[int]]:
    """The trie of ``choices`` cut at clean cuts: ``(nodes, ends)`` with nodes ``(parent, text)``
    in preorder and ``ends[i]`` the node where choice ``i`` ends."""
    nodes: list[tuple[int, str]] = []
    ends = [-1] * len(choices)
    _build(nodes, ends, [(i, c) for i, c in enumerate(choices)], -1)
    return nodes, ends


def _build(nodes: list[tuple[int, str]], ends: list[int], items: list[tuple[int, str]], parent: int) -> None:
    pool = list(items)
    while pool:
        first, text = pool.pop(0)
        members = [(i, s) for i, s in pool if _cut(text, s) > 0]
        depth = _common_cut(text, [s for _, s in members]) if members else 0
        if depth == 0:
            nodes.append((parent, text))
            ends[first] = len(nodes) - 1
            continue
        pool = [(i, s) for i, s in pool if (i, s) not in members]
        nodes.append((parent, text[:depth]))
        here = len(nodes) - 1
        rest: list[tuple[int, str]] = []
        for i, s in [(first, text), *members]:
            if len(s) == depth:
                ends[i] = here
            else:
                rest.append((i, s[depth:]))
        _build(nodes, ends, rest, here)


def _clean_at(s: str, k: int) -> bool:
    return 0 < k and (k == len(s) or clean_cut(s[k - 1], s[k]))


def _cut(a: str, b: str) -> int:
    """The longest common prefix length of ``a`` and ``b`` that is a clean cut in both (0: none)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n > 0 and not (_clean_at(a, n) and _clean_at(b, n)):
        n -= 1
    return n


def _common_cut(text: str, others: list[str]) -> int:
    depth = min(_cut(text, s) for s in others)
    while depth > 0 and not all(_clean_at(s, depth) for s in [text, *others]):
        depth -= 1
    return depth
