"""Checks on a JSON schema before (and after) llguidance reads it.

- ``imprecise_integer``: llguidance reads every JSON number of a schema as a 64-bit float, so an
  integer beyond ±2**53 in ``const`` / ``enum`` / a bound / ``multipleOf`` is rounded there and
  the constraint admits a different number (``{"const": 9007199254740993}`` generated
  ``9007199254740992``). Such schemas are refused before compiling; integers up to ±2**53 are
  exact in a float and compile as before.
- ``exact_float_grammar``: llguidance reads the numbers of its grammar text with a fast JSON
  reader that can land on a neighbouring float when a float needs 16 or 17 significant digits
  (``{"const": 1.4000000000000001}`` generated ``1.4``). Each such float is written into the
  grammar as a text llguidance reads exactly (asked of llguidance itself); one with no such
  text in a ``const`` / ``enum`` / bound / ``multipleOf`` is refused, naming keyword and path.
- ``inexact_written_float``: llguidance writes a number as its shortest digits in plain notation
  (``1e23`` as ``100000000000000000000000``). Below 2**53 that text reads back as the float; an
  integral float beyond it can come out as a JSON integer of another value (the float ``1e23`` is
  99999999999999991611392), which a validator comparing numbers exactly, as ``jsonschema`` does,
  rejects. A ``const`` / ``enum`` float llguidance would write so is refused, naming keyword and
  path; no schema text makes llguidance write such a float another way.
- ``repeatable_min_properties``: llguidance counts member names as written, and lets a name that
  ``additionalProperties`` / ``patternProperties`` admit come twice (``{"x":1,"x":2}``), which a
  JSON reader (``json``, so ``jsonschema``; pydantic) keeps as one member. So a ``minProperties``
  that only such names can reach was met by repeats: ``{"type": "object", "minProperties": 2}``
  generated ``{"x":1,"x":2}``, one property to the validator. Such a bound is refused, naming it
  (and a ``maxProperties`` under ``not``, whose complement is one); one the ``required`` names
  reach alone (or of 1: any member counts) compiles as before.
- ``costly_multiple_of``: llguidance builds a ``multipleOf`` from the step's significant digits, in
  time that grows faster than their value (a 6-digit prime step 1.4 s, 7 digits 12 s, 9 digits for
  over 4 minutes, blocking the submitting thread): a step past ``MULTIPLE_OF_MAX_SIGNIFICAND`` is
  refused before it is built.
- ``metaschema_error``: whether the schema itself is invalid (against the metaschema of the draft
  it declares, else 2020-12, allowing older drafts' forms of keywords that changed), naming the
  keyword and the path; used to type llguidance's errors about malformed keyword values.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from typing import Any

from llmir_lang.executor.constraints.errors import InvalidSchemaError, UnsupportedSchemaError
from llmir_lang.executor.constraints.schema_walk import (
    SCHEMA_LISTS,
    SCHEMA_MAPS,
    SCHEMA_SINGLE,
    iter_subschemas,
)

# Every integer of absolute value <= 2**53 is exact in a 64-bit float; 2**53 + 1 is the first
# that is not, and llguidance prints the float back, so nothing above is safe.
F64_EXACT_INT = 2**53
NUMERIC_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_VALUE_KEYWORDS = ("const", "enum")


def _scalars(value: Any) -> Iterator[Any]:
    """The scalars anywhere in a JSON value (inside objects and arrays)."""
    if isinstance(value, list):
        for v in value:
            yield from _scalars(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _scalars(v)
    else:
        yield value


def _big_ints(value: Any) -> Iterator[int]:
    """The integers of absolute value over 2**53 anywhere in a JSON value (objects, arrays)."""
    return (
        v
        for v in _scalars(value)
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > F64_EXACT_INT
    )


def imprecise_integer(schema: Any) -> UnsupportedSchemaError | None:
    """An error naming the first ``const`` / ``enum`` / bound / ``multipleOf`` (at any depth)
    holding an integer a 64-bit float cannot hold exactly, or None."""
    for path, node in iter_subschemas(schema):
        for kw in (*_VALUE_KEYWORDS, *NUMERIC_BOUNDS, "multipleOf"):
            if kw not in node:
                continue
            big = next(_big_ints(node[kw]), None)
            if big is None:
                continue
            if kw in _VALUE_KEYWORDS:
                advice = (
                    'for big ids, make the field a string (e.g. {"type": "string", "pattern": '
                    '"^-?[0-9]+$"}, or a string const/enum) and convert after parsing'
                )
            else:
                advice = f"remove the {kw}, or bring it within ±{F64_EXACT_INT}; for big ids, use a string with a pattern"
            return UnsupportedSchemaError(
                f"{kw!r} at {path} holds the integer {big}, beyond ±2**53 ({F64_EXACT_INT}): the "
                "JSON-schema engine reads schema numbers as 64-bit floats and would round it, so the "
                f"output could violate the schema; {advice}",
                keyword=kw,
                path=path,
            )
    return None


# the largest significand (the step's digits without its trailing zeros) llguidance builds a
# multipleOf of in well under a second (99991: 0.4 s; 300007: 1.4 s; 1234567: 12 s)
MULTIPLE_OF_MAX_SIGNIFICAND = 100_000


def costly_multiple_of(schema: Any) -> UnsupportedSchemaError | None:
    """An error naming the first ``multipleOf`` whose step has a significand past
    ``MULTIPLE_OF_MAX_SIGNIFICAND`` (module doc), or None."""
    for path, node in iter_subschemas(schema):
        step = node.get("multipleOf")
        if (
            isinstance(step, bool)
            or not isinstance(step, (int, float))
            or not math.isfinite(step)
            or step <= 0
        ):
            continue  # not a step (the metaschema check names those)
        digits = Decimal(str(step)).normalize().as_tuple().digits
        significand = int("".join(map(str, digits)))
        if significand > MULTIPLE_OF_MAX_SIGNIFICAND:
            return UnsupportedSchemaError(
                f"'multipleOf' at {path} is {step!r}: the JSON-schema engine builds a multiple-of check "
                f"in time that grows with the step's significant digits ({significand} is past "
                f"{MULTIPLE_OF_MAX_SIGNIFICAND}; such a step takes minutes); remove the multipleOf and "
                "check the value after parsing, or use a step with fewer significant digits",
                keyword="multipleOf",
                path=path,
            )
    return None


def _counted_objects(node: Any, path: str, negated: bool) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(path, subschema, whether an odd number of ``not`` holds it) for every object subschema."""
    if not isinstance(node, dict):
        return
    yield path, node, negated
    for key, val in node.items():
        if key in SCHEMA_MAPS and isinstance(val, dict):
            for name, sub in val.items():
                yield from _counted_objects(sub, f"{path}/{key}/{_escape(name)}", negated)
        elif key in SCHEMA_LISTS and isinstance(val, list):
            for i, sub in enumerate(val):
                yield from _counted_objects(sub, f"{path}/{key}/{i}", negated)
        elif key in SCHEMA_SINGLE:
            yield from _counted_objects(val, f"{path}/{key}", negated != (key == "not"))


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def repeatable_min_properties(schema: Any) -> UnsupportedSchemaError | None:
    """An error naming the first lower bound on the number of properties (at any depth) above 1
    and above the number of names its ``required`` lists, in an object that admits other names
    (module doc), or None. Under ``not`` the bound is ``maxProperties``: its complement is one."""
    for path, node, negated in _counted_objects(schema, "#", False):
        keyword = "maxProperties" if negated else "minProperties"
        bound = node.get(keyword)
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            continue
        least = bound + 1 if negated else bound
        required = node.get("required") if not negated else None
        names = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
        closed = node.get("additionalProperties") is False and not node.get("patternProperties")
        if least <= max(len(names), 1) or closed:
            continue
        under_not = " (under 'not', a lower bound)" if negated else ""
        return UnsupportedSchemaError(
            f"{keyword!r} at {path}{under_not} asks for more properties ({least:g}) than "
            f"'required' names ({len(names)}): the JSON-schema engine could reach the count by "
            'repeating a property name (\'{"x": 1, "x": 2}\'), which a JSON reader keeps as one '
            "property, so the output could have fewer properties than required; list the "
            f"properties the object needs in 'properties' and 'required', or remove {keyword}",
            keyword=keyword,
            path=path,
        )
    return None


# --- floats as texts llguidance reads exactly -------------------------------------------------
# llguidance's reader turns a number text into its digits as an integer (rounded to a float past
# 2**53) times or divided by a power of ten: exact when both are exact (digits up to 2**53, powers
# up to 10**22), as for every float whose shortest text has at most 15 digits and a small
# exponent. Otherwise the result can be a neighbouring float, so those texts are checked.
_EXACT_POW10 = 22
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?')


def _floats(value: Any) -> Iterator[float]:
    """The floats anywhere in a JSON value (objects, arrays)."""
    return (v for v in _scalars(value) if isinstance(v, float))


@functools.lru_cache(maxsize=4096)
def _llguidance_writes(text: str) -> str | None:
    """The text llguidance generates for the JSON number ``text`` as a ``const``, or None."""
    from llmir_lang.executor.constraints.llguidance_backend import grammar_forced_text

    return grammar_forced_text('{"grammars":[{"json_schema":{"const":' + text + "}}]}") or None


def _llguidance_reads(text: str) -> float | None:
    """The float llguidance makes of the JSON number ``text`` (read back from the text it
    generates for it as a ``const``), or None."""
    forced = _llguidance_writes(text)
    try:
        return float(forced) if forced else None
    except ValueError:
        return None


def _exact_float_text(value: float) -> str | None:
    """A JSON number text llguidance reads as exactly ``value``: its shortest text, else an
    integer of 17 to 19 digits (a float next to ``value`` times a power of ten) with an exponent,
    texts that every correctly rounding reader also reads as ``value`` first; None when none is."""
    shortest = json.dumps(value)
    if _llguidance_reads(shortest) == value:
        return shortest
    sign, magnitude = "-" if value < 0 else "", abs(value)
    candidates = []
    for digits in (17, 18, 19):
        shift = digits - 1 - math.floor(math.log10(magnitude))
        near = float(Fraction(magnitude) * Fraction(10) ** shift)
        below = above = near
        steps = [near]
        for _ in range(3):
            below, above = math.nextafter(below, 0.0), math.nextafter(above, math.inf)
            steps += [below, above]
        candidates += [f"{sign}{int(s)}e{-shift}" for s in steps if s.is_integer() and 0 < s < 2**64]
    candidates.sort(key=lambda text: float(text) != value)
    return next((text for text in candidates if _llguidance_reads(text) == value), None)


def _inexact_float_error(schema: Any, value: float) -> UnsupportedSchemaError | None:
    for path, node in iter_subschemas(schema):
        for kw in (*_VALUE_KEYWORDS, *NUMERIC_BOUNDS, "multipleOf"):
            if kw in node and any(f == value for f in _floats(node[kw])):
                return UnsupportedSchemaError(
                    f"{kw!r} at {path} holds the number {value!r}, which the JSON-schema engine cannot "
                    "read exactly (it would round it to a neighbouring float, so the output could "
                    "violate the schema); write it with at most 15 significant digits, or make the "
                    "field a string",
                    keyword=kw,
                    path=path,
                )
    return None


def exact_float_grammar(grammar: str, schema: Any) -> str:
    """``grammar`` (llguidance's JSON text for a JSON-schema grammar) with every float written as
    a text llguidance reads as exactly that float. ``UnsupportedSchemaError`` (keyword, path) when a
    float of a ``const`` / ``enum`` / bound / ``multipleOf`` of ``schema`` has no such text; one
    elsewhere (a ``default``) is left as it is."""

    def exact(m: re.Match[str]) -> str:
        text, whole, fraction, exponent = m.group(0, 1, 2, 3)
        if whole is None or (fraction is None and exponent is None):
            return text  # a string, or an integer (read exactly up to 64 bits)
        digits = whole + (fraction or "")[1:]
        power = int(exponent[1:] if exponent else 0) - len((fraction or "")[1:])
        if len(digits) <= 16 and int(digits) <= F64_EXACT_INT and abs(power) <= _EXACT_POW10:
            return text
        value = float(text)
        found = _exact_float_text(value)
        if found is not None:
            return found
        error = _inexact_float_error(schema, value)
        if error is not None:
            raise error
        return text

    return _JSON_TOKEN.sub(exact, grammar)


def _written_inexactly(value: float) -> str | None:
    """The text llguidance generates for ``value`` when Python's ``json`` (so ``jsonschema``) reads
    it as another number; None when it reads as ``value`` (or llguidance cannot hold ``value`` at
    all, which ``exact_float_grammar`` reports)."""
    if abs(value) < F64_EXACT_INT:
        return None  # a fraction in shortest digits, or an integer a float holds exactly
    text = _exact_float_text(value)
    written = _llguidance_writes(text) if text is not None else None
    if written is None:
        return None
    try:
        same = json.loads(written) == value  # an int compares with a float by exact value
    except ValueError:
        same = False
    return None if same else written


def _clip_digits(integer: str) -> str:
    digits = len(integer.lstrip("-"))
    return integer if digits <= 24 else f"{integer[:21]}... ({digits} digits)"


def inexact_written_float(schema: Any) -> UnsupportedSchemaError | None:
    """An error naming the first ``const`` / ``enum`` (at any depth) holding a float that llguidance
    would generate as a text of another value (module doc), or None. Bounds and ``multipleOf``
    are not generated as literals, and annotations are not enforced: neither is checked."""
    for path, node in iter_subschemas(schema):
        for kw in _VALUE_KEYWORDS:
            for value in _floats(node[kw]) if kw in node else ():
                written = _written_inexactly(value)
                if written is None:
                    continue
                return UnsupportedSchemaError(
                    f"{kw!r} at {path} holds the number {value!r}, which the JSON-schema engine can "
                    f"only generate as the integer {_clip_digits(written)}: a JSON reader takes that "
                    f"for another number than this float ({_clip_digits(str(int(value)))}), so the "
                    "output would violate the schema; "
                    f"use a number within ±2**53 ({F64_EXACT_INT}), or make the field a string",
                    keyword=kw,
                    path=path,
                )
    return None


# --- the schema against its metaschema -------------------------------------------------------
def _pointer(parts: list[Any]) -> str:
    return "#" + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _keyword_at(schema: Any, location: list[Any]) -> tuple[str, str]:
    """(keyword, path of the subschema holding it) for a location inside a schema: the last
    keyword on the way down, read as keywords, names and indexes are (a property called
    ``minLength`` is a name)."""
    keyword, holder = "", "#"
    node: Any = schema
    state = "schema"  # what ``node`` is: a schema, a map of schemas, a list of schemas, data
    for i, part in enumerate(location):
        if state == "schema":
            if not isinstance(node, dict) or part not in node:
                break
            keyword, holder = str(part), _pointer(location[:i])
            node = node[part]
            if part in SCHEMA_MAPS and isinstance(node, dict):
                state = "map"
            elif part in SCHEMA_LISTS and isinstance(node, list):
                state = "list"
            elif part in SCHEMA_SINGLE:
                state = "schema"
            else:
                state = "data"
        elif state in ("map", "list"):
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                break
            state = "schema" if isinstance(node, (dict, bool)) else "data"
        else:
            break
    return keyword, holder


# Keywords whose form changed between drafts: what 2020-12 rejects here an older draft allows
# (``exclusiveMinimum: true`` and tuple ``items: [...]`` in draft 4, ``dependencies``...).
_DRAFT_DEPENDENT = frozenset(
    {"exclusiveMinimum", "exclusiveMaximum", "items", "additionalItems", "dependencies", "id", "definitions"}
)


def metaschema_error(schema: Any) -> InvalidSchemaError | None:
    """``InvalidSchemaError`` naming keyword and path when ``schema`` is not a valid JSON Schema
    (``format`` not checked: a ``pattern`` in Rust syntax need not be a Python regex); None when
    it is, or when this cannot be told (jsonschema's own recursion limit on a deep schema).

    A schema that declares a known ``$schema`` is checked against that draft. One that declares
    none (or an unknown one) is checked against 2020-12, and a fault at a keyword whose form
    changed between drafts (``exclusiveMinimum: true`` of draft 4) counts only when drafts 7
    and 4 find the schema invalid too."""
    try:
        from jsonschema import validators
        from jsonschema.exceptions import best_match

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            declared = validators.validator_for(schema, default=None)  # type: ignore[arg-type]
        cls = declared or validators.Draft202012Validator
        errors = [
            (e, _keyword_at(schema, list(e.absolute_path))) for e in cls(cls.META_SCHEMA).iter_errors(schema)
        ]
        if not errors:
            return None
        if declared is None:
            plain = [e for e in errors if e[1][0] not in _DRAFT_DEPENDENT]
            if not plain:
                for older in (validators.Draft7Validator, validators.Draft4Validator):
                    if next(older(older.META_SCHEMA).iter_errors(schema), None) is None:
                        return None
            errors = plain or errors
        first = best_match(e for e, _ in errors)
    except Exception:  # RecursionError on very deep schemas, referencing errors: cannot tell
        return None
    if first is None:
        return None
    location = list(first.absolute_path)
    keyword, path = _keyword_at(schema, location)
    return InvalidSchemaError(
        f"the JSON schema is invalid at {_pointer(location)}"
        + (f" (keyword {keyword!r} of the subschema at {path})" if keyword else "")
        + f": {first.message}; fix the value to what the JSON Schema specification allows",
        keyword=keyword,
        path=path,
    )


# --- what llguidance cannot even read --------------------------------------------------------
def _find_int(value: Any, wanted: int, parts: list[Any]) -> list[Any] | None:
    if isinstance(value, int) and not isinstance(value, bool) and value == wanted:
        return parts
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        found = _find_int(sub, wanted, [*parts, key])
        if found is not None:
            return found
    return None


def unreadable_schema_error(message: str, schema: Any) -> InvalidSchemaError | UnsupportedSchemaError:
    """The error for llguidance refusing to read a schema at all (a ``ValueError`` from
    ``grammar_from_json_schema``): an integer too large for 64 bits (in ``maxLength``, a
    ``default``...) is named with its place; anything else stays an ``InvalidSchemaError``."""
    m = re.search(r"not JSON serializable: (-?[0-9]+)\b", message)
    location = _find_int(schema, int(m.group(1)), []) if m else None
    if m is None or location is None:
        return InvalidSchemaError(f"the JSON schema is not usable: {message}")
    keyword, path = _keyword_at(schema, location)
    return UnsupportedSchemaError(
        f"the integer {m.group(1)} at {_pointer(location)} is too large for the JSON-schema engine "
        "to read (over 64 bits); remove it or use a smaller value (or a string, for big ids)",
        keyword=keyword,
        path=path,
    )
