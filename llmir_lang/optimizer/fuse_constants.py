"""``fuse-constants``: run ``gen -> constant text -> gen -> ...`` within one state as one request.

A chain is a ``gen``, then one or more times: any number of ``text`` ops and a ``gen``, where
every intermediate state has exactly one use (the next op of the chain: no ``var`` read, fork,
join or return of it) and the ops after the first carry no annotations except the last one's
``pin``, and no gen after the first asks for its prompt's logprobs (``logprob_start_len``: the
engine reports those for a request's prompt, which a later gen of a chain is not). A gen with a
``reasoning`` format ends a chain: the state after it holds its answer, not the text it generated,
so what follows is no continuation of the request. A chain of two or more gens becomes one op at
the place of its first gen::

    %9 = gen.chain %4 {segments = [{gen = "a", max_tokens = 8}, {text = "\\nB: "}, {gen = "b"}]}

``segments`` lists, in order, each gen (its name under ``gen`` and its sampling parameters and
constraint) and each run of constant text (merged, non-empty). The result is the last gen's state;
the op defines every gen's variable. The first gen's annotations (``branch_of``) and the last's
(``pin``) move to the chain op, and every ``pin_users`` is counted again (a chain is one model
call).

Interpreter / lowering contract: submit the chain as ONE engine request. Run each gen segment as
usual (its own sampling parameters, stop conditions and constraint); when it finishes, append the
next text segment's tokens as forced tokens (one extend, no return to Python, no new request) and
go on with the next gen. The variables get the texts each gen produced, exactly as the unfused ops
would: fusion changes no output, only the number of requests. Run ``canonicalize`` first so role
markers are text and adjacent text is merged.
"""

from __future__ import annotations

from dataclasses import replace

from llmir_lang.ir import Module, Op, annotations_of, without_annotations
from llmir_lang.ir import ops as K
from llmir_lang.ir.attrs import AttrValue
from llmir_lang.ir.module import Function
from llmir_lang.optimizer.pass_manager import register_pass
from llmir_lang.optimizer.prefix_share import recount_pin_users


@register_pass("fuse-constants")
def fuse_constants(module: Module) -> Module:
    """Fuse gen -> constant text -> gen chains into one gen.chain op (one engine request)."""
    fused = Module(tuple(_fuse_function(fn) for fn in module.functions))
    return recount_pin_users(fused) if fused != module else module  # a chain is one call


def _fuse_function(fn: Function) -> Function:
    uses: dict[str, list[int]] = {}
    for i, op in enumerate(fn.ops):
        for v in op.operands:
            uses.setdefault(v.name, []).append(i)
    consumed: set[int] = set()
    replacement: dict[int, Op] = {}
    for i, op in enumerate(fn.ops):
        if op.kind != K.GEN or i in consumed:
            continue
        chain = _chain_from(fn, i, uses)
        if sum(1 for j in chain if fn.ops[j].kind == K.GEN) < 2:
            continue
        consumed.update(chain)
        replacement[i] = _chain_op([fn.ops[j] for j in chain])
    if not replacement:
        return fn
    ops = [replacement.get(i, op) for i, op in enumerate(fn.ops) if i in replacement or i not in consumed]
    return replace(fn, ops=tuple(ops))


def _chain_from(fn: Function, head: int, uses: dict[str, list[int]]) -> list[int]:
    """Indices of the longest chain starting at gen ``head`` and ending with a gen."""
    chain = [head]
    best = 1  # the chain up to its last gen is chain[:best] (not a copy per gen: quadratic)
    cur = head
    while True:
        if "reasoning" in fn.ops[cur].attrs:
            return chain[:best]  # its state holds the answer split off its text (module docstring)
        users = uses.get(fn.ops[cur].result.name, [])
        if len(users) != 1:
            return chain[:best]
        nxt = users[0]
        op = fn.ops[nxt]
        if op.kind not in (K.TEXT, K.GEN) or op.operands[0] != fn.ops[cur].result:
            return chain[:best]
        annotations = set(annotations_of(op.attrs))
        if annotations - ({"pin", "pin_users"} if op.kind == K.GEN else set()):
            return chain[:best]
        if op.kind == K.GEN and "logprob_start_len" in op.attrs:
            return chain[:best]  # its prompt's logprobs: it must start a request (module docstring)
        chain.append(nxt)
        cur = nxt
        if op.kind == K.GEN:
            best = len(chain)
            if annotations:  # a pinned gen's state is shared: the chain must end here
                return chain


def _chain_op(ops: list[Op]) -> Op:
    segments: list[AttrValue] = []
    pending: list[str] = []  # the text ops since the last gen, joined once
    for op in ops:
        if op.kind == K.TEXT:
            pending.append(op.label or "")
            continue
        text = "".join(pending)
        if text:
            segments.append({"text": text})
        pending = []
        segments.append({"gen": op.label or "", **without_annotations(op.attrs)})
    head, last = ops[0], ops[-1]
    attrs = {"segments": tuple(segments), **annotations_of(head.attrs), **annotations_of(last.attrs)}
    return Op(K.GEN_CHAIN, last.results, head.operands, None, attrs)
