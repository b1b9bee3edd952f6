"""``select-trie``: score all choices of a ``select`` in one batched extend, sharing prefixes.

For each ``select`` the pass builds the trie of its choices, cut only at clean token cuts
(``prefix_tree.clean_cut``: before a space, after a newline), and annotates the op with:

- ``score = "batched"``: all choices are scored in one extend over the shared prompt (the
  select's state), one row per trie node, not one request per choice.
- ``trie = [{parent = P, text = T}, ...]``: the trie nodes in preorder; ``parent`` is the index
  of the parent node (-1: the node hangs off the prompt) and ``text`` the choice text it adds.
- ``trie_ends = [N0, N1, ...]``: for choice ``i``, the node where it ends; the choice's text is
  the concatenation of ``text`` from the root down to that node. The trie is over ``choices``,
  which are distinct; a program's repeats (``choices_given``) only shape the meta info.

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
    in preorder and ``ends[i]`` the node where choice ``i`` ends.

    At each node, the choices below it are grouped by their first word (the text up to their
    first clean cut), in order of first appearance: two texts share a clean-cut prefix exactly
    when their first words are equal (the cuts before the end of a common prefix are the same in
    both). A group of one is a leaf; a group of several gets a node for their longest common
    clean-cut prefix, and its members continue below it. The walk keeps its own stack: choices
    nested a thousand deep ("a", "a b", "a b c", ...) must not hit Python's recursion limit, and
    grouping by word is linear where comparing each choice with every other was quadratic."""
    nodes: list[tuple[int, str]] = []
    ends = [-1] * len(choices)
    # items are (choice index, offset): the choice's text from the offset on, never sliced (a
    # choice nested under a thousand others would be copied once per level)
    stack = [(iter(_groups(choices, [(i, 0) for i in range(len(choices))])), -1)]
    while stack:
        groups, parent = stack[-1]
        group = next(groups, None)
        if group is None:
            stack.pop()
            continue
        first, off = group[0]
        text = choices[first]
        if len(group) == 1:
            nodes.append((parent, text[off:]))
            ends[first] = len(nodes) - 1
            continue
        depth = min(_cut(text, off, choices[i], o) for i, o in group[1:])
        nodes.append((parent, text[off : off + depth]))
        here = len(nodes) - 1
        rest: list[tuple[int, int]] = []
        for i, o in group:
            if len(choices[i]) - o == depth:
                ends[i] = here
            else:
                rest.append((i, o + depth))
        if rest:
            stack.append((iter(_groups(choices, rest)), here))
    return nodes, ends


def _groups(choices: list[str], items: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """``items`` grouped by first word, groups in order of their first item."""
    out: dict[str, list[tuple[int, int]]] = {}
    for i, o in items:
        s = choices[i]
        out.setdefault(s[o : _first_cut(s, o)], []).append((i, o))
    return list(out.values())


def _first_cut(s: str, off: int) -> int:
    """The smallest clean cut of ``s`` after ``off + 1`` (``len(s)`` at most)."""
    k = off + 1
    while k < len(s) and not clean_cut(s[k - 1], s[k]):
        k += 1
    return k


def _clean_at(s: str, k: int) -> bool:
    return k == len(s) or clean_cut(s[k - 1], s[k])


def _cut(a: str, oa: int, b: str, ob: int) -> int:
    """The longest common prefix length of ``a[oa:]`` and ``b[ob:]`` that is a clean cut in both
    (0: none)."""
    n = min(len(a) - oa, len(b) - ob)
    if a[oa : oa + n] != b[ob : ob + n]:
        lo, hi = 0, n  # equal for lo characters, not for hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if a[oa + lo : oa + mid] == b[ob + lo : ob + mid]:
                lo = mid
            else:
                hi = mid
        n = lo
    while n > 0 and not (_clean_at(a, oa + n) and _clean_at(b, ob + n)):
        n -= 1
    return n
