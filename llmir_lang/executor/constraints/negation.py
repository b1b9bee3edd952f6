"""Complements of JSON subschemas.

``negate(S)`` returns a schema valid exactly where ``S`` is invalid, built only from keywords
llguidance implements, or ``None`` when no such schema exists in that vocabulary (``pattern``,
``multipleOf``, an array or object ``enum``...). A schema is the conjunction of its keywords, so
its complement is the ``anyOf`` of the complements of independent keyword groups (``properties``
with ``additionalProperties`` is one group; ``items`` with ``prefixItems`` another).

The complement of ``const`` / ``enum`` values is taken type by type: the other strings are a
``pattern`` built from the values' trie, the other numbers the open intervals between the values
(numbers compare by value: ``1`` and ``1.0`` are one), the other booleans / null an ``enum``, and
every type without a value is admitted whole. As for any numeric bound, llguidance generates the
numbers of an interval in plain decimal notation (no exponent).

``root`` is the document the ``#/...`` refs of the given subschemas point into, or None where
they point elsewhere (the subschema sits inside one with an ``$id`` of its own): a ref is then
left unresolved, and nothing is negated through it.
"""

from __future__ import annotations

from typing import Any

from llmir_lang.executor.constraints.schema_disjoint import ALL_TYPES, json_type
from llmir_lang.executor.constraints.schema_support import ANNOTATIONS
from llmir_lang.executor.constraints.schema_walk import (
    ref_ignores_siblings,
    resolve_in_root_resource,
    starts_resource,
)

_MAX_DEPTH = 24
_GROUPS = (
    frozenset({"properties", "patternProperties", "additionalProperties", "unevaluatedProperties"}),
    frozenset({"items", "prefixItems", "additionalItems", "unevaluatedItems"}),
    frozenset({"contains", "minContains", "maxContains"}),
    frozenset({"if", "then", "else"}),
)
_IGNORED = ANNOTATIONS | {"format"}  # format is an annotation under 2020-12 validation


def negate(schema: Any, root: Any, depth: int = 0) -> Any | None:
    """The complement of ``schema`` (see module doc), or None."""
    if schema is True:
        return False
    if schema is False:
        return True
    if not isinstance(schema, dict) or depth > _MAX_DEPTH or starts_resource(schema):
        return None  # the refs inside a subschema with its own $id point into it, not into root
    if "$ref" in schema and ref_ignores_siblings(root):
        # NOTE: drafts 3-7 ignore every keyword beside $ref, so the complement is that of the ref
        # alone; negating the siblings too admitted values the validator rejects
        schema = {"$ref": schema["$ref"]}
    keys = {k: v for k, v in schema.items() if k not in _IGNORED}
    if not keys:
        return False
    parts: list[Any] = []
    for group in _split_groups(keys):
        neg = _negate_group(group, root, depth)
        if neg is None:
            return None
        if neg is True:
            return True
        if neg is not False:
            parts.append(neg)
    if not parts:
        return False
    return parts[0] if len(parts) == 1 else {"anyOf": parts}


def _split_groups(keys: dict[str, Any]) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    taken: set[str] = set()
    for members in _GROUPS:
        g = {k: v for k, v in keys.items() if k in members}
        if g:
            groups.append(g)
            taken |= set(g)
    groups.extend({k: v} for k, v in keys.items() if k not in taken)
    return groups


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _negate_group(g: dict[str, Any], root: Any, depth: int) -> Any | None:
    if len(g) > 1:
        return None  # interacting keywords (additionalProperties with properties, ...)
    ((key, val),) = g.items()
    if key == "$ref":
        target = resolve_in_root_resource(root, val)
        return None if target is None else negate(target, root, depth + 1)
    if key == "type":
        types = [val] if isinstance(val, str) else list(val) if isinstance(val, list) else None
        if types is None or ("integer" in types and "number" not in types):
            return None  # "not integer" includes non-integral numbers: no type names that
        rest = [t for t in ALL_TYPES if t not in types]
        return {"type": rest} if rest else False
    if key == "required" and isinstance(val, list):
        if not val:
            return False
        absent = [{"properties": {name: False}} for name in val]
        return {"type": "object", **(absent[0] if len(absent) == 1 else {"anyOf": absent})}
    if key in ("enum", "const"):
        return _negate_values(val if key == "enum" else [val])
    if key == "not":
        return val
    if key in ("anyOf", "allOf") and isinstance(val, list) and val:
        negs = [negate(s, root, depth + 1) for s in val]
        if any(n is None for n in negs):
            return None
        return {"allOf" if key == "anyOf" else "anyOf": negs}
    if key == "properties" and isinstance(val, dict):
        branches = []
        for name, sub in val.items():
            neg = negate(sub, root, depth + 1)
            if neg is None:
                return None
            if neg is not False:
                branches.append({"required": [name], "properties": {name: neg}})
        if not branches:
            return False
        return {"type": "object", "anyOf": branches}
    return _negate_bound(key, val)


_BOUNDS = {
    "minimum": ("number", "exclusiveMaximum", 0),
    "maximum": ("number", "exclusiveMinimum", 0),
    "exclusiveMinimum": ("number", "maximum", 0),
    "exclusiveMaximum": ("number", "minimum", 0),
    "minLength": ("string", "maxLength", -1),
    "maxLength": ("string", "minLength", 1),
    "minItems": ("array", "maxItems", -1),
    "maxItems": ("array", "minItems", 1),
    "minProperties": ("object", "maxProperties", -1),
    "maxProperties": ("object", "minProperties", 1),
}


def _negate_bound(key: str, val: Any) -> Any | None:
    if key == "uniqueItems" and val is False:
        return False
    spec = _BOUNDS.get(key)
    if spec is None or not _num(val):
        return None  # draft-4 boolean exclusiveMinimum, pattern, multipleOf, ...: inexpressible
    kind, opposite, shift = spec
    if shift == 0:
        return {"type": kind, opposite: val}
    if shift < 0 and val <= 0:
        return False  # "at least 0" always holds
    count = int(val) + shift if float(val).is_integer() else int(val) + (0 if shift < 0 else 1)
    return {"type": kind, opposite: count}


def _negate_values(values: Any) -> Any | None:
    """The complement of a finite set of JSON values, type by type: a type none of them has is
    admitted whole; booleans and null left over as an ``enum``; other numbers as the open
    intervals between them; other strings as a ``pattern`` (``_other_strings``). None when a value
    is an array or an object (no keyword says "any array but these"), or the set is too large."""
    if not isinstance(values, list) or len(values) > _MAX_VALUES:
        return None
    kinds = {json_type(v) for v in values}
    if kinds & {"array", "object"}:
        return None
    branches: list[Any] = [{"type": [t for t in ALL_TYPES if t not in kinds]}]
    # by identity and type: True == 1 in Python, not in JSON
    left = [v for v in (True, False, None) if json_type(v) in kinds and not any(_same(v, x) for x in values)]
    if left:
        branches.append({"enum": left})
    numbers = sorted({v for v in values if json_type(v) == "number"})  # 1 and 1.0 are one value
    if numbers:
        branches.append({"type": "number", "exclusiveMaximum": numbers[0]})
        for low, high in zip(numbers, numbers[1:]):
            branches.append({"type": "number", "exclusiveMinimum": low, "exclusiveMaximum": high})
        branches.append({"type": "number", "exclusiveMinimum": numbers[-1]})
    strings = {v for v in values if isinstance(v, str)}
    if strings:
        pattern = _other_strings(strings)
        if pattern is None:
            return None
        branches.append({"type": "string", "pattern": pattern})
    if not branches[0]["type"]:
        branches.pop(0)
    if not branches:
        return False
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def _same(scalar: bool | None, value: Any) -> bool:
    return value is scalar if scalar is None else isinstance(value, bool) and value == scalar


# --- strings other than a few -------------------------------------------------------------
_MAX_VALUES = 64
_MAX_WORD_CHARS = 256  # the strings' characters together (the pattern grows by ~60 a character)
_ANY = "(?s:.)"


def _char(c: str) -> str:
    return c if c.isascii() and (c.isalnum() or c == "_") else f"\\x{{{ord(c):x}}}"


def _other_then_any(chars: set[str]) -> str:
    """The regex alternative of the strings whose first character is not one of ``chars``.

    NOTE: llguidance lets '"' and '\\' through such a class (it holds every control character);
    ``schema_pattern_nul`` sets its U+0000 apart when the schema is rewritten, after this."""
    if not chars:
        return f"{_ANY}{_ANY}*"
    return "[^" + "".join(f"\\x{{{ord(c):x}}}" for c in sorted(chars)) + f"]{_ANY}*"


def _other_strings(words: set[str]) -> str | None:
    """An anchored ``pattern`` matching exactly the strings not in ``words``: at each node of the
    words' trie, the end of the string (where no word ends there), a character no word continues
    with and then anything, or a character some word continues with and the rest from there."""
    if sum(len(w) for w in words) > _MAX_WORD_CHARS:
        return None
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for c in word:
            node = node.setdefault(c, {})
        node[""] = {}  # a word ends here

    def other(node: dict[str, Any]) -> str:
        nexts = sorted(c for c in node if c)
        alts = [_other_then_any(set(nexts))] + [_char(c) + other(node[c]) for c in nexts]
        return "(?:" + "|".join(alts) + ")" + ("" if "" in node else "?")

    return "^" + other(trie) + "$"
