"""Op attributes: typed values, their normal form, and the schema of every key.

An attribute value is one of ``str``, ``int``, ``float`` (finite or +-inf, never NaN), ``bool``, a
``tuple`` of attribute values (printed ``[a, b]``) or a ``dict`` from ``str`` to attribute values
(printed ``{k = v}``). ``normalize_attr`` turns lists into tuples, checks every leaf, and is applied
by the builder; the parser produces the same normal form, so printed and parsed programs compare
equal. Attribute dicts are treated as immutable: passes build new dicts, never mutate.

Keys are checked per op kind by the verifier against the schemas below. Constraints and sampling
parameters are strings and numbers only: the IR never evaluates them. Values are also checked
against what runs: sampling parameters against the engine's ranges (``sampling_problem``), a
gen's constraint by the constraint compiler the run path uses (``constraint_problem``), a
select's ``choices_method`` and a role against the names the DSL and the interpreter know.

Two limits keep every value printable and parseable: lists and dicts nest at most
``MAX_ATTR_DEPTH`` deep (the printer, the parser and value comparison recurse), and an integer has
at most as many digits as Python converts to and from text (``sys.get_int_max_str_digits``).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping
from typing import Any

from llmir_lang.errors import ConstraintError, IRVerifyError

AttrValue = str | int | float | bool | tuple["AttrValue", ...] | dict[str, "AttrValue"]
Attrs = dict[str, AttrValue]

# Type specs: "str", "int", "float" (an int is accepted too), "bool", "str[]", "int[]", "dict[]",
# "dict", "any".
SAMPLING_ATTRS: dict[str, str] = {
    "max_tokens": "int",
    "min_tokens": "int",
    "stop": "str[]",
    "stop_regex": "str[]",
    "stop_token_ids": "int[]",
    "temperature": "float",
    "top_p": "float",
    "top_k": "int",
    "min_p": "float",
    "frequency_penalty": "float",
    "presence_penalty": "float",
    "repetition_penalty": "float",
    "seed": "int",
    "ignore_eos": "bool",
    "return_logprob": "bool",
    "top_logprobs_num": "int",
}

# IR sampling names -> executor SamplingParams field names (the IR uses the DSL's names).
SAMPLING_TO_ENGINE: dict[str, str] = {
    **{k: k for k in SAMPLING_ATTRS},
    "max_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
}

# At most one of these on a gen. Values are strings (choices: a list of strings), never evaluated.
CONSTRAINT_ATTRS: dict[str, str] = {
    "regex": "str",
    "json_schema": "str",
    "choices": "str[]",
    "grammar": "str",
    "dtype": "str",
}
DTYPES = ("int", "float", "bool", "str")

# Annotations the optimizer passes add (see each pass's docstring for what the interpreter does).
ANNOTATION_ATTRS: dict[str, str] = {
    "pin": "str",  # prefix-share: this op's result is shared prefix node <pin>
    "pin_users": "int",  # prefix-share: how many extending ops consume the node, module-wide
    "group": "str",  # fork-join: on a fork, the id of its branch group
    "branch_of": "str",  # fork-join: on the first op of a branch, the group it belongs to
}

# How a gen's meta info is shaped (read by the interpreter, never sent to the engine).
META_ATTRS: dict[str, str] = {
    "return_text_in_logprobs": "bool",  # SGLang's: each logprob triple carries its token's text
}

# What the gen's request reports besides its output (sent to the backend, not a sampling field).
REQUEST_ATTRS: dict[str, str] = {
    "logprob_start_len": "int",  # SGLang's: the prompt's token logprobs from this position on
}

# How the op's value is made from its text (applied by the interpreter once the call finished).
VALUE_ATTRS: dict[str, str] = {
    # separate_reasoning: the value is the final answer (``ir.reasoning``: a format of FORMATS),
    # ``<name>_reasoning_content`` the reasoning, and the op appends the answer, not its text
    "reasoning": "str",
}

GEN_ATTRS: dict[str, str] = {
    **SAMPLING_ATTRS,
    **CONSTRAINT_ATTRS,
    **META_ATTRS,
    **REQUEST_ATTRS,
    **VALUE_ATTRS,
}
SELECT_ATTRS: dict[str, str] = {
    **VALUE_ATTRS,
    "choices": "str[]",
    "choices_method": "str",
    # the program's choices with their repeats, as indices into the distinct ``choices`` (only
    # when a choice repeats): a select's meta info has one entry per choice as the program gave it
    "choices_given": "int[]",
    "trie": "dict[]",  # select-trie: [{parent = int, text = str}, ...]
    "trie_ends": "int[]",  # select-trie: trie node where each choice ends
    "score": "str",  # select-trie: "batched" = all choices in one extend
}
JOIN_ATTRS: dict[str, str] = {"mode": "str"}
JOIN_MODES = ("gather", "concat")
GEN_CHAIN_ATTRS: dict[str, str] = {"segments": "dict[]"}

# The chat roles a program may open (the DSL's system / user / assistant helpers).
ROLES = ("system", "user", "assistant")
# How a select scores its choices (the DSL's select(..., choices_method=...)).
CHOICES_METHODS = (
    "token_length_normalized",
    "greedy_token_selection",
    "unconditional_likelihood_normalized",
    "sum_logprob",
)
# Lists and dicts nest at most this deep; real attributes nest 3 deep (gen.chain segments).
MAX_ATTR_DEPTH = 64
# An int of fewer bits than this always converts to text, whatever Python's digit limit.
_SAFE_INT_BITS = 4000


def normalize_attr(value: object, where: str = "attribute", depth: int = 0) -> AttrValue:
    """Return ``value`` in attribute normal form, or raise ``IRVerifyError`` saying why not.

    ``depth`` is how many lists and dicts enclose ``value`` (0 for an attribute's own value)."""
    # NOTE: subclasses (numpy.float64, an IntEnum, a str Enum) become the plain type: their repr
    # or str is not the IR's literal (``np.float64(0.5)``), and the printer writes plain values.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return value if type(value) is str else str.__str__(value)
    if isinstance(value, int):
        if not int_is_printable(value):
            raise IRVerifyError(
                f"{where}: the integer has more than {sys.get_int_max_str_digits()} digits, "
                "more than the IR can print; use a smaller number"
            )
        return value if type(value) is int else int(value)
    if isinstance(value, float):
        if math.isnan(value):
            raise IRVerifyError(f"{where}: NaN is not a valid attribute value; use a finite number")
        return value if type(value) is float else float(value)
    if isinstance(value, (list, tuple, Mapping)) and depth >= MAX_ATTR_DEPTH:
        raise IRVerifyError(
            f"{where}: lists and dicts nest more than {MAX_ATTR_DEPTH} deep; flatten the value"
        )
    if isinstance(value, (list, tuple)):
        return tuple(normalize_attr(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
    if isinstance(value, Mapping):
        out: dict[str, AttrValue] = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                raise IRVerifyError(f"{where}: dict keys must be non-empty strings, got {k!r}")
            out[k] = normalize_attr(v, f"{where}.{k}", depth + 1)
        return out
    raise IRVerifyError(
        f"{where}: {type(value).__name__} {value!r} is not an attribute value; "
        "use str, int, float, bool, list or dict (omit a key instead of passing None)"
    )


def normalize_attrs(attrs: Mapping[str, object], schema: Mapping[str, str] | None = None) -> Attrs:
    """Normalize a whole attribute dict.

    With ``schema``: an int given for a float key becomes a float, and one string given for a
    list-of-strings key (``stop="\\n"``) becomes a one-element list.
    """
    out: Attrs = {}
    for k, v in attrs.items():
        if not isinstance(k, str) or not k:
            raise IRVerifyError(f"attributes: keys must be non-empty strings, got {k!r}")
        out[k] = normalize_attr(v, f"attributes.{k}")
    if schema is not None:
        for k, v in out.items():
            if schema.get(k) == "float" and isinstance(v, int) and not isinstance(v, bool):
                out[k] = float(v)
            elif schema.get(k) == "str[]" and isinstance(v, str):
                out[k] = (v,)
    return out


def check_type(value: AttrValue, spec: str) -> bool:
    """True if ``value`` matches the type ``spec`` (see the module docstring)."""
    if spec == "any":
        return True
    if spec == "bool":
        return isinstance(value, bool)
    if spec == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec == "str":
        return isinstance(value, str)
    if spec == "dict":
        return isinstance(value, dict)
    if spec.endswith("[]"):
        return isinstance(value, tuple) and all(check_type(v, spec[:-2]) for v in value)
    raise ValueError(f"unknown attribute type spec {spec!r}")


def int_is_printable(value: int) -> bool:
    """True if ``str(value)`` works under Python's limit on int-to-text conversion."""
    if value.bit_length() < _SAFE_INT_BITS:  # every int of real programs: no conversion
        return True
    try:
        str(value)
    except ValueError:
        return False
    return True


def attr_value_problem(value: AttrValue) -> str | None:
    """Why ``value`` (built directly, not by ``normalize_attr``) cannot be printed and parsed back,
    or None: a NaN, an integer too long to print, lists and dicts nested deeper than
    ``MAX_ATTR_DEPTH``, a bad dict key, a non-attribute type. Iterative, so any depth is safe."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (bool, str)):
            continue
        if isinstance(v, int):
            if not int_is_printable(v):
                return f"an integer has more than {sys.get_int_max_str_digits()} digits; use a smaller number"
            continue
        if isinstance(v, float):
            if math.isnan(v):
                return "NaN is not a valid attribute value; use a finite number"
            continue
        if not isinstance(v, (tuple, dict)):
            return f"{type(v).__name__} {v!r:.60} is not an attribute value (lists must be tuples)"
        if depth >= MAX_ATTR_DEPTH:
            return f"lists and dicts nest more than {MAX_ATTR_DEPTH} deep; flatten the value"
        if isinstance(v, dict):
            bad = [k for k in v if not isinstance(k, str) or not k]
            if bad:
                return f"dict keys must be non-empty strings, got {bad[0]!r}"
            stack.extend((c, depth + 1) for c in v.values())
        else:
            stack.extend((c, depth + 1) for c in v)
    return None


def _finite(value: AttrValue) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sampling_problem(attrs: Mapping[str, AttrValue]) -> str | None:
    """What is wrong with the values of the sampling parameters in ``attrs`` (types already
    checked), or None. The ranges are the engine's (``executor.SamplingParams.validate``), so
    that IR the verifier accepts never fails when its request is built; the IR cannot import the
    executor, and a test keeps the two in step."""
    for key in ("max_tokens", "min_tokens", "top_logprobs_num"):
        v = attrs.get(key)
        if isinstance(v, int) and v < 0:
            return f"{key} must be >= 0, got {v!r}"
    low, high = attrs.get("min_tokens"), attrs.get("max_tokens")
    if isinstance(low, int) and isinstance(high, int) and low > high:
        return f"min_tokens ({low}) is larger than max_tokens ({high}); lower min_tokens or raise max_tokens"
    ranges = (
        # key, lowest, highest, lowest included, highest included, what it means
        ("temperature", 0.0, math.inf, True, False, ">= 0 (0 = greedy)"),
        ("top_p", 0.0, 1.0, False, True, "in (0, 1]"),
        ("min_p", 0.0, 1.0, True, True, "in [0, 1]"),
        ("frequency_penalty", -2.0, 2.0, True, True, "in [-2, 2]"),
        ("presence_penalty", -2.0, 2.0, True, True, "in [-2, 2]"),
        ("repetition_penalty", 0.0, math.inf, False, False, "> 0 (1 = off)"),
    )
    for key, lo, hi, lo_in, hi_in, want in ranges:
        if key not in attrs:
            continue
        v = attrs[key]
        ok = (
            _finite(v)
            and (lo <= v if lo_in else lo < v)  # type: ignore[operator]
            and (v <= hi if hi_in else v < hi)  # type: ignore[operator]
        )
        if not ok:
            return f"{key} must be finite and {want}, got {v!r}"
    seed = attrs.get("seed")
    if isinstance(seed, int) and not -(2**63) <= seed < 2**64:  # what torch's manual_seed takes
        return f"seed must be an integer in [-2**63, 2**64), got {seed!r}"
    stop = attrs.get("stop", ())
    if isinstance(stop, tuple) and "" in stop:
        return f"stop strings must not be empty, got {stop!r}"
    regexes = attrs.get("stop_regex", ())
    if isinstance(regexes, tuple) and regexes:
        from llmir_lang.errors import InvalidRequestError
        from llmir_lang.executor.sampling_params import SamplingParams

        try:
            SamplingParams(stop_regex=[str(r) for r in regexes])
        except InvalidRequestError as e:
            return str(e).removeprefix("invalid sampling parameter: ")
    ids = attrs.get("stop_token_ids", ())
    if isinstance(ids, tuple) and any(isinstance(t, int) and t < 0 for t in ids):
        return f"stop_token_ids must be token ids >= 0, got {ids!r}"
    return None


def constraint_problem(attrs: Mapping[str, AttrValue]) -> str | None:
    """Why a constraint in ``attrs`` (types already checked) cannot be used when its gen runs, or
    None: a regex or a schema ``pattern`` that does not parse, a ``json_schema`` that is not JSON,
    not a schema or uses what no engine enforces, a grammar that does not parse, bad choices.

    The run path's own code decides (``executor.constraints``: the ``spec_from_*`` builders the
    interpreter lowers a gen with, then ``ConstraintCompiler``), compiling without a model's
    tokenizer; what only a model's vocabulary decides (a constraint that admits no output, which
    fails its own gen when it runs) is left to the run. Cached per constraint, so a module verified
    again (after every pass, a batch of programs sharing a schema) compiles each one once."""
    for key in ("regex", "json_schema", "grammar", "choices"):
        value = attrs.get(key)
        if isinstance(value, str) or (isinstance(value, tuple) and all(isinstance(c, str) for c in value)):
            problem = _constraint_problem(key, value)
            if problem is not None:
                return problem
    return None


@functools.lru_cache(maxsize=256)
def _constraint_problem(key: str, value: str | tuple[str, ...]) -> str | None:
    try:
        from llmir_lang.executor import constraints as C
        from llmir_lang.executor.tokenizer import lone_surrogate
    except ImportError:  # no structured generation in this build: the gen reports it when it runs
        return None
    for item in value if isinstance(value, tuple) else (value,):
        bad = lone_surrogate(item)
        if bad is not None:  # the constraint compilers raise a bare UnicodeEncodeError on it
            return (
                f"{key} has a lone surrogate (U+{ord(bad.group()):04X}) at position {bad.start()}, "
                "which is not Unicode text; remove or replace it"
            )
    # what the run path refuses whatever the model: the text itself is wrong
    malformed = (
        C.InvalidRegexError,
        C.InvalidSchemaError,
        C.UnsupportedSchemaError,
        C.GrammarSyntaxError,
        C.InvalidChoicesError,
    )
    try:
        # a grammar is checked whole by its builder (a compile here would also refuse the special
        # tokens it names, which only the model's tokenizer has); choices become an escaped regex
        spec = getattr(C, f"spec_from_{key}")(list(value) if isinstance(value, tuple) else value)
        if key in ("regex", "json_schema"):
            _tokenizer_free_compiler().compile(spec)
    except malformed as e:
        verb = "is not valid" if key == "choices" else "does not compile"
        return f"{key} {verb} ({type(e).__name__}): {e}"
    except ConstraintError:
        # no output at all with these bytes, or an engine limit: the gen fails when it runs, with
        # the model's tokenizer and the engine the run picks (outlines-core may take a regex)
        return None
    return None


@functools.lru_cache(maxsize=1)
def _tokenizer_free_compiler() -> Any:
    """A ``ConstraintCompiler`` over a vocabulary of the 256 bytes (every text can be spelled),
    pinned to llguidance: parse errors and unsupported schema keywords do not depend on the
    model's tokenizer, and llguidance compiles in-process (outlines-core builds in a child)."""
    from llmir_lang.executor.constraints import ConstraintCompiler, TokenizerInfo

    info = TokenizerInfo([bytes([b]) for b in range(256)] + [b""], eos_token_ids=[256], scheme="bytes")
    return ConstraintCompiler(info, engine="llguidance")


def annotations_of(attrs: Mapping[str, AttrValue]) -> Attrs:
    """The optimizer annotations among ``attrs`` (keys of ``ANNOTATION_ATTRS``)."""
    return {k: v for k, v in attrs.items() if k in ANNOTATION_ATTRS}


def without_annotations(attrs: Mapping[str, AttrValue]) -> Attrs:
    """``attrs`` without the optimizer annotations."""
    return {k: v for k, v in attrs.items() if k not in ANNOTATION_ATTRS}
