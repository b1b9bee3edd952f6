"""Proofs that no value matches two JSON subschemas (so a ``oneOf`` of them is an ``anyOf``).

Two subschemas are proved disjoint type by type (``disjoint``): on each JSON type both can match
(of those a ``domain`` admits, the types the ``oneOf``'s own subschema leaves), by the values they
are pinned to (``const`` / ``enum``: ``{"enum": ["a"]}`` and ``{"enum": ["b"]}``), and on objects
also by a property both require with disjoint ``const`` / ``enum`` values (a discriminator) or a
name one requires and the other forbids. ``admits_every_non_object`` proves a subschema holds
object keywords alone, ``type_implied`` that a ``type`` beside ``anyOf`` / ``oneOf`` adds nothing
to its branches. Every proof is sound, not complete: False means "not proved".

``root`` is the document the ``#/...`` refs point into, or None where they point elsewhere (the
subschema sits inside one with an ``$id`` of its own): a ref is then left unresolved, and nothing
is proved through it, nor through a subschema that holds an ``$id`` of its own.
"""

from __future__ import annotations

import json
from typing import Any

from llmir_lang.executor.constraints.schema_support import ANNOTATIONS
from llmir_lang.executor.constraints.schema_walk import (
    holds_resource,
    ref_ignores_siblings,
    resolve_in_root_resource,
)

ALL_TYPES = ("null", "boolean", "object", "array", "number", "string")
_MAX_DEPTH = 24
# keywords that constrain objects only: every other value satisfies them
_OBJECT_ONLY = frozenset(
    {
        "properties", "patternProperties", "additionalProperties", "required", "minProperties",
        "maxProperties", "dependencies", "dependentRequired", "dependentSchemas", "propertyNames",
        "unevaluatedProperties",
    }
)  # fmt: skip


def json_type(v: Any) -> str:
    """The JSON Schema type name of a JSON value (``1.0`` and ``1`` are both "number")."""
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
        out &= {json_type(s["const"])}
    if isinstance(s.get("enum"), list):
        out &= frozenset(json_type(v) for v in s["enum"])
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


def _pinned(s: Any, root: Any) -> set[str] | None:
    """The JSON values (keyed) ``s`` admits at most, when some member pins them with
    ``const`` / ``enum``; None when none does."""
    found: set[str] | None = None
    for m in _members(s, root):
        vals = [m["const"]] if "const" in m else m.get("enum")
        if isinstance(vals, list):
            keyed = {json.dumps(_value_key(v), sort_keys=True) for v in vals}
            found = keyed if found is None else found & keyed
    return found


def _values(s: Any, root: Any, name: str) -> set[str] | None:
    """Allowed JSON values of property ``name`` if some member pins it with const/enum."""
    found: set[str] | None = None
    for m in _members(s, root):
        props = m.get("properties")
        if isinstance(props, dict) and name in props:
            keyed = _pinned(props[name], root)
            if keyed is not None:
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


def _objects_disjoint(a: Any, b: Any, root: Any) -> bool:
    ra, rb = _required(a, root), _required(b, root)
    for name in ra & rb:
        va, vb = _values(a, root, name), _values(b, root, name)
        if va is not None and vb is not None and not va & vb:
            return True
    return any(_forbids(b, root, n) for n in ra) or any(_forbids(a, root, n) for n in rb)


def disjoint(a: Any, b: Any, root: Any, domain: frozenset[str]) -> bool:
    """True if no value of a type in ``domain`` can match both ``a`` and ``b``."""
    shared = type_set(a, root) & type_set(b, root) & domain
    if not shared:
        return True
    va, vb = _pinned(a, root), _pinned(b, root)
    if va is not None and vb is not None and not va & vb:
        return True
    # object keywords say nothing of other types: those must not be shared at all
    return shared == {"object"} and _objects_disjoint(a, b, root)


def pairwise_disjoint(branches: list[Any], root: Any, domain: frozenset[str] | None = None) -> bool:
    """True if no instance (of a type in ``domain``, all types by default) can match two of
    ``branches``."""
    if any(holds_resource(b) for b in branches):
        return False  # their refs point into their own $id, not into root
    types = frozenset(ALL_TYPES) if domain is None else domain
    return all(
        disjoint(branches[i], branches[j], root, types)
        for i in range(len(branches))
        for j in range(i + 1, len(branches))
    )


def admits_every_non_object(s: Any, root: Any, depth: int = 0) -> bool:
    """True when ``s`` is proved to match every value that is not an object: it holds object
    keywords and annotations only (through ``$ref`` and ``allOf``)."""
    if s is True:
        return True
    if not isinstance(s, dict) or depth > _MAX_DEPTH:
        return False
    if "$ref" in s:
        target = resolve_in_root_resource(root, s["$ref"])
        if target is None or not admits_every_non_object(target, root, depth + 1):
            return False
        if ref_ignores_siblings(root):
            return True  # drafts 3-7: the keywords beside a $ref are not applied
    for key, val in s.items():
        if key == "allOf" and isinstance(val, list):
            if not all(admits_every_non_object(m, root, depth + 1) for m in val):
                return False
        elif key not in _OBJECT_ONLY and key not in ANNOTATIONS and key != "$ref":
            return False
    return True


def type_implied(node: dict[str, Any], root: Any) -> bool:
    """True when the ``type`` of ``node`` says nothing its ``anyOf`` / ``oneOf`` branches do not:
    every branch can match only types it lists (``integer`` aside: "integral" is not a type
    of its own here)."""
    kind = node.get("type")
    names = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else None
    if not names or "integer" in names or not all(isinstance(n, str) for n in names):
        return False
    for kw in ("anyOf", "oneOf"):
        branches = node.get(kw)
        if isinstance(branches, list) and branches:
            if all(type_set(b, root) <= frozenset(names) for b in branches):
                return True
    return False
