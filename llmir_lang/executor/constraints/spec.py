"""What the DSL / IR hands to the engine: a hashable description of one output constraint.

A ``ConstraintSpec`` is plain data (kind + text), so it can live in the IR, be printed, compared
and used as a cache key. The builders below validate their input and raise typed errors before
anything reaches a model:

=====================  ====================================================================
builder                 what the generated text must be
=====================  ====================================================================
spec_from_regex         a full match of the regex (Rust ``regex`` syntax, Unicode classes)
spec_from_json_schema   a JSON document valid under the schema (dict, JSON text, bool, or a
                        pydantic model class); keys in the schema's ``properties`` order
spec_from_choices       exactly one of the strings
spec_from_dtype         an int / float / bool literal, or a JSON string literal for ``str``
spec_from_grammar       a sentence of the lark grammar, as lark reads it (``lark_checks``)
=====================  ====================================================================

``gated_by_reasoning(spec, tags)`` makes a spec that leaves a reasoning model's reasoning free
and constrains what follows its end tag (``ReasoningTags``; ``reasoning_gate.py``).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from llmir_lang.executor.constraints.errors import (
    GrammarSyntaxError,
    InvalidChoicesError,
    InvalidRegexError,
    InvalidSchemaError,
    UnknownDtypeError,
    UnsupportedGrammarError,
)

ConstraintKind = Literal["regex", "json_schema", "grammar", "choices"]
_KINDS = ("regex", "json_schema", "grammar", "choices")

# Whitespace between JSON tokens. One optional space accepts both compact output and Python's
# json.dumps default (", " / ": ") while keeping a model from padding with endless blanks.
DEFAULT_JSON_WHITESPACE = "[ ]?"


@dataclass(frozen=True, slots=True)
class ReasoningTags:
    """The tags of a reasoning format, as the constraint engine needs them (plain data: the
    executor knows no format names; ``ir.reasoning.gate_tags`` makes these from one).
    ``forced``: the output begins inside the reasoning (no start tag needed)."""

    start: str
    end: str
    forced: bool

    def __post_init__(self) -> None:
        if not (isinstance(self.start, str) and isinstance(self.end, str) and self.start and self.end):
            raise ValueError("ReasoningTags needs non-empty start and end tags (str)")


@dataclass(frozen=True, slots=True)
class ConstraintSpec:
    """A constraint on generated text; hashable and printable.

    ``value`` holds regex text, a canonical JSON schema (see ``canonical_schema_text``), lark
    grammar text, or a JSON list of choices. ``whitespace`` is a regex for the whitespace allowed
    between JSON tokens (json_schema only; ``None`` means ``DEFAULT_JSON_WHITESPACE``).
    ``reasoning``: the constraint covers only the answer after these reasoning tags' end tag
    (``gated_by_reasoning``); None: the whole output.
    """

    kind: ConstraintKind
    value: str
    whitespace: str | None = None
    reasoning: ReasoningTags | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}; expected one of {_KINDS}")
        if not isinstance(self.value, str):
            raise TypeError(f"ConstraintSpec.value must be str, got {type(self.value).__name__}")
        if self.whitespace is not None and self.kind != "json_schema":
            raise ValueError("whitespace applies only to json_schema constraints")
        if self.reasoning is not None and not isinstance(self.reasoning, ReasoningTags):
            got = type(self.reasoning).__name__
            raise TypeError(f"ConstraintSpec.reasoning must be ReasoningTags or None, got {got}")

    def describe(self, limit: int = 80) -> str:
        text = self.value if len(self.value) <= limit else self.value[: limit - 3] + "..."
        after = f" after {self.reasoning.end!r}" if self.reasoning is not None else ""
        return f"{self.kind}({text!r}){after}"


def spells_tag(spec: ConstraintSpec, tag: str) -> bool:
    """Whether the constraint's text holds ``tag`` (also written with backslash escapes, as a
    regex or a lark terminal writes ``<\\/think>``)."""
    return tag in spec.value or tag in re.sub(r"\\(.)", r"\1", spec.value)


def gated_by_reasoning(spec: ConstraintSpec, tags: ReasoningTags) -> ConstraintSpec:
    """``spec`` applied after the reasoning: tokens run free until the output holds ``tags.end``,
    then the constraint covers the answer (``reasoning_gate.py``).

    A constraint that itself spells the end tag (a regex ``<think>.*</think>\\d+``, a choice
    ``"<think>x</think>y"``) describes the whole output, reasoning included, and is returned as it
    is: gated, it would ask the answer to hold the reasoning's tags again. A JSON schema is always
    gated (a description or ``const`` that mentions the tag says nothing of the reasoning)."""
    if spec.kind != "json_schema" and spells_tag(spec, tags.end):  # no JSON value holds a reasoning
        return spec
    return ConstraintSpec(spec.kind, spec.value, spec.whitespace, tags)


def ungated(spec: ConstraintSpec) -> ConstraintSpec:
    """``spec`` over the whole output (its ``reasoning`` dropped)."""
    return ConstraintSpec(spec.kind, spec.value, spec.whitespace)


# --- regex --------------------------------------------------------------------------------
def spec_from_regex(pattern: str) -> ConstraintSpec:
    """Generated text must fully match ``pattern``. Syntax errors surface at compile time."""
    if not isinstance(pattern, str):
        raise InvalidRegexError(f"regex must be a string, got {type(pattern).__name__}")
    return ConstraintSpec("regex", pattern)


_RUST_META = set("\\.+*?()|[]{}^$#&-~")


def escape_regex(text: str) -> str:
    """Escape ``text`` so Rust's ``regex`` (outlines-core) and llguidance match it literally."""
    out = []
    for ch in text:
        if ch in _RUST_META:
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{{{ord(ch):X}}}")
        else:
            out.append(ch)
    return "".join(out)


# --- JSON schema --------------------------------------------------------------------------
# Maps whose key order is the order a generator emits object members: kept as written.
_ORDERED_MAPS = ("properties", "patternProperties")
_SCHEMA_MAPS = ("$defs", "definitions", "dependentSchemas")
_SCHEMA_VALUES = (
    "items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
    "additionalItems", "unevaluatedItems", "unevaluatedProperties",
)  # fmt: skip
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
# keywords that bring object members, in the order an output lists them: kept in written order
_MEMBER_KEYWORDS = frozenset(
    ("properties", "patternProperties", "anyOf", "oneOf", "allOf", "$ref", "if", "then", "else", "dependentSchemas")
)


def _canonical(node: Any) -> Any:
    """Keywords sorted, except that those whose members an object's output lists (``properties``,
    the combinators, ``$ref``, ...) come last in their written order: llguidance lists an object's
    members in keyword order, so sorting them would put an ``anyOf`` branch's members before the
    schema's own ``properties``. Member order of ``properties`` kept; definition maps sorted; data
    keywords untouched."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key in [*sorted(k for k in node if k not in _MEMBER_KEYWORDS), *(k for k in node if k in _MEMBER_KEYWORDS)]:
        val = node[key]
        if key in _ORDERED_MAPS and isinstance(val, dict):
            out[key] = {k: _canonical(v) for k, v in val.items()}
        elif key in _SCHEMA_MAPS and isinstance(val, dict):
            out[key] = {k: _canonical(val[k]) for k in sorted(val)}
        elif key in _SCHEMA_VALUES:
            out[key] = [_canonical(v) for v in val] if isinstance(val, list) else _canonical(val)
        elif key in _SCHEMA_LISTS and isinstance(val, list):
            out[key] = [_canonical(v) for v in val]
        elif key == "dependencies" and isinstance(val, dict):
            out[key] = {k: _canonical(val[k]) for k in sorted(val)}
        else:
            out[key] = val
    return out


def canonical_schema_text(schema: Any) -> str:
    """Canonical JSON text of a schema: keywords sorted (``_canonical``), ``properties`` order kept.

    Sorting every key (``sort_keys=True``) would also reorder ``properties``, which is the order
    the constrained output lists object members, and the keywords whose order decides where an
    ``anyOf`` / ``allOf`` branch's members go; those keep their written order.
    """
    return json.dumps(_canonical(schema), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def spec_from_json_schema(schema: Any, whitespace: str | None = None) -> ConstraintSpec:
    """Schema as a dict, JSON text, ``True``/``False``, or a type pydantic validates (a
    ``BaseModel`` subclass, a dataclass, a ``TypedDict``, ``list[Item]``, ...)."""
    from llmir_lang.executor.constraints.schema_pydantic import is_pydantic_type, pydantic_json_schema

    if is_pydantic_type(schema):
        # not model_json_schema(): its formats lose what the type's validation checks
        schema = pydantic_json_schema(schema)
    elif isinstance(schema, type):
        raise InvalidSchemaError(
            f"json_schema= got the class {schema.__name__}; pass a pydantic BaseModel subclass, a "
            "dataclass, a TypedDict, a dict, or JSON text"
        )
    elif isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidSchemaError(
                f"json_schema= text is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidSchemaError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    try:
        text = canonical_schema_text(schema)
    except (TypeError, ValueError) as e:
        raise InvalidSchemaError(f"the JSON schema cannot be serialized to JSON: {e}") from None
    return ConstraintSpec("json_schema", text, whitespace)


# --- choices ------------------------------------------------------------------------------
def spec_from_choices(choices: Sequence[str]) -> ConstraintSpec:
    """Generated text must be exactly one of ``choices`` (non-empty, distinct, non-empty strings)."""
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise InvalidChoicesError(
            f"choices must be a list of strings, got {type(choices).__name__}; wrap a single option in a list"
        )
    items = list(choices)
    if not items:
        raise InvalidChoicesError("choices is empty; give at least one option")
    bad = [c for c in items if not isinstance(c, str)]
    if bad:
        raise InvalidChoicesError(f"choices must all be strings, got {bad[0]!r}")
    if any(c == "" for c in items):
        raise InvalidChoicesError("choices contains an empty string; every option must spell something")
    seen: set[str] = set()
    dups = [c for c in items if c in seen or seen.add(c)]  # type: ignore[func-returns-value]
    if dups:
        raise InvalidChoicesError(f"choices has duplicates {sorted(set(dups))!r}; list each option once")
    return ConstraintSpec("choices", json.dumps(items, ensure_ascii=False))


def choices_of(spec: ConstraintSpec) -> list[str]:
    return list(json.loads(spec.value))


# --- dtype --------------------------------------------------------------------------------
_DTYPE_REGEX = {
    "int": r"-?(0|[1-9][0-9]*)",
    "float": r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?",
    "bool": r"(true|false|True|False)",
    "str": r'"([^"\\\x00-\x1F]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"',
}


def _dtype_name(dtype: Any) -> str:
    name = dtype if isinstance(dtype, str) else getattr(dtype, "__name__", None)
    if name not in _DTYPE_REGEX:
        raise UnknownDtypeError(
            f"unknown dtype {dtype!r}; use int, float, bool or str (or their names as strings)"
        )
    return name


def spec_from_dtype(dtype: Any) -> ConstraintSpec:
    """``int`` / ``float`` / ``bool`` / ``str`` (or their names) -> regex spec; see ``parse_dtype_value``."""
    return ConstraintSpec("regex", _DTYPE_REGEX[_dtype_name(dtype)])


def parse_dtype_value(dtype: Any, text: str) -> Any:
    """Turn text generated under ``spec_from_dtype(dtype)`` into the Python value."""
    name = _dtype_name(dtype)
    if name == "int":
        return int(text)
    if name == "float":
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text!r} overflows a float")
        return value
    if name == "bool":
        return text in ("true", "True")
    return json.loads(text)


# --- grammar ------------------------------------------------------------------------------
_LOCATION_PATTERNS = (
    re.compile(r"\bat (\d+)\((\d+)\)"),  # "at 1(8): unknown name"
    re.compile(r"^(\d+)\((\d+)\):", re.MULTILINE),  # "2(9): Expected token"
)


def grammar_error_location(message: str) -> tuple[int, int]:
    """(line, column), 1-based, from an llguidance lark error message; (0, 0) if absent."""
    for pat in _LOCATION_PATTERNS:
        m = pat.search(message)
        if m:
            return int(m.group(1)), int(m.group(2)) + 1
    return 0, 0


_GBNF_RULE = re.compile(r"^\s*[A-Za-z_][\w-]*\s*::=", re.MULTILINE)


# lark features llguidance refuses, by its message (or the grammar's text): the feature, and what
# to write instead ("" for no feature: a grammar without a start rule is just wrong)
_FEATURE_HINTS = (
    ("priority not supported", "priority", "priorities (name.2:) only pick among parse trees of "
     "one text in lark's Earley, so no text depends on them: remove the .N"),
    ("params not supported", "template", "templates (name{x}) are not supported: write each use "
     "out as a rule"),
    ("declare statement not supported", "%declare", "%declare is not supported: define the terminal"),
    ("no start rule", "", "the start symbol is the rule named 'start': name the top rule start"),
    ("Unknown common regex", "import", "only %import common.NAME is available (lark's common.lark, "
     "less _STRING_INNER / _STRING_ESC_INNER): define other terminals in the grammar"),
    ("%override", "%override", "%override is not supported: change the definition itself"),
    ("%extend", "%extend", "%extend is not supported: add the alternative to the rule itself"),
)  # fmt: skip


def grammar_error(text: str, message: str, detail: str) -> GrammarSyntaxError:
    """The error for grammar ``text`` that llguidance refused with ``message`` (shown as
    ``detail``): positioned, with what to do where that is known. A GBNF / EBNF grammar (``root
    ::= ...``, llama.cpp's and many tutorials') fails at its first ``::=`` with "Expected token
    '_'", which does not say that the dialect is the problem; a lark feature the engine lacks
    fails tersely, or (``%override``) as a syntax error: ``UnsupportedGrammarError`` naming it."""
    line, col = grammar_error_location(message)
    where = f" at line {line}, column {col}" if line else ""
    text_of = f"grammar error{where}: {detail}"
    if _GBNF_RULE.search(text):
        hint = (
            "grammar= takes lark syntax (rules 'start: ...'), and this looks like GBNF/EBNF "
            "('name ::= ...'): convert it with llguidance.gbnf_to_lark.gbnf_to_lark(text)"
        )
        return GrammarSyntaxError(f"{text_of}\nhint: {hint}", line, col)
    for needle, feature, hint in _FEATURE_HINTS:
        if needle in message or (needle.startswith("%") and re.search(rf"^\s*{needle}\b", text, re.M)):
            if feature:
                return UnsupportedGrammarError(f"{text_of}\nhint: {hint}", feature, line, col)
            return GrammarSyntaxError(f"{text_of}\nhint: {hint}", line, col)
    return GrammarSyntaxError(text_of, line, col)


def spec_from_grammar(text: str) -> ConstraintSpec:
    """A lark grammar (start symbol: the rule ``start``), checked now: by llguidance, and, when it
    is plain lark, against lark itself (``lark_checks``); the spec holds the text the engine is
    to enforce (``lark_checks.engine_grammar``)."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarSyntaxError("grammar= must be non-empty lark grammar text with a 'start' rule")
    return _grammar_spec(text)


@functools.lru_cache(maxsize=256)
def _grammar_spec(text: str) -> ConstraintSpec:
    """``spec_from_grammar`` of a text, once: a gen's grammar is read where the gen is written
    and again where it runs."""
    import llguidance

    from llmir_lang.executor.constraints.lark_checks import engine_grammar, lark_syntax_for_engine

    read = lark_syntax_for_engine(text)
    message = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(read))
    if message and not message.startswith("WARNING"):
        raise grammar_error(text, message, message.strip())
    return ConstraintSpec("grammar", engine_grammar(text))
