"""A gen's sampling arguments, checked where they are written: ``stop`` / ``stop_token_ids`` /
``stop_regex`` as lists, SGLang's ``n`` and ``choices_method``, and every value by the engine's
own ``SamplingParams`` rules (``check_sampling``), so an error names the user's line."""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from llmir_lang.dsl.errors import DSLError, FeatureNotSupportedError, SourceLocation
from llmir_lang.dsl.traced_text import TracedText, _marked_text, _placeholder_in, refuse_traced_marks
from llmir_lang.errors import InvalidRequestError
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.ir.attrs import SAMPLING_ATTRS, SAMPLING_TO_ENGINE, AttrValue


def check_sampling(attrs: dict[str, AttrValue], where: SourceLocation | None, what: str) -> None:
    """Raise ``DSLError`` at ``where`` if the sampling attributes are invalid (checked by the
    engine's own ``SamplingParams`` rules, so the error comes at the line that wrote them)."""
    unknown = sorted(set(attrs) - set(SAMPLING_ATTRS))
    if unknown:
        raise DSLError(
            f"{what}: unknown sampling parameter(s) {unknown}; known: {sorted(SAMPLING_ATTRS)}", where=where
        )
    # during a trace: a traced parameter or variable (or a list holding one), or text made from
    # one by a str operation (the whole placeholder: a user's own text never holds one)
    for key, value in attrs.items():
        items = value if isinstance(value, list) else [value]
        traced = next((v for v in items if isinstance(v, TracedText)), None)
        if traced is not None:
            raise _traced_sampling_error(what, key, traced, where)
    marked = _marked_text(list(attrs.values()))
    if marked is not None and _placeholder_in(marked) is not None:
        refuse_traced_marks("gen", None, attrs)
    try:
        to_sampling_params(attrs)
    except (InvalidRequestError, TypeError) as e:
        raise DSLError(f"{what}: {e}", where=where) from None


def _traced_sampling_error(
    what: str, key: str, traced: TracedText, where: SourceLocation | None
) -> FeatureNotSupportedError:
    """The error for a sampling argument that is a traced parameter or variable (``trace``)."""
    name, kind = traced.name, traced.kind
    give = (
        f"give trace() its value ({name}=...; llmir ir: --arg {name}=...)"
        if kind == "parameter"
        else "read it in run(), where its value is known"
    )
    return FeatureNotSupportedError(
        f"{what}: {key} comes from {kind} {name!r} while the program is traced (trace(), llmir ir, "
        f"cache()): its value is not known then, and a sampling argument cannot come from a traced "
        f"{kind}; {give}",
        where=where,
    )


def to_sampling_params(attrs: dict[str, Any]) -> SamplingParams:
    """The engine's ``SamplingParams`` for IR gen attributes (constraints are ignored here)."""
    kwargs: dict[str, Any] = {}
    for key, value in attrs.items():
        if key in SAMPLING_ATTRS:
            kwargs[SAMPLING_TO_ENGINE[key]] = list(value) if isinstance(value, tuple) else value
    return SamplingParams(**kwargs)


def _stop_list(value: object, key: str, name: str | None, where: SourceLocation | None) -> list | None:
    """``stop`` / ``stop_token_ids`` as a list: None stays None, a lone stop string is one, a list,
    tuple (any sequence) or set is listed; anything else is a DSLError at the gen's line. The
    items are checked by the sampling check."""
    if value is None:
        return None
    if isinstance(value, str) and key != "stop_token_ids":
        return [value]
    if isinstance(value, (Sequence, AbstractSet)) and not isinstance(value, (str, bytes, bytearray)):
        return list(value)
    expected = {
        "stop": "a string or a list of strings",
        "stop_regex": "a regex string or a list of them",
        "stop_token_ids": "a list of integer token ids",
    }[key]
    if key == "stop_token_ids" and isinstance(value, int) and not isinstance(value, bool):
        expected += f" (stop_token_ids=[{value!r}] for one)"
    raise DSLError(
        f"gen({name!r}): {key} must be {expected}, got {type(value).__name__} {value!r:.60}", where=where
    )


def _stop_regex_list(stop_regex: object, name: str | None, where: SourceLocation | None) -> list | None:
    """``stop_regex`` as a list (a lone pattern is one; SGLang's empty values are none)."""
    if stop_regex is None or (isinstance(stop_regex, (str, list, tuple)) and len(stop_regex) == 0):
        return None
    return _stop_list(stop_regex, "stop_regex", name, where)


def _check_sglang_gen_args(
    name: str | None,
    n: object,
    choices_method: object,
    has_choices: bool,
    where: SourceLocation | None,
) -> None:
    """SGLang's ``gen`` arguments that llmir takes only where they change nothing (see ``gen``)."""
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DSLError(f"gen({name!r}): n must be an integer >= 1, got {n!r}", where=where)
        if n > 1:
            raise FeatureNotSupportedError(
                f"gen({name!r}, n={n}): several samples of one gen are not supported; fork instead: "
                f"`forks = s.fork({n}); forks += gen({name!r}, temperature=0.8); forks.join()` "
                f"makes s[{name!r}] a list of {n} samples",
                where=where,
            )
    if choices_method is not None:
        if not has_choices:
            raise DSLError(
                f"gen({name!r}): choices_method only applies to choices; use "
                f"select({name!r}, choices=[...], choices_method=...)",
                where=where,
            )
        raise DSLError(
            f"gen({name!r}, choices=..., choices_method=...): gen with choices is constrained "
            "generation here (the model writes one of the choices, token by token) and scores "
            "nothing, so choices_method would have no effect; to pick by score as SGLang's "
            f"gen(choices=...) does, write select({name!r}, choices=[...], choices_method=...)",
            where=where,
        )


def sampling_default(key: str, value: object, given: dict[str, str]) -> tuple[str, object]:
    """A sampling default of ``run`` / ``arun`` / ``run_batch`` as (IR attribute name, value),
    read as ``gen`` reads its argument: ``stop`` / ``stop_token_ids`` as lists (a set or tuple
    too), an empty ``stop_regex`` as none (None). ``given`` maps each attribute already given to
    the keyword that gave it, so that both spellings of one default (``max_tokens`` and SGLang's
    ``max_new_tokens``) are refused instead of one silently winning."""
    from llmir_lang.dsl.program_signature import _ALIASES

    attr = _ALIASES.get(key, key)
    if attr in given and given[attr] != key:
        raise DSLError(f"got both {given[attr]!r} and {key!r}, two names of one sampling default; give one")
    given[attr] = key
    try:
        if attr in ("stop", "stop_token_ids"):
            return attr, _stop_list(value, attr, None, None)
        if attr == "stop_regex":
            return attr, _stop_regex_list(value, None, None)
    except DSLError as e:  # (said as gen's, which names the gen: here there is none)
        raise DSLError(e.cause_message.removeprefix("gen(None): ")) from None
    return attr, value
