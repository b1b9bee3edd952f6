"""The primitives a program appends to its state: text, ``gen``, ``select``, roles.

They are plain records; nothing runs when they are built. ``s += x`` hands ``x`` to the recorder,
which turns it into IR ops. Primitives concatenate with text and with each other
(``"A: " + gen("a") + "\\n"``) into a ``Concat``, appended item by item.

Every primitive remembers the user's source line, so an error found later (at run time) points at
the line that wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmir_lang.dsl.errors import DSLError, SourceLocation
from llmir_lang.errors import ConstraintError, InvalidRequestError, NotYetSupportedError
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.ir.attrs import SAMPLING_ATTRS, SAMPLING_TO_ENGINE, AttrValue

CHOICES_METHODS = (
    "token_length_normalized",
    "greedy_token_selection",
    "unconditional_likelihood_normalized",
    "sum_logprob",
)
ROLES = ("system", "user", "assistant")


class Expr:
    """Base of appendable primitives: supports ``+`` with text and other primitives."""

    def __add__(self, other: object) -> Concat:
        return Concat([self, other])

    def __radd__(self, other: object) -> Concat:
        return Concat([other, self])


@dataclass(eq=False)
class Concat(Expr):
    """Items appended in order (text, primitives, nested concatenations)."""

    items: list[Any]

    def __add__(self, other: object) -> Concat:
        return Concat([*self.items, other])

    def __radd__(self, other: object) -> Concat:
        return Concat([other, *self.items])


@dataclass(eq=False)
class Gen(Expr):
    """Generate text into variable ``name`` (None: an anonymous generation).

    ``attrs`` are IR attributes: sampling parameters under their DSL names (``max_tokens``,
    ``stop``, ...) and at most one constraint (``regex``, ``json_schema``, ``choices``, ``grammar``,
    ``dtype``), all plain strings, numbers and lists.
    """

    name: str | None
    attrs: dict[str, AttrValue]
    where: SourceLocation | None = field(default=None, repr=False)
    schema: Any = field(default=None, repr=False)  # json_schema as given, for ProgramState.get_obj


@dataclass(eq=False)
class Select(Expr):
    """Pick one of ``choices`` (by the model's likelihood) into variable ``name``."""

    name: str
    choices: list[str]
    choices_method: str = "token_length_normalized"
    where: SourceLocation | None = field(default=None, repr=False)


@dataclass(eq=False)
class RoleMarker(Expr):
    """Opens (``begin``) or closes a chat role; rendered by the model's own chat template."""

    role: str
    begin: bool
    where: SourceLocation | None = field(default=None, repr=False)


@dataclass(eq=False)
class RoleBlock(Expr):
    """A whole message: role begin, ``content`` (text and primitives), role end."""

    role: str
    content: Any
    where: SourceLocation | None = field(default=None, repr=False)


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    top_logprobs_num: int | None = None,
    regex: str | None = None,
    json_schema: str | dict[str, Any] | type | None = None,
    choices: Sequence[str] | None = None,
    dtype: type | str | None = None,
    grammar: str | None = None,
) -> Gen:
    """Generate into variable ``name``. Unset parameters take the run's defaults, then the engine's
    (greedy, 128 tokens). At most one of ``regex``, ``json_schema``, ``choices``, ``dtype``,
    ``grammar`` may be given (structured generation)."""
    where = SourceLocation.here()
    sampling = {
        "max_tokens": max_tokens,
        "min_tokens": min_tokens,
        "stop": [stop] if isinstance(stop, str) else (list(stop) if stop is not None else None),
        "stop_token_ids": list(stop_token_ids) if stop_token_ids is not None else None,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
        "ignore_eos": ignore_eos,
        "return_logprob": return_logprob,
        "top_logprobs_num": top_logprobs_num,
    }
    attrs: dict[str, AttrValue] = {k: v for k, v in sampling.items() if v is not None}
    check_sampling(attrs, where, f"gen({name!r})")
    constraints = {
        "regex": regex,
        "json_schema": _schema_text(json_schema, where) if json_schema is not None else None,
        "choices": _choice_list(choices, where, "gen choices") if choices is not None else None,
        "dtype": _dtype_name(dtype, where) if dtype is not None else None,
        "grammar": grammar,
    }
    given = {k: v for k, v in constraints.items() if v is not None}
    if len(given) > 1:
        raise DSLError(
            f"gen({name!r}) has several constraints {sorted(given)}; give at most one", where=where
        )
    for key in ("regex", "grammar"):
        if key in given and (not isinstance(given[key], str) or not given[key]):
            raise DSLError(f"gen({name!r}): {key} must be a non-empty string", where=where)
    if given:
        _check_constraint(given, where, name)
    attrs.update(given)
    if name is not None and (not isinstance(name, str) or not name):
        raise DSLError(f"a gen name must be a non-empty string, got {name!r}", where=where)
    return Gen(name, attrs, where, schema=json_schema)


def gen_int(name: str | None = None, **kwargs: Any) -> Gen:
    """``gen`` constrained to an integer (``dtype=int``)."""
    return gen(name, dtype="int", **kwargs)


def gen_string(name: str | None = None, **kwargs: Any) -> Gen:
    """``gen`` constrained to a JSON-style string (``dtype=str``)."""
    return gen(name, dtype="str", **kwargs)


def select(
    name: str, choices: Sequence[str] | None = None, choices_method: str = "token_length_normalized"
) -> Select:
    """Pick one of ``choices`` into variable ``name``, scoring each choice's likelihood.

    ``choices_method``: ``token_length_normalized`` (mean token logprob, the default),
    ``sum_logprob`` (total logprob) or ``greedy_token_selection`` (compare token by token).
    """
    where = SourceLocation.here()
    if not isinstance(name, str) or not name:
        raise DSLError(f"select needs a non-empty variable name, got {name!r}", where=where)
    if choices is None:
        raise DSLError(f"select({name!r}) needs choices=[...], a list of strings", where=where)
    if choices_method not in CHOICES_METHODS:
        raise DSLError(
            f"select({name!r}): unknown choices_method {choices_method!r}; use one of {CHOICES_METHODS}",
            where=where,
        )
    return Select(name, _choice_list(choices, where, f"select({name!r}) choices"), choices_method, where)


def _role_block(role: str, content: Any) -> RoleBlock:
    return RoleBlock(role, content if content is not None else "", SourceLocation.here())


def system(content: Any = None) -> RoleBlock:
    """A system message: ``s += system("You are ...")``."""
    return _role_block("system", content)


def user(content: Any = None) -> RoleBlock:
    """A user message: ``s += user("Hi")``."""
    return _role_block("user", content)


def assistant(content: Any = None) -> RoleBlock:
    """An assistant message, typically ``s += assistant(gen("answer"))``."""
    return _role_block("assistant", content)


def system_begin() -> RoleMarker:
    return RoleMarker("system", True, SourceLocation.here())


def system_end() -> RoleMarker:
    return RoleMarker("system", False, SourceLocation.here())


def user_begin() -> RoleMarker:
    return RoleMarker("user", True, SourceLocation.here())


def user_end() -> RoleMarker:
    return RoleMarker("user", False, SourceLocation.here())


def assistant_begin() -> RoleMarker:
    return RoleMarker("assistant", True, SourceLocation.here())


def assistant_end() -> RoleMarker:
    return RoleMarker("assistant", False, SourceLocation.here())


# --- argument normalization ------------------------------------------------------------------
def check_sampling(attrs: dict[str, AttrValue], where: SourceLocation | None, what: str) -> None:
    """Raise ``DSLError`` at ``where`` if the sampling attributes are invalid (checked by the
    engine's own ``SamplingParams`` rules, so the error comes at the line that wrote them)."""
    unknown = sorted(set(attrs) - set(SAMPLING_ATTRS))
    if unknown:
        raise DSLError(
            f"{what}: unknown sampling parameter(s) {unknown}; known: {sorted(SAMPLING_ATTRS)}", where=where
        )
    try:
        to_sampling_params(attrs)
    except (InvalidRequestError, TypeError) as e:
        raise DSLError(f"{what}: {e}", where=where) from None


def to_sampling_params(attrs: dict[str, Any]) -> SamplingParams:
    """The engine's ``SamplingParams`` for IR gen attributes (constraints are ignored here)."""
    kwargs: dict[str, Any] = {}
    for key, value in attrs.items():
        if key in SAMPLING_ATTRS:
            kwargs[SAMPLING_TO_ENGINE[key]] = list(value) if isinstance(value, tuple) else value
    return SamplingParams(**kwargs)


def _choice_list(choices: object, where: SourceLocation | None, what: str) -> list[str]:
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise DSLError(f"{what} must be a list of strings, got {type(choices).__name__}", where=where)
    out = list(choices)
    if not out:
        raise DSLError(f"{what} must not be empty", where=where)
    bad = [c for c in out if not isinstance(c, str) or c == ""]
    if bad:
        raise DSLError(f"{what} must be non-empty strings; bad: {bad!r}", where=where)
    if len(set(out)) != len(out):
        raise DSLError(f"{what} has duplicates: {out!r}; make them distinct", where=where)
    return out


def _check_constraint(given: dict[str, Any], where: SourceLocation | None, name: str | None) -> None:
    """Build the constraint spec now, so a malformed schema or choice list is reported at the
    gen's line (a regex or grammar is only compiled when the gen runs)."""
    from llmir_lang.dsl.lowering import constraint_spec

    try:
        constraint_spec(given)
    except NotYetSupportedError:
        pass  # reported when the gen runs, where the backend decides
    except ConstraintError as e:
        raise DSLError(f"gen({name!r}): {e}", where=where) from e


def _dtype_name(dtype: type | str, where: SourceLocation | None) -> str:
    names = {int: "int", float: "float", bool: "bool", str: "str"}
    name = names.get(dtype, dtype) if isinstance(dtype, type) else dtype  # type: ignore[call-overload]
    if name not in ("int", "float", "bool", "str"):
        raise DSLError(f"dtype must be int, float, bool or str, got {dtype!r}", where=where)
    return str(name)


def _schema_text(schema: object, where: SourceLocation | None) -> str:
    """A JSON schema as text: a string as is, a dict dumped, a pydantic model class's schema."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    model_json_schema = getattr(schema, "model_json_schema", None)
    if callable(model_json_schema):
        return json.dumps(model_json_schema())
    raise DSLError(
        f"json_schema must be a JSON string, a dict or a pydantic model class, got {type(schema).__name__}",
        where=where,
    )


class TracedText(str):
    """A placeholder for text known only at run time, used by ``trace``: a parameter or a variable
    read. Its string value is ``{name}``; appending it records ``append %state, %value`` and ``+``
    with other text keeps the reference (an f-string cannot, and records the placeholder text)."""

    value: Any  # the IR text value (ir.Value)
    run_id: int  # id() of the ProgramRun whose builder defined the value

    def __new__(cls, name: str, value: Any, run_id: int) -> TracedText:
        obj = super().__new__(cls, "{" + name + "}")
        obj.value = value
        obj.run_id = run_id
        return obj

    def __add__(self, other: object) -> Concat:  # type: ignore[override]
        return Concat([self, other])

    def __radd__(self, other: object) -> Concat:
        return Concat([other, self])
