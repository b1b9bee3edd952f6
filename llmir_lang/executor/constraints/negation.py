"""Complements of JSON subschemas, and disjointness of ``oneOf`` branches.

``negate(S)`` returns a schema valid exactly where ``S`` is invalid, built only from keywords
llguidance implements, or ``None`` when no such schema exists in that vocabulary (``pattern``,
``multipleOf``, string ``enum``...). A schema is the conjunction of its keywords, so its
complement is the ``anyOf`` of the complements of independent keyword groups (``properties``
with ``additionalProperties`` is one group; ``items`` with ``prefixItems`` another).

``pairwise_disjoint(branches)`` proves no instance can match two branches (different JSON types,
a required discriminator property with disjoint ``const``/``enum`` values, or a key one branch
requires and the other forbids); only then is ``oneOf`` the same as ``anyOf``.

``root`` is the document the ``#/...`` refs of the given subschemas point into, or None where
they point elsewhere (the subschema sits inside one with an ``$id`` of its own): a ref is then
left unresolved, and neither function proves anything through it.
"""

from __future__ import annotations

import json
from typing import Any

from llmir_lang.executor.constraints.schema_support import ANNOTATIONS
from llmir_lang.executor.constraints.schema_walk import (
    holds_resource,
    ref_ignores_siblings,
    resolve_in_root_resource,
    starts_resource,
)

ALL_TYPES = ("null", "boolean", "object", "array", "number", "string")
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
    if not isinstance(values, list):
        return None
    if not all(v is None or isinstance(v, bool) for v in values):
        return None  # the complement of a set of strings/numbers/objects has no keyword
    other = [t for t in ALL_TYPES if t not in ("boolean", "null")]
    left = [v for v in (True, False, None) if v not in values]
    types = list(other)
    if True not in values and False not in values:
        types.append("boolean")
        left = [v for v in left if not isinstance(v, bool)]
    if None not in values:
        types.append("null")
        left = [v for v in left if v is not None]
    branches: list[Any] = [{"type": types}]
    if left:
        branches.append({"enum": left})
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


# --- oneOf disjointness -------------------------------------------------------------------
def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _resolve(s: Any, root: Any, depth: int = 0) -> Any:
    while isinstance(s, dict) and "$ref" in s and depth < _MAX_DEPTH:
        target = resolve_in_root_resource(root, s["$ref"])
        if target is None:
            return s
        s = target
        depth += 1
    return s


def type_set(s: Any, root: Any, depth: int = 0) -> frozenset[str]:
    """JSON types ``s`` can match (integer counted as number); all types when unknown."""
    s = _resolve(s, root)
    every = frozenset(ALL_TYPES)
    if s is False:
        return frozenset()
    if not isinstance(s, dict) or depth > _MAX_DEPTH:
        return every
    out = every
    t = s.get("type")
    if isinstance(t, (str, list)):
        names = [t] if isinstance(t, str) else t
        out = frozenset("number" if n == "integer" else n for n in names if isinstance(n, str))
    if "const" in s:
        out &= {_json_type(s["const"])}
    if isinstance(s.get("enum"), list):
        out &= frozenset(_json_type(v) for v in s["enum"])
    for kw in ("anyOf", "oneOf"):
        if isinstance(s.get(kw), list):
            out &= frozenset().union(*(type_set(b, root, depth + 1) for b in s[kw]))
    if isinstance(s.get("allOf"), list):
        for b in s["allOf"]:
            out &= type_set(b, root, depth + 1)
    return out


def _members(s: Any, root: Any) -> list[dict[str, Any]]:
    """The branch and its allOf members (resolved): every one of them must hold."""
    s = _resolve(s, root)
    if not isinstance(s, dict):
        return []
    out = [s]
    for sub in s.get("allOf", []) if isinstance(s.get("allOf"), list) else []:
        out.extend(_members(sub, root))
    return out


def _required(s: Any, root: Any) -> set[str]:
    return {r for m in _members(s, root) for r in (m.get("required") or []) if isinstance(r, str)}


def _value_key(v: Any) -> Any:
    """``v`` with every number that equals an integer written as that integer: JSON Schema compares
    numbers by value, so ``1`` / ``1.0`` and ``0`` / ``-0.0`` are one value (their JSON texts are
    not the same, and disjoint texts made a ``oneOf`` whose branches overlap an ``anyOf``)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_value_key(x) for x in v]
    if isinstance(v, dict):
        return {k: _value_key(x) for k, x in v.items()}
    return v


def _values(s: Any, root: Any, name: str) -> set[str] | None:
    """Allowed JSON values of property ``name`` if some member pins it with const/enum."""
    found: set[str] | None = None
    for m in _members(s, root):
        props = m.get("properties")
        sub = _resolve(props.get(name), root) if isinstance(props, dict) and name in props else None
        if isinstance(sub, dict):
            vals = [sub["const"]] if "const" in sub else sub.get("enum")
            if isinstance(vals, list):
                keyed = {json.dumps(_value_key(v), sort_keys=True) for v in vals}
                found = keyed if found is None else found & keyed
    return found


def _forbids(s: Any, root: Any, name: str) -> bool:
    for m in _members(s, root):
        props = m.get("properties") if isinstance(m.get("properties"), dict) else {}
        if props.get(name) is False:
            return True
        if name not in props and m.get("additionalProperties") is False and not m.get("patternProperties"):
            return True
    return False


def _disjoint(a: Any, b: Any, root: Any) -> bool:
    ta, tb = type_set(a, root), type_set(b, root)
    if not ta & tb:
        return True
    if ta | tb != {"object"}:
        return False  # they share a non-object type, where object keywords do not apply
    ra, rb = _required(a, root), _required(b, root)
    for name in ra & rb:
        va, vb = _values(a, root, name), _values(b, root, name)
        if va is not None and vb is not None and not va & vb:
            return True
    return any(_forbids(b, root, n) for n in ra) or any(_forbids(a, root, n) for n in rb)


def pairwise_disjoint(branches: list[Any], root: Any) -> bool:
    """True if no instance can match two of ``branches``."""
    if any(holds_resource(b) for b in branches):
        return False  # their refs point into their own $id, not into root
    return all(
        _disjoint(branches[i], branches[j], root)
        for i in range(len(branches))
        for j in range(i + 1, len(branches))
    )
