"""Which JSON schemas outlines-core's regex translation enforces exactly.

``outlines_core.json_schema.build_regex_from_schema`` silently ignores many keywords (numeric
bounds, ``additionalProperties`` other than false, ``allOf`` semantics, ``pattern`` next to a
length bound), truncates recursion, and builds regexes whose DFA can take minutes (bounded
string lengths). Sending such a schema to it would give a constraint that admits invalid output
or rejects valid output without saying so. ``outlines_exact`` therefore accepts only a subset
where the translation is exact, read off the translator's rules:

- objects: ``type: object`` with ``properties``, ``additionalProperties: false``, ``required``
  naming only listed properties, property names needing no JSON escaping;
- arrays: ``type: array`` with ``items`` (no length bounds: counted repetition of a
  sub-regex is where DFA sizes explode);
- scalars: plain ``string`` (no length/pattern/format), ``integer``, ``number``, ``boolean``,
  ``null``, or a list of those types;
- ``enum`` / ``const`` of strings, integers, booleans and null;
- ``anyOf`` of exact branches; local non-recursive ``$ref`` into the document's own resource
  (outlines-core reads every ``#/...`` against the root, where a subschema with an ``$id`` of its
  own makes the ``#/...`` refs inside it point into itself);
- annotation keywords anywhere.

Everything else goes to llguidance, which implements the keywords it accepts.
"""

from __future__ import annotations

from typing import Any

from llmir_lang.executor.constraints.schema_walk import (
    find_keyword,
    resolve_in_root_resource,
    starts_resource,
)

ANNOTATIONS = frozenset(
    {
        "title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated",
        "readOnly", "writeOnly", "$defs", "definitions", "$anchor", "contentMediaType",
        "contentEncoding",
    }
)  # fmt: skip
_SCALARS = frozenset({"string", "integer", "number", "boolean", "null"})
_MAX_DEPTH = 64


def outlines_exact(schema: Any) -> str | None:
    """None if outlines-core enforces ``schema`` exactly; else the first reason it would not."""
    if not isinstance(schema, dict):
        return "boolean schemas are not translated by outlines-core"
    return _check(schema, schema, "#", frozenset(), 0)


def _check(node: Any, root: dict[str, Any], path: str, refs: frozenset[str], depth: int) -> str | None:
    if depth > _MAX_DEPTH:
        return f"{path}: nesting too deep"
    if not isinstance(node, dict):
        return f"{path}: boolean subschema"
    if node is not root and starts_resource(node) and find_keyword(node, "$ref") is not None:
        return f"{path}: its $id makes the $refs inside it point into it (outlines-core reads them from the root)"
    keys = set(node) - ANNOTATIONS
    if not keys:
        return f"{path}: unconstrained value (outlines-core truncates its depth)"
    if "$ref" in node:
        if keys != {"$ref"}:
            return f"{path}: $ref with sibling keywords"
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#"):
            return f"{path}: non-local $ref"
        if ref in refs:
            return f"{path}: recursive $ref (outlines-core truncates recursion)"
        target = _resolve(root, ref)
        if target is None or resolve_in_root_resource(root, ref) is None:
            return f"{path}: $ref {ref} points at nothing, or into a subschema with an $id of its own"
        return _check(target, root, ref, refs | {ref}, depth + 1)
    if "anyOf" in node:
        if keys != {"anyOf"} or not isinstance(node["anyOf"], list) or not node["anyOf"]:
            return f"{path}: anyOf with sibling keywords"
        for i, sub in enumerate(node["anyOf"]):
            why = _check(sub, root, f"{path}/anyOf/{i}", refs, depth + 1)
            if why:
                return why
        return None
    if "enum" in node or "const" in node:
        values = node["enum"] if "enum" in node else [node["const"]]
        if not (keys <= {"enum", "type"} or keys <= {"const", "type"}) or not isinstance(values, list):
            return f"{path}: enum/const with other keywords"
        if not values or not all(_plain_literal(v) for v in values):
            return f"{path}: enum/const values must be strings, integers, booleans or null"
        if "type" in node and not all(_has_type(v, node["type"]) for v in values):
            return f"{path}: enum values outside the declared type"
        return None
    kind = node.get("type")
    if kind == "object":
        return _check_object(node, keys, root, path, refs, depth)
    if kind == "array":
        if keys != {"type", "items"}:
            return f"{path}: array needs exactly 'items' (bounds / tuples go to llguidance)"
        return _check(node["items"], root, f"{path}/items", refs, depth + 1)
    if isinstance(kind, str) and kind in _SCALARS:
        return None if keys == {"type"} else f"{path}: {kind} with {sorted(keys - {'type'})}"
    if isinstance(kind, list) and kind and all(isinstance(k, str) and k in _SCALARS for k in kind):
        if len(set(kind)) != len(kind) or ("integer" in kind and "number" in kind):
            return f"{path}: overlapping type list"
        return None if keys == {"type"} else f"{path}: type list with {sorted(keys - {'type'})}"
    return f"{path}: keywords {sorted(keys)} are outside the outlines-core subset"


def _check_object(
    node: dict[str, Any], keys: set[str], root: dict[str, Any], path: str, refs: frozenset[str], depth: int
) -> str | None:
    if not keys <= {"type", "properties", "required", "additionalProperties"}:
        return f"{path}: object keywords {sorted(keys - {'type', 'properties', 'required'})}"
    props = node.get("properties")
    if not isinstance(props, dict) or not props:
        return f"{path}: object without properties"
    if node.get("additionalProperties") is not False:
        return f"{path}: additional properties allowed (outlines-core would forbid them)"
    required = node.get("required", [])
    if not isinstance(required, list) or not all(r in props for r in required):
        return f"{path}: 'required' names a property not in 'properties'"
    for name, sub in props.items():
        if not _plain_key(name):
            return f"{path}: property name {name!r} needs JSON escaping"
        why = _check(sub, root, f"{path}/properties/{name}", refs, depth + 1)
        if why:
            return why
    return None


def _plain_key(name: str) -> bool:
    return bool(name) and all(0x20 <= ord(c) < 0x7F and c not in '"\\' for c in name)


def _plain_literal(v: Any) -> bool:
    # plane-16 characters (U+100000 and up) cannot be produced by outlines-core here (its
    # vocabulary leaves out their lead byte, outlines_backend NOTE): an enum value holding one
    # would be unreachable
    if isinstance(v, str):
        return all(
            ord(c) >= 0x20 and c not in '"\\' and not 0x7F <= ord(c) <= 0x9F and ord(c) < 0x100000 for c in v
        )
    return v is None or isinstance(v, bool) or (isinstance(v, int) and abs(v) < 2**53)


def _has_type(v: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, list) else [kind]
    for k in kinds:
        if k == "string" and isinstance(v, str):
            return True
        if k == "boolean" and isinstance(v, bool):
            return True
        if k == "null" and v is None:
            return True
        if k in ("integer", "number") and isinstance(v, int) and not isinstance(v, bool):
            return True
    return False


def _resolve(root: dict[str, Any], ref: str) -> Any:
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
