"""The primitives a program appends to its state: text, ``gen``, ``select``, roles.

They are plain records (``primitive_records``); nothing runs when they are built. ``s += x`` hands
``x`` to the recorder, which turns it into IR ops. Primitives concatenate with text and with each
other (``"A: " + gen("a") + "\\n"``) into a ``Concat``, appended item by item.

Every primitive remembers the user's source line, so an error found later (at run time) points at
the line that wrote it. Their arguments are checked where they are written: sampling arguments in
``sampling_args``, constraints in ``constraint_args``; ``traced_text`` is what a parameter is while
``trace`` records.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

from llmir_lang.dsl.constraint_args import _check_constraint, _choice_list, _dtype_name, _schema_text
from llmir_lang.dsl.errors import DSLError, FeatureNotSupportedError, SourceLocation
from llmir_lang.dsl.primitive_records import Concat, Expr, Gen, RoleBlock, RoleMarker, Select
from llmir_lang.dsl.sampling_args import (
    _check_sglang_gen_args,
    _stop_list,
    _stop_regex_list,
    check_sampling,
    to_sampling_params,
)
from llmir_lang.dsl.traced_text import TracedText, marked_placeholder, refuse_traced_marks
from llmir_lang.errors import InvalidRequestError
from llmir_lang.executor.choices import choices_method_name, token_length_normalized
from llmir_lang.executor.sampling_params import GREEDY_TEMPERATURE
from llmir_lang.executor.tokenizer import lone_surrogate
from llmir_lang.ir.attrs import CONSTRAINT_ATTRS, AttrValue

CHOICES_METHODS = (
    "token_length_normalized",
    "greedy_token_selection",
    "unconditional_likelihood_normalized",
    "sum_logprob",
)
ROLES = ("system", "user", "assistant")


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
    # a constraint allows a set of texts: a repeated choice allows nothing more
    allowed = None if choices is None else list(dict.fromkeys(_choice_list(choices, where, "gen choices")))
    constraints = {
        "regex": regex,
        "json_schema": _schema_text(json_schema, where) if json_schema is not None else None,
        "choices": allowed,
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
    engine's greedy threshold) is accepted; SGLang's server backend refuses others too.

    Repeated choices (``["yes", "no", "yes"]``) are kept as given: the meta info has one entry per
    choice, in the order given (SGLang's shape; repeats carry equal scores), while each distinct
    choice is scored once. Repeats tie, and the first of tied choices wins (as SGLang's argmax),
    so the value is the same text either way and ``meta["picked"]`` is its first index.
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


__all__ = [
    "CHOICES_METHODS",
    "ROLES",
    "Concat",
    "Expr",
    "Gen",
    "RoleBlock",
    "RoleMarker",
    "Select",
    "TracedText",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "check_sampling",
    "gen",
    "gen_int",
    "gen_string",
    "image",
    "is_anonymous",
    "marked_placeholder",
    "refuse_traced_marks",
    "select",
    "system",
    "system_begin",
    "system_end",
    "to_sampling_params",
    "user",
    "user_begin",
    "user_end",
    "video",
]
