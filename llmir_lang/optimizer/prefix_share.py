"""``prefix-share``: plan every prefix shared by several state chains to be prefilled once.

Over all functions of the module (the programs of a ``run_batch``) and all branches of every fork,
the pass builds the prefix tree of state chains (``prefix_tree``) and picks the shared nodes:
each point where chains diverge, moved back to a clean token cut. Where a shared node falls inside
a ``text`` op, the op is split in two at that point, so that every shared node is a state value
(common-subexpression elimination over state chains, made visible). It then annotates:

- ``pin = "pN"`` on every op whose result is shared node ``pN`` (one op per occurrence: the same
  node occurs once in each program, or in each branch, that reaches it).
- ``pin_users = K`` on the same ops: the number of extending ops (text, role, append, gen,
  select, gen.chain), over the whole module, that consume an occurrence of ``pN``, looking
  through forks. ``var``, ``return`` and ``join`` need no KV of their own and are not users.

Interpreter contract: the first time any chain reaches an op annotated ``pin = "pN"``, prefill that
state's text once (an extend with no generation) and pin it in the radix cache; every later
occurrence finds it there. Each time a user of ``pN`` finishes (its request is done), count it;
after ``pin_users`` of them, unpin. Pins nest: a deeper shared node extends a shallower one.
Pinning is a hint for speed: ignoring it changes no output.

Option ``min_length`` (default 1): do not plan nodes shallower than this many symbols.
"""

from __future__ import annotations

from dataclasses import replace

from llmir_lang.ir import Module, Op, Value
from llmir_lang.ir import ops as K
from llmir_lang.ir.module import Function, fork_transparent_users, fresh_namer
from llmir_lang.optimizer.pass_manager import register_pass
from llmir_lang.optimizer.prefix_tree import (
    Node,
    Pos,
    StateTree,
    build_state_tree,
    by_node,
    shared_inside,
    shared_nodes,
)

_PIN_KEYS = ("pin", "pin_users")


@register_pass("prefix-share")
def prefix_share(module: Module, *, min_length: int = 1) -> Module:
    """Plan shared prefixes (batch and fork) to be prefilled once and pinned until their last user."""
    module = Module(
        tuple(replace(fn, ops=tuple(_strip_pins(op) for op in fn.ops)) for fn in module.functions)
    )
    tree = build_state_tree(module)
    try:
        return _plan(module, tree, min_length)
    finally:
        tree.release()


def _plan(module: Module, tree: StateTree, min_length: int) -> Module:
    shared = shared_nodes(tree, min_length)
    if not shared:
        return module
    grouped = by_node(shared)
    functions: list[Function] = []
    for fi, fn in enumerate(module.functions):
        functions.append(_split_at_shared(fi, fn, tree.node_of, grouped))
    # Name pins in program order, then count each pin's users over every occurrence.
    pin_ids: dict[Pos, str] = {}
    annotated: list[list[Op]] = []
    for fi, fn in enumerate(functions):
        ops: list[Op] = []
        for op in fn.ops:
            node = tree.node_of.get((fi, op.results[0].name)) if op.results and op.kind != K.FORK else None
            if node in shared:
                assert node is not None
                pin = pin_ids.setdefault(node, f"p{len(pin_ids)}")
                op = replace(op, attrs={**op.attrs, "pin": pin})
            ops.append(op)
        annotated.append(ops)
    users: dict[str, int] = {}
    for fi, fn in enumerate(functions):
        consumers = fork_transparent_users(replace(fn, ops=tuple(annotated[fi])))
        for op in annotated[fi]:
            pin = op.attrs.get("pin")
            if isinstance(pin, str):
                count = sum(1 for u in consumers.get(op.result.name, []) if u.extends)
                users[pin] = users.get(pin, 0) + count
    out: list[Function] = []
    for fn, ops in zip(functions, annotated):
        final = [
            replace(op, attrs={**op.attrs, "pin_users": users[op.attrs["pin"]]}) if "pin" in op.attrs else op
            for op in ops
        ]
        out.append(replace(fn, ops=tuple(final)))
    return Module(tuple(out))


def _strip_pins(op: Op) -> Op:
    if any(k in op.attrs for k in _PIN_KEYS):
        return replace(op, attrs={k: v for k, v in op.attrs.items() if k not in _PIN_KEYS})
    return op


def _split_at_shared(
    fi: int, fn: Function, node_of: dict[tuple[int, str], Pos], shared: dict[Node, list[int]]
) -> Function:
    """Split each text op at every shared point strictly inside it; record points of new values."""
    fresh = fresh_namer(fn.value_names(), "s")
    ops: list[Op] = []
    for op in fn.ops:
        if op.kind != K.TEXT or len(op.label or "") < 2:
            ops.append(op)
            continue
        text = op.label or ""
        base = node_of[(fi, op.state.name)]
        cuts = shared_inside(base, node_of[(fi, op.result.name)], shared)
        if not cuts:
            ops.append(op)
            continue
        # The first piece heads the op's chain, so it keeps the op's annotations (a branch_of).
        state, start, attrs = op.state, 0, dict(op.attrs)
        for cut in cuts:
            k = cut[1] - base[1]
            piece = Value(fresh(), op.result.type)
            node_of[(fi, piece.name)] = cut
            ops.append(Op(K.TEXT, (piece,), (state,), text[start:k], attrs))
            state, start, attrs = piece, k, {}
        ops.append(replace(op, operands=(state,), label=text[start:], attrs={}))
    return replace(fn, ops=tuple(ops))
