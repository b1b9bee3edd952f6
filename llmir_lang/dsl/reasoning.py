"""``separate_reasoning``: SGLang's primitive that splits a reasoning model's output in two.

``s += separate_reasoning(gen("answer"), model_type="deepseek-r1")`` (or around a role, a
concatenation, a select) appends its expression as usual; every gen and select in it is recorded
with the IR attribute ``reasoning = "deepseek-r1"``. Once such a gen has run, variable ``answer``
is the final answer, ``answer_reasoning_content`` the reasoning, and the state (its text, its
messages, the prompts after it) goes on with the answer: the reasoning is left out of the
conversation, as in SGLang, whose state keeps the answer in place of the output. How the text is
split is ``ir.reasoning`` (SGLang's parser, rule by rule).

A constrained gen inside it (``regex=``, ``json_schema=``, ``choices=``, ``dtype=``, ``grammar=``)
is constrained after the reasoning, as SGLang's reasoner grammar does: the model reasons freely up
to the end tag, and the constraint covers the answer, which is the gen's value
(``gated_constraint``; the engine's ``executor/constraints/reasoning_gate.py``). A constraint that
itself spells the end tag (``regex=r"<think>.*</think>\\d+"``) describes the whole output and
covers all of it, as before.

In a streamed run (``stream=True``) it does nothing but append its expression, as in SGLang: the
stream has shown the output, which a stream never takes back, so there is no split to make (and a
constraint covers the whole output).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmir_lang.dsl.errors import SeparateReasoningError, SourceLocation, UnsupportedReasoningFormatError
from llmir_lang.dsl.primitive_records import Concat, Gen, RoleBlock, Select, SeparateReasoning
from llmir_lang.ir.attrs import AttrValue
from llmir_lang.ir.reasoning import FORMATS, UNSUPPORTED_FORMATS, gate_tags, reasoning_format_problem


def separate_reasoning(expr: Any = None, model_type: str | None = None) -> SeparateReasoning:
    """Append ``expr``; each gen / select in it binds its name to the final answer of its output
    and ``<name>_reasoning_content`` to the reasoning, in the format of SGLang's reasoning parser
    ``model_type`` (``"deepseek-r1"``, ``"qwen3"``, ``"kimi"``, ... matched case-insensitively;
    ``ir.reasoning.FORMATS``). The gen appends its answer to the state, not its output.

    Raises ``SeparateReasoningError`` (a ``ValueError``, as SGLang's) at this line when
    ``model_type`` is missing or unknown, ``expr`` is missing, a gen / select in it has no name,
    or ``expr`` is itself inside another ``separate_reasoning``; ``UnsupportedReasoningFormatError``
    for a parser SGLang has whose format is not a pair of tags (``gpt-oss``)."""
    where = SourceLocation.here()
    fmt = reasoning_format(model_type, where)
    if expr is None:
        raise SeparateReasoningError(
            "separate_reasoning(expr, model_type) needs the expression to append: a gen or select, or "
            "text, a role or a concatenation holding one (separate_reasoning(gen('answer'), "
            f"model_type={fmt!r}))",
            where=where,
        )
    _check_inside(expr, where)
    return SeparateReasoning(expr, fmt, where)


def reasoning_format(model_type: object, where: SourceLocation | None) -> str:
    """``model_type`` as the IR names its format (lower case), or the error for it."""
    known = ", ".join(FORMATS)
    if model_type is None or model_type == "":
        raise SeparateReasoningError(
            "separate_reasoning needs model_type=..., the reasoning parser of the model that "
            f"generates (SGLang's --reasoning-parser names): one of {known}",
            where=where,
        )
    if not isinstance(model_type, str):
        raise SeparateReasoningError(
            f"separate_reasoning: model_type must be a parser name (a string), got "
            f"{type(model_type).__name__} {model_type!r:.60}; one of {known}",
            where=where,
        )
    name = model_type.lower()
    problem = reasoning_format_problem(name)
    if problem is None:
        return name
    cls = UnsupportedReasoningFormatError if name in UNSUPPORTED_FORMATS else SeparateReasoningError
    raise cls(f"separate_reasoning(model_type={model_type!r}): {problem}", where=where)


def _check_inside(x: Any, where: SourceLocation | None) -> None:
    """What ``separate_reasoning`` wraps: its gens and selects named (their reasoning variable
    needs a name, as SGLang's does), and no ``separate_reasoning`` inside."""
    if isinstance(x, SeparateReasoning):
        raise SeparateReasoningError(
            f"separate_reasoning(model_type={x.model_type!r}) inside another separate_reasoning: "
            "a gen's output is split once; keep one of them",
            where=where,
        )
    if isinstance(x, Concat):
        items: list[Any] | tuple[Any, ...] = x.items
    elif isinstance(x, (list, tuple)):
        items = x
    elif isinstance(x, RoleBlock):
        items = [x.content]
    else:
        if isinstance(x, (Gen, Select)) and x.name is None:
            what = "gen()" if isinstance(x, Gen) else "select()"
            raise SeparateReasoningError(
                f"separate_reasoning around an unnamed {what}: the reasoning is variable "
                "'<name>_reasoning_content', so give it a name (SGLang raises 'name must be provided')",
                where=where,
            )
        return
    for item in items:
        _check_inside(item, where)


def gated_constraint(attrs: Mapping[str, AttrValue]) -> Any:
    """The ``ConstraintSpec`` of a gen with IR attributes ``attrs`` (``lowering.constraint_spec``),
    after the reasoning when they hold a ``reasoning`` format: the engine lets tokens through up
    to the format's end tag, then constrains the answer (``executor.constraints.
    gated_by_reasoning``, which leaves a constraint that spells the end tag over the whole
    output). None for an unconstrained gen."""
    from llmir_lang.dsl.lowering import constraint_spec

    spec = constraint_spec(attrs)
    fmt = attrs.get("reasoning")
    if spec is None or fmt is None:
        return spec
    from llmir_lang.executor.constraints import ReasoningTags, gated_by_reasoning

    return gated_by_reasoning(spec, ReasoningTags(*gate_tags(str(fmt))))


__all__ = ["gated_constraint", "reasoning_format", "separate_reasoning"]
