"""The primitives a program appends to its state: text, ``gen``, ``select``, roles.

They are plain records; nothing runs when they are built. ``s += x`` hands ``x`` to the recorder,
which turns it into IR ops. Primitives concatenate with text and with each other
(``"A: " + gen("a") + "\\n"``) into a ``Concat``, appended item by item.

Every primitive remembers the user's source line, so an error found later (at run time) points at
the line that wrote it.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import re
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from llmir_lang.dsl.errors import DSLError, FeatureNotSupportedError, SourceLocation
from llmir_lang.errors import ConstraintError, InvalidRequestError, NotYetSupportedError
from llmir_lang.executor.choices import choices_method_name, token_length_normalized
from llmir_lang.executor.sampling_params import GREEDY_TEMPERATURE, SamplingParams
from llmir_lang.executor.tokenizer import lone_surrogate
from llmir_lang.ir.attrs import CONSTRAINT_ATTRS, SAMPLING_ATTRS, SAMPLING_TO_ENGINE, AttrValue

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

    name: str | None  # None: named where it is appended (an anonymous variable)
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
    json_schema: Any = None,
    choices: Sequence[str] | None = None,
    dtype: type | str | None = None,
    grammar: str | None = None,
    n: int | None = None,
    stop_regex: str | Sequence[str] | None = None,
    choices_method: Any = None,
    logprob_start_len: int | None = None,
    return_text_in_logprobs: bool | None = None,
) -> Gen:
    """Generate into variable ``name``. Unset parameters take the run's defaults, then the engine's
    (greedy, 128 tokens). At most one of ``regex``, ``json_schema``, ``choices``, ``dtype``,
    ``grammar`` may be given (structured generation). ``json_schema`` is a JSON schema (a dict or
    JSON text) or a type pydantic validates: a ``BaseModel`` subclass, a dataclass, a ``TypedDict``,
    ``list[Item]``, ``Item | None``, ...; a type constrains to what its own validation accepts, and
    ``s.get_obj(name)`` returns pydantic's value of the text (a model or dataclass instance, ...).

    ``stop_regex`` (a pattern or a list, in Python ``re`` syntax) ends the output at the first
    token after which its text contains a match, cut where the match starts (as ``stop`` strings
    are); ``get_meta_info(name)["finish_reason"]`` is ``"stop"`` and ``matched_stop`` the pattern.

    SGLang's ``n`` and ``choices_method`` are accepted where they mean something here: ``n=1``, no
    ``choices_method``. ``n > 1`` raises ``FeatureNotSupportedError`` (fork for several samples).
    ``gen(name, choices=...)`` is constrained generation, which scores nothing, so a
    ``choices_method`` is refused: ``select`` picks by score (what SGLang's ``gen(choices=...)``
    does).

    With ``return_logprob`` / ``top_logprobs_num``, ``get_meta_info(name)`` has SGLang's
    ``output_token_logprobs`` / ``output_top_logprobs`` triples ``(logprob, token id, text)``; the
    text is filled with ``return_text_in_logprobs=True``. With ``logprob_start_len=k`` (k >= 0) it
    also has SGLang's ``input_token_logprobs``: one triple per token of the gen's prompt (the whole
    text before it) from token k on, the first without a logprob (None); such a gen starts a
    request (fuse-constants never appends it to another gen's chain), and its prompt is computed
    again from token k (its logits are needed), not served from the prefix cache."""
    where = SourceLocation.here()
    _check_name(name, where, f"gen({name!r})")
    _check_sglang_gen_args(name, n, choices_method, choices is not None, where)
    if logprob_start_len is not None and (
        isinstance(logprob_start_len, bool) or not isinstance(logprob_start_len, int) or logprob_start_len < -1
    ):
        raise DSLError(
            f"gen({name!r}): logprob_start_len must be an integer >= 0 (or -1 for none, SGLang's "
            f"default), got {logprob_start_len!r}",
            where=where,
        )
    if return_text_in_logprobs is not None and not isinstance(return_text_in_logprobs, bool):
        raise DSLError(
            f"gen({name!r}): return_text_in_logprobs must be True or False, got {return_text_in_logprobs!r}",
            where=where,
        )
    sampling = {
        "max_tokens": max_tokens,
        "min_tokens": min_tokens,
        "stop": _stop_list(stop, "stop", name, where),
        "stop_regex": _stop_regex_list(stop_regex, name, where),
        "stop_token_ids": _stop_list(stop_token_ids, "stop_token_ids", name, where),
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
    for key, value in given.items():
        for item in value if isinstance(value, list) else [value]:
            bad = lone_surrogate(item) if isinstance(item, str) else None
            if bad is not None:  # the constraint compilers raised a bare UnicodeEncodeError
                raise DSLError(
                    f"gen({name!r}): {key} has a lone surrogate (U+{ord(bad.group()):04X}) at position "
                    f"{bad.start()}, which is not Unicode text; remove or replace it",
                    where=where,
                )
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
    if return_text_in_logprobs:
        attrs["return_text_in_logprobs"] = True
    if logprob_start_len is not None and logprob_start_len >= 0:
        attrs["logprob_start_len"] = logprob_start_len
        attrs["return_logprob"] = True  # asking for the prompt's logprobs is asking for logprobs
    if name is not None and (not isinstance(name, str) or not name):
        raise DSLError(f"a gen name must be a non-empty string, got {name!r}", where=where)
    return Gen(name, attrs, where, schema=json_schema)


def gen_int(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_regex: str | Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    **kwargs: Any,
) -> Gen:
    """``gen`` constrained to an integer (``dtype=int``). The positional parameters are SGLang's
    (``gen_int("x", 8)``: ``max_tokens=8``); other ``gen`` parameters go by keyword."""
    args = dict(locals())
    return _dtype_gen("int", args.pop("name"), {**args.pop("kwargs"), **args})


def gen_string(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_regex: str | Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    **kwargs: Any,
) -> Gen:
    """``gen`` constrained to a JSON-style string (``dtype=str``), with ``gen_int``'s parameters."""
    args = dict(locals())
    return _dtype_gen("str", args.pop("name"), {**args.pop("kwargs"), **args})


def _dtype_gen(dtype: str, name: str | None, kwargs: dict[str, Any]) -> Gen:
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k not in CONSTRAINT_ATTRS}
    other = sorted(k for k in kwargs if k in CONSTRAINT_ATTRS)
    if other:
        raise DSLError(
            f"gen_{dtype}({name!r}) is gen(dtype={dtype}) and takes no other constraint; got {other}",
            where=SourceLocation.here(),
        )
    return gen(name, dtype=dtype, **kwargs)


def select(
    name: str | None = None,
    choices: Sequence[str] | None = None,
    temperature: float = 0.0,
    choices_method: Any = token_length_normalized,
) -> Select:
    """Pick one of ``choices`` into variable ``name``, scoring each choice's likelihood
    (SGLang's signature). ``name=None`` appends the choice and keeps no variable.

    ``choices_method``: ``token_length_normalized`` (mean token logprob, the default),
    ``greedy_token_selection`` (compare token by token), ``unconditional_likelihood_normalized``
    (each choice's logprob relative to its logprob without the prompt), as the objects
    ``llmir.token_length_normalized``, ... or their names, or ``"sum_logprob"`` (total logprob).
    A method name in the third place (``select(name, choices, "greedy_token_selection")``, the
    older llmir form) is still read as the method.

    ``temperature``: the best-scoring choice is always picked, so only 0 (and values below the
    engine's greedy threshold) is accepted; SGLang's server backend refuses others too. Repeated
    choices are scored once: SGLang picks the first of equal scores, which is the same value.
    """
    where = SourceLocation.here()
    what = f"select({name!r})"
    if name is not None and (not isinstance(name, str) or not name):
        raise DSLError(f"select needs a non-empty variable name (or None), got {name!r}", where=where)
    _check_name(name, where, what)
    if choices is None:
        raise DSLError(f"{what} needs choices=[...], a list of strings", where=where)
    if temperature is None:
        temperature = 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        if choices_method is not token_length_normalized:
            raise DSLError(f"{what}: temperature must be a number, got {temperature!r}", where=where)
        choices_method, temperature = temperature, 0.0
    temperature = float(temperature)  # numpy scalars too
    if not math.isfinite(temperature) or temperature < 0:
        raise DSLError(f"{what}: temperature must be a finite number >= 0, got {temperature!r}", where=where)
    if temperature > GREEDY_TEMPERATURE:
        raise FeatureNotSupportedError(
            f"{what}: temperature={temperature} (sampling a choice) is not supported: select picks "
            "the best-scoring choice (SGLang's server backend refuses a temperature too); drop it, "
            "or sample with gen(name, choices=[...], temperature=...) (constrained generation)",
            where=where,
        )
    try:
        method = choices_method_name(choices_method)
    except InvalidRequestError as e:
        raise DSLError(f"{what}: {e}", where=where) from None
    if method not in CHOICES_METHODS:
        raise DSLError(
            f"{what}: unknown choices_method {method!r}; use one of {CHOICES_METHODS}", where=where
        )
    options = _choice_list(choices, where, f"{what} choices")
    return Select(name, options, method, where)


def image(expr: Any) -> Any:
    """SGLang's image input. Not supported: llmir_lang runs text-only models."""
    raise FeatureNotSupportedError(
        f"image({expr!r:.60}): multimodal input is not supported (llmir_lang runs text-only "
        "models); give the image's content as text, or run this program on SGLang",
        where=SourceLocation.here(),
    )


def video(path: Any, num_frames: int | None = None) -> Any:
    """SGLang's video input. Not supported: llmir_lang runs text-only models."""
    raise FeatureNotSupportedError(
        f"video({path!r:.60}): multimodal input is not supported (llmir_lang runs text-only "
        "models); give the video's content as text, or run this program on SGLang",
        where=SourceLocation.here(),
    )


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


def _choice_list(choices: object, where: SourceLocation | None, what: str) -> list[str]:
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise DSLError(f"{what} must be a list of strings, got {type(choices).__name__}", where=where)
    out = list(choices)
    if not out:
        raise DSLError(f"{what} must not be empty", where=where)
    bad = [c for c in out if not isinstance(c, str) or c == ""]
    if bad:
        raise DSLError(f"{what} must be non-empty strings; bad: {bad!r}", where=where)
    # SGLang accepts a repeated choice and picks the first of equal scores, which is the same
    # value as scoring it once; the IR (and a choice trie) needs distinct choices, so repeats go
    return list(dict.fromkeys(out))


_ANONYMOUS_NAME = re.compile(r"_gen\d+")


def is_anonymous(name: str) -> bool:
    """Whether ``name`` is one the recorder gives an unnamed gen (``_gen1``, ``_gen2``, ...): such
    variables are left out of ``variables()``, joins and error messages, and a user's gen or
    select may not take such a name (``_generated`` is an ordinary name)."""
    return _ANONYMOUS_NAME.fullmatch(name) is not None


def _check_name(name: object, where: SourceLocation | None, what: str) -> None:
    if isinstance(name, str) and is_anonymous(name):
        raise DSLError(
            f"{what}: variable names _gen1, _gen2, ... are reserved for unnamed gens "
            f"(gen() without a name); choose another name for {name!r}",
            where=where,
        )


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
    pattern = given.get("regex")
    problem = _regex_syntax_error(pattern) if isinstance(pattern, str) else None
    if problem is not None:  # else it failed only when the gen ran, after the gens before it
        raise DSLError(f"gen({name!r}): regex {pattern!r} does not parse: {problem}", where=where)


@functools.lru_cache(maxsize=256)
def _regex_syntax_error(pattern: str) -> str | None:
    """The syntax error of a ``regex=`` pattern (Rust regex syntax, which both constraint engines
    parse alike), or None; checked without a tokenizer (about a millisecond, once per pattern).
    Only a parse error counts here: anything else is the engine's to decide when the gen runs."""
    try:
        import llguidance

        grammar = llguidance.grammar_from("regex", pattern)
        messages = llguidance.LLMatcher.validate_grammar(grammar)
    except Exception:
        return None
    text = messages if isinstance(messages, str) else " ".join(str(m) for m in messages or [])
    if "regex parse error" not in text:
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("error:")]
    return lines[0].removeprefix("error:").strip() if lines else text.strip().splitlines()[0]


def _dtype_name(dtype: type | str, where: SourceLocation | None) -> str:
    names = {int: "int", float: "float", bool: "bool", str: "str"}
    name = names.get(dtype, dtype) if isinstance(dtype, type) else dtype  # type: ignore[call-overload]
    if name not in ("int", "float", "bool", "str"):
        raise DSLError(f"dtype must be int, float, bool or str, got {dtype!r}", where=where)
    return str(name)


def _schema_text(schema: object, where: SourceLocation | None) -> str:
    """A JSON schema as text: a string as is, a dict dumped, the schema of a type pydantic
    validates (a model class, a dataclass, a TypedDict, ``list[Item]``, ...)."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    from llmir_lang.executor.constraints.schema_pydantic import is_pydantic_type, pydantic_json_schema

    if is_pydantic_type(schema):
        # narrowed to what the type's own validation accepts (a NaiveDatetime, a UUID4, ...)
        return json.dumps(pydantic_json_schema(schema))
    raise DSLError(
        "json_schema must be a JSON string, a dict, or a type pydantic validates (a BaseModel "
        "subclass, a dataclass, a TypedDict, list[Item], ...), got "
        + (repr(schema) if isinstance(schema, type) else type(schema).__name__)
        + ("; for a single int / float / bool / str value use dtype=" if schema in (int, float, bool, str) else ""),
        where=where,
    )


# Private-use marks around a traced value's string value: text made from it by any str operation
# that no hook sees (str.join, .upper(), % with a tuple or dict held in a variable) still holds
# one, and the trace refuses such text where it enters the IR (``refuse_traced_marks``). repr()
# (``!r``, ``%r``), ascii() and json.dumps write the marks as escapes (``\ue000``): an escaped
# whole placeholder is refused too (a user's own text never holds one; a lone escape it may).
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARKED = re.compile(_OPEN + r"\{(.*?)\}" + _CLOSE)
_ESCAPED = re.compile(r"\\+[uU]0{0,4}[eE]000\{(.*?)\}\\+[uU]0{0,4}[eE]001")


def _placeholder_in(text: str) -> str | None:
    """The name in the first whole placeholder in ``text``, marked or escaped; None if none."""
    found = _MARKED.search(text) or _ESCAPED.search(text)
    return found.group(1) if found else None


def marked_placeholder(name: str) -> str:
    """``{name}`` between the two marks, as plain text (what a ``TracedText`` holds)."""
    return _OPEN + "{" + name + "}" + _CLOSE


class TracedText(str):
    """A placeholder for text known only at run time, used by ``trace``: a parameter or a variable
    read. Its string value is ``{name}`` between two private-use marks; appending it records
    ``append %state, %value``, and ``+`` with other text and ``str()`` keep the reference.
    Formatting it (an f-string, ``str.format``, ``text % value``) raises
    ``FeatureNotSupportedError``: the text made would hold the placeholder, not the value, and the
    IR would ignore the argument. Text made from it in other ways (``str.join``, a str method,
    ``repr``, ``json.dumps``) is refused with the same error where it reaches the IR
    (``refuse_traced_marks``); a slice or an item is a placeholder of its own (``{q[1:3]}``,
    marked), so it is refused there too and never leaves unmarked text such as ``{q``."""

    name: str
    kind: str  # "parameter" or "variable"
    value: Any  # the IR text value (ir.Value)
    run_id: int  # id() of the ProgramRun whose builder defined the value

    def __new__(cls, name: str, value: Any, run_id: int, kind: str = "parameter") -> TracedText:
        obj = super().__new__(cls, marked_placeholder(name))
        obj.name = name
        obj.kind = kind
        obj.value = value
        obj.run_id = run_id
        return obj

    @property
    def placeholder(self) -> str:
        """``{name}`` as a plain str (what ``s.text()`` shows during a trace)."""
        return "{" + self.name + "}"

    def __add__(self, other: object) -> Concat:  # type: ignore[override]
        __tracebackhide__ = True
        self._refuse_number(other, "+")
        return Concat([self, other])

    def __radd__(self, other: object) -> Concat:
        __tracebackhide__ = True
        self._refuse_number(other, "+")
        return Concat([other, self])

    # ``n > 2`` of a traced number parameter raised a bare TypeError (str against int)
    def __lt__(self, other: object) -> bool:  # type: ignore[override]
        __tracebackhide__ = True
        self._refuse_number(other, "<")
        return str.__lt__(self, other)  # type: ignore[operator]

    def __le__(self, other: object) -> bool:  # type: ignore[override]
        __tracebackhide__ = True
        self._refuse_number(other, "<=")
        return str.__le__(self, other)  # type: ignore[operator]

    def __gt__(self, other: object) -> bool:  # type: ignore[override]
        __tracebackhide__ = True
        self._refuse_number(other, ">")
        return str.__gt__(self, other)  # type: ignore[operator]

    def __ge__(self, other: object) -> bool:  # type: ignore[override]
        __tracebackhide__ = True
        self._refuse_number(other, ">=")
        return str.__ge__(self, other)  # type: ignore[operator]

    def __getitem__(self, key: Any) -> str:  # type: ignore[override]
        __tracebackhide__ = True
        if self.value is None:  # a var_scope's text or a joined list: nothing to index in the IR
            raise FeatureNotSupportedError(
                f"variable {self.name!r} (a var_scope's text or a fork's joined list) is indexed while "
                "the program is traced (trace(), llmir ir, cache()): its value is not known then; "
                "run() the program to use it",
                where=SourceLocation.here(),
            )
        # a slice of the marked text could drop both marks (``q[1:-1]`` was ``{q}``, ``q[2]`` was
        # ``q``) and go into the IR as constant text: a marked placeholder of its own instead, which
        # compares unequal to any text, as the whole placeholder does (control flow: one path)
        return marked_placeholder(f"{self.name}[{_key_text(key)}]")

    def _refuse_number(self, other: object, op: str) -> None:
        """``n + 1`` / ``n > 2`` of a traced number parameter: run() computes it, the trace cannot
        (``+`` made ``Concat([n, 1])``, whose ``str()`` went into the IR as text)."""
        __tracebackhide__ = True
        if isinstance(other, (int, float, complex)) and not isinstance(other, bool):
            raise FeatureNotSupportedError(
                f"{self.kind} {self.name!r} is used in arithmetic or compared with a number "
                f"({self.name} {op} {other!r}) while the program is traced (trace(), llmir ir, "
                f"cache()): its value is not known then; give trace() the argument ({self.name}=...; "
                f"llmir ir: --arg {self.name}=...)",
                where=SourceLocation.here(),
            )

    def __str__(self) -> str:
        return self  # str(x), as for a number argument in run(): still the reference

    # f-strings and str.format call __format__, ``"Q: %s" % x`` calls __rmod__ first (a str
    # subclass), and Python compiles ``"Q: %s" % (x,)`` (a literal tuple) to an f-string. A tuple or
    # dict held in a variable reaches only __str__ (which must keep ``str(x)`` the reference) or
    # __repr__: that text keeps the marks (escaped by repr), and is refused where it enters the IR.
    def __format__(self, spec: str) -> str:
        __tracebackhide__ = True
        raise self._formatted()

    def __rmod__(self, other: object) -> str:
        __tracebackhide__ = True
        raise self._formatted()

    def __iter__(self) -> Any:
        __tracebackhide__ = True
        give = (
            f"give trace() the argument ({self.name}=[...]; llmir ir: --arg {self.name}='[...]')"
            if self.kind == "parameter"
            else "iterate it in run(), where its value is known"
        )
        raise FeatureNotSupportedError(
            f"{self.kind} {self.name!r} is iterated (a for loop, list(), str.join of it) while the "
            "program is traced (trace(), llmir ir, cache()): its value is not known then, so the "
            f"trace cannot follow the loop; {give}",
            where=SourceLocation.here(),
        )

    def _formatted(self) -> FeatureNotSupportedError:
        read = self.name if self.kind == "parameter" else f"s[{self.name!r}]"
        return FeatureNotSupportedError(
            f"{self.kind} {self.name!r} is formatted into a string (an f-string, str.format or %) "
            "while the program is traced (trace(), llmir ir, cache()), so the text would hold the "
            f"placeholder {self.placeholder!r} and the IR would ignore the {self.kind}'s value; "
            f'build the text with + instead, e.g. "Q: " + {read} (run() with arguments takes '
            "f-strings: there the value is known)",
            where=SourceLocation.here(),
        )


def refuse_traced_marks(kind: str, label: str | None, attrs: Any) -> None:
    """During a trace, refuse an op whose text (its label or attributes) holds a traced value's
    mark: text made from a parameter or variable by a str operation would put its placeholder, not
    its value, into the IR (the ``FunctionBuilder`` hook ``ProgramRun`` installs when tracing)."""
    __tracebackhide__ = True
    text = _marked_text([label, attrs])
    if text is None:
        return
    found = _placeholder_in(text)
    what = f"the placeholder of {found!r}" if found is not None else "part of a traced placeholder"
    shown = _ESCAPED.sub(lambda m: "{" + m.group(1) + "}", text).replace(_OPEN, "").replace(_CLOSE, "")
    # without a whole placeholder the mark may be the program's own text: say so too
    literal = (
        ""
        if found
        else " (or the text itself holds U+E000 or U+E001, the private-use characters the trace "
        "marks placeholders with: trace() cannot take them in constant text; run() can)"
    )
    raise FeatureNotSupportedError(
        f"text recorded by a {kind} op while the program is traced (trace(), llmir ir, cache()) holds "
        f"{what}{literal} ({shown[:80]!r}): a traced parameter or variable, or text made from one by a "
        "str operation (str.join, slicing, a str method such as .upper(), % with a tuple or dict held "
        "in a variable, repr() or !r, json.dumps), where the IR takes constant text, so the IR would "
        "hold the placeholder and "
        'ignore the value. Join text with + to keep the reference (e.g. "Q: " + question); give '
        "trace() the arguments that select choices or gen options are made from; run() with "
        "arguments takes any of these",
        where=SourceLocation.here(),
    )


def _key_text(key: Any) -> str:
    """``1:3`` / ``2`` / ``'k'``: how the user wrote an index or a slice."""
    if isinstance(key, slice):
        parts = ["" if v is None else repr(v) for v in (key.start, key.stop, key.step)]
        return ":".join(parts if key.step is not None else parts[:2])
    return repr(key)


def _marked_text(value: Any) -> str | None:
    if isinstance(value, str):
        marked = _OPEN in value or _CLOSE in value or ("\\" in value and _ESCAPED.search(value))
        return value if marked else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            got = _marked_text(item)
            if got is not None:
                return got
    return None
