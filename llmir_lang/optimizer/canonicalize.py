"""``canonicalize``: render roles through the chat template, drop empty text, merge adjacent text.

1. With a ``template`` (``RoleRenderer`` or ``render_role(role, is_begin)``), every
   ``role.begin "r"`` / ``role.end "r"`` becomes ``text`` with the template's marker. Without
   one, roles stay as they are.
2. ``text %s ""`` (without annotations) is dropped; its uses take ``%s``. Kept when its result is
   a join branch, where substituting the operand could make the branch its own parent.
3. ``%b = text %a "y"`` after ``%a = text %s "x"`` becomes ``%b = text %s "xy"`` at the place of
   the first op, if ``%b``'s op is the only use of ``%a`` other than ``var`` reads (which read the
   same scope from ``%b``) and the first op has no annotations.

The text of every state that survives is unchanged, so the program's output is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from llmir_lang.ir import Function, Module, Op, Value
from llmir_lang.ir import ops as K
from llmir_lang.ir.module import substitute
from llmir_lang.optimizer.chat_template import RoleRenderer, as_role_renderer
from llmir_lang.optimizer.pass_manager import register_pass


@register_pass("canonicalize")
def canonicalize(
    module: Module, *, template: RoleRenderer | Callable[[str, bool], str] | None = None
) -> Module:
    """Render roles through the chat template, drop empty text, merge adjacent text."""
    renderer = as_role_renderer(template) if template is not None else None
    return Module(tuple(_canonicalize_function(fn, renderer) for fn in module.functions))


def _canonicalize_function(fn: Function, renderer: RoleRenderer | None) -> Function:
    ops = list(fn.ops)
    if renderer is not None:
        ops = [_render_role(op, renderer) for op in ops]
    ops = _drop_empty_text(ops)
    ops = _merge_text(ops)
    return replace(fn, ops=tuple(ops))


def _render_role(op: Op, renderer: RoleRenderer) -> Op:
    if op.kind == K.ROLE_BEGIN:
        return replace(op, kind=K.TEXT, label=renderer.begin(op.label or ""))
    if op.kind == K.ROLE_END:
        return replace(op, kind=K.TEXT, label=renderer.end(op.label or ""))
    return op


def _drop_empty_text(ops: list[Op]) -> list[Op]:
    branches = {v.name for op in ops if op.kind == K.JOIN for v in op.operands[1:]}
    mapping: dict[str, Value] = {}
    out: list[Op] = []
    for op in ops:
        if mapping:
            op = substitute([op], mapping)[0]
        if op.kind == K.TEXT and op.label == "" and not op.attrs and op.result.name not in branches:
            mapping[op.result.name] = op.state
            continue
        out.append(op)
    return out


def _merge_text(ops: list[Op]) -> list[Op]:
    # Uses that pin a value in place: everything but var reads.
    hard_uses: dict[str, int] = {}
    for op in ops:
        for v in op.operands:
            if op.kind != K.VAR:
                hard_uses[v.name] = hard_uses.get(v.name, 0) + 1
    out: list[Op | None] = []
    text_at: dict[str, int] = {}  # state name -> index in out of the mergeable text op defining it
    # index in out of a merged op -> its labels, joined once at the end: adding them one by one
    # copies the text so far each time (a prompt built from 20,000 lines in a loop: quadratic)
    pieces: dict[int, list[str]] = {}
    renamed: dict[str, Value] = {}
    for op in ops:
        if op.kind == K.TEXT and op.state.name in text_at and hard_uses.get(op.state.name) == 1:
            i = text_at.pop(op.state.name)
            first = out[i]
            assert first is not None
            pieces.setdefault(i, [first.label or ""]).append(op.label or "")
            out[i] = Op(K.TEXT, op.results, first.operands, None, op.attrs)
            renamed[op.state.name] = op.result
            if not op.attrs:
                text_at[op.result.name] = i
            continue
        if op.kind == K.TEXT and not op.attrs:
            text_at[op.result.name] = len(out)
        out.append(op)
    for i, labels in pieces.items():
        merged = out[i]
        assert merged is not None
        out[i] = replace(merged, label="".join(labels))
    # A var read of a merged-away state reads the same scope from the merged state. A state is
    # renamed to a later one, whose own renaming (if any) came later: resolve from the last back,
    # so each name follows one step (not the whole rest of the chain: quadratic in its length).
    for name in reversed(list(renamed)):
        target = renamed[name]
        renamed[name] = renamed.get(target.name, target)
    return substitute([op for op in out if op is not None], renamed)
