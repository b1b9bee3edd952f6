"""``fork-join``: make every fork explicit and group the branches of each fork.

1. A state with two or more extending users (text, role, append, gen, select, gen.chain) is an
   implicit fork. The pass inserts ``%b0, %b1, ... = fork %s`` right after ``%s`` is defined and
   gives each user its own branch, in body order. ``var`` reads, ``return`` and a join that
   continues ``%s`` keep using ``%s``.
2. Every fork gets ``group = "gN"`` (numbered in program order across the module), and every op
   that consumes one of its results as its state (the head of a branch) gets ``branch_of = "gN"``.

Interpreter contract for ``group = "gN"`` on a fork: prefill the forked state once (one extend
with no generation, kept in the radix cache until every branch head has been admitted), then
submit the heads of all branches of ``gN`` together, in the same scheduler step, so their decode
steps batch. ``branch_of`` marks those heads. A join waits for its branch states as usual.
Grouping is a scheduling hint: it changes no output.
"""

from __future__ import annotations

from dataclasses import replace

from llmir_lang.ir import Module, Op, Value
from llmir_lang.ir import ops as K
from llmir_lang.ir.module import Function, fresh_namer
from llmir_lang.optimizer.pass_manager import register_pass

_GROUP_KEYS = ("group", "branch_of")


@register_pass("fork-join")
def fork_join(module: Module) -> Module:
    """Make implicit forks explicit; group each fork's branches to be scheduled together."""
    functions = [_explicit_forks(fn) for fn in module.functions]
    counter = 0
    out: list[Function] = []
    for fn in functions:
        group_of: dict[str, str] = {}  # fork result name -> group id
        ops: list[Op] = []
        for op in fn.ops:
            attrs = {k: v for k, v in op.attrs.items() if k not in _GROUP_KEYS}
            if op.operands and op.state.name in group_of and (op.extends or op.kind == K.FORK):
                attrs["branch_of"] = group_of[op.state.name]
            if op.kind == K.FORK:
                group = f"g{counter}"
                counter += 1
                attrs["group"] = group
                group_of.update((r.name, group) for r in op.results)
            ops.append(replace(op, attrs=attrs) if attrs != op.attrs else op)
        out.append(replace(fn, ops=tuple(ops)))
    return Module(tuple(out))


def _explicit_forks(fn: Function) -> Function:
    extending_users: dict[str, list[int]] = {}
    for i, op in enumerate(fn.ops):
        if op.extends:
            extending_users.setdefault(op.state.name, []).append(i)
    forked = {name: users for name, users in extending_users.items() if len(users) >= 2}
    if not forked:
        return fn
    fresh = fresh_namer(fn.value_names(), "b")
    branch_for: dict[int, Value] = {}  # op index -> the branch value it now consumes
    forks_after: dict[str, Op] = {}
    for name, users in forked.items():
        state = fn.ops[users[0]].state
        branches = tuple(Value(fresh(), state.type) for _ in users)
        forks_after[name] = Op(K.FORK, branches, (state,))
        branch_for.update(zip(users, branches))
    ops: list[Op] = []
    for i, op in enumerate(fn.ops):
        if i in branch_for:
            op = replace(op, operands=(branch_for[i], *op.operands[1:]))
        ops.append(op)
        for r in op.results:
            if r.name in forks_after:
                ops.append(forks_after[r.name])
    return replace(fn, ops=tuple(ops))
