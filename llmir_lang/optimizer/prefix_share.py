"""``prefix-share``: plan every prefix shared by several state chains to be prefilled once.

Over all functions of the module (the programs of a ``run_batch``) and all branches of every fork,
the pass builds the prefix tree of state chains (``prefix_tree``) and picks the shared nodes:
each point where chains diverge, moved back to a clean token cut. Where a shared node falls inside
a ``text`` op, the op is split in two at that point, so that every shared node is a state value
(common-subexpression elimination over state chains, made visible). It then annotates:

- ``pin = "pN"`` on every op whose result is shared node ``pN`` (one op per occurrence: the same
  node occurs once in each program, or in each branch, that reaches it).
- ``pin_users = K`` on the same ops: the number of model calls (gen, gen.chain, select), over the
  whole module, whose prompt holds an occurrence of ``pN``: every call below it in its chain,
  through text, roles, forks and deeper pinned nodes. Constant text after ``pN`` sends no request
  of its own, so it is no user (counting it once unpinned a prefix before its prefill).

Interpreter contract: the first time any chain reaches an op annotated ``pin = "pN"``, prefill that
state's text once (an extend with no generation) and pin it in the radix cache; every later
occurrence finds it there. Each time a call whose prompt holds ``pN`` finishes (or will never run),
count it; after ``pin_users`` of them, unpin. Pins nest: a deeper shared node extends a shallower
one. Pinning is a hint for speed: ignoring it changes no output.

Option ``min_length`` (default 1): do not plan nodes shallower than this many symbols.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from llmir_lang.ir import Module, Op, Value
from llmir_lang.ir import ops as K
from llmir_lang.ir.module import Function, fresh_namer
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
    return recount_pin_users(
        Module(tuple(replace(fn, ops=tuple(ops)) for fn, ops in zip(functions, annotated)))
    )


def recount_pin_users(module: Module) -> Module:
    """``module`` with every pinned op's ``pin_users`` set to the number of model calls whose
    prompt holds that pin (a pass that merges calls, ``fuse-constants``, counts again); a pin no
    call reads (a state only constant text extends) is dropped: prefilling it would serve nothing."""
    users: dict[str, int] = {}
    for fn in module.functions:
        for op in fn.ops:
            pin = op.attrs.get("pin")
            if isinstance(pin, str):
                users.setdefault(pin, 0)
        if users:
            _count_pin_users(fn.ops, users)
    if not users:
        return module
    return Module(
        tuple(
            replace(
                fn,
                ops=tuple(_with_users(op, users) for op in fn.ops),
            )
            for fn in module.functions
        )
    )


def _with_users(op: Op, users: dict[str, int]) -> Op:
    pin = op.attrs.get("pin")
    if not isinstance(pin, str):
        return op
    if users[pin] == 0:
        return _strip_pins(op)
    return replace(op, attrs={**op.attrs, "pin_users": users[pin]})


_CALLS = (K.GEN, K.GEN_CHAIN, K.SELECT)


def _count_pin_users(ops: Sequence[Op], users: dict[str, int]) -> None:
    """Add to ``users[pin]`` the model calls of one function whose prompt holds ``pin``: the calls
    in the subtree of the state tree (a state's children: the states of the ops that take it as
    operand 0) below each pinned state, each call counted once per pin even when the same pin
    occurs twice on its chain. One walk of the tree, not a set of pins per call: with pins nested
    thousands deep (a program that forks at every step) that set made the count quadratic."""
    children: dict[str, list[str]] = {}
    calls_at: dict[str, int] = {}  # state -> the calls whose prompt it is
    pin_of: dict[str, str] = {}
    roots: list[str] = []
    for op in ops:
        if op.kind in (K.VAR, K.RETURN):
            continue
        base = op.operands[0].name if op.operands else None
        if op.kind in _CALLS and base is not None:
            calls_at[base] = calls_at.get(base, 0) + 1
        pin = op.attrs.get("pin")
        for r in op.results:
            (roots if base is None else children.setdefault(base, [])).append(r.name)
            if isinstance(pin, str):
                pin_of[r.name] = pin
    active: dict[str, int] = {}  # pin -> its occurrences on the path from the root
    total: dict[str, int] = {}  # state -> the calls in its subtree
    stack: list[tuple[str, bool]] = [(r, True) for r in roots]
    while stack:
        name, entering = stack.pop()
        pin = pin_of.get(name)
        if entering:
            if pin is not None:
                active[pin] = active.get(pin, 0) + 1
            stack.append((name, False))
            stack.extend((c, True) for c in children.get(name, ()))
            continue
        count = calls_at.get(name, 0) + sum(total.pop(c) for c in children.get(name, ()))
        total[name] = count
        if pin is not None:
            active[pin] -= 1
            if active[pin] == 0:  # the topmost occurrence on its path: its subtree holds the rest
                users[pin] += count


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
