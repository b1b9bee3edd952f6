"""Exact rewrites of JSON-schema keywords llguidance lacks.

Each rewrite gives a schema with the same set of valid instances (JSON Schema 2020-12
validation semantics, ``format`` as an annotation); a keyword with no exact rewrite is left in
place and llguidance then rejects it, which ``schema_engine_errors.llguidance_error`` makes an
``UnsupportedSchemaError(keyword, path)``.

- ``format`` values llguidance does not know: annotation-only by the spec, dropped.
- ``format`` ``date`` / ``time`` / ``date-time``: a ``pattern`` of the RFC 3339 texts Python's
  ``datetime`` (so pydantic) reads (``schema_formats``): this one rewrite narrows the format.
- ``uniqueItems: false``, and ``uniqueItems: true`` with ``maxItems <= 1``: no constraint.
- ``if`` with neither ``then`` nor ``else``, and ``then`` / ``else`` without ``if``: no constraint.
- ``contains: {}`` / ``true`` (no min/maxContains): ``minItems >= 1``.
- ``minContains`` / ``maxContains`` without ``contains``: no constraint (2019-09 on ignore them).
- ``dependencies`` / ``dependentRequired`` / ``dependentSchemas``: for each trigger ``p``,
  ``anyOf: [{properties: {p: false}}, {required: [p, ...], ...S}]`` added to ``allOf``.
- a ``maxProperties`` no less than the names a closed object (``additionalProperties: false``,
  no ``patternProperties``) can have: no constraint.
- in drafts 3 to 7, the keywords beside a ``$ref``: dropped, as validators of those drafts ignore
  them (llguidance applied them, and refused a recursive ``$ref`` with siblings).
- ``not``: beside ``const`` / ``enum``, the values it excludes (told by the ``jsonschema``
  validator) taken out of them; elsewhere pushed inward where the complement is expressible
  (``negation.negate``).
- ``oneOf``: ``anyOf`` where that is exact (``schema_one_of``: branches no value matches two of,
  or each branch with the complements of those it overlaps).
- a length / count bound written as an integral float (``minLength: 2.0``): the integer.
- ``patternProperties`` with ``additionalProperties`` next to ``allOf`` / ``anyOf`` / ``oneOf``: the
  subschema's object keywords as an ``allOf`` member of their own (llguidance lost the patterns).
- last, every ``pattern`` / ``patternProperties`` name (those the rewrites above wrote too):
  ``\\D``, ``\\W``, ``\\s``, ... spelled as the characters both ECMA-262 and Python's ``re`` put
  there (``schema_pattern_shorthand``), and a character set llguidance would let ``"`` / ``\\``
  through with U+0000 set apart, or the schema refused naming the pattern
  (``schema_pattern_rewrite``; the forms in ``schema_pattern_nul``).

``not`` and ``oneOf`` are read through local ``$ref``s only where those point into the document
itself: inside a subschema with an ``$id`` of its own they point into that subschema, and are left
as they are (the keyword is then refused).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from llmir_lang.executor.constraints.negation import negate
from llmir_lang.executor.constraints.schema_disjoint import type_implied
from llmir_lang.executor.constraints.schema_engine_errors import llguidance_error
from llmir_lang.executor.constraints.schema_formats import DATETIME_PATTERNS, llguidance_knows_format
from llmir_lang.executor.constraints.schema_one_of import one_of_as_any_of
from llmir_lang.executor.constraints.schema_pattern_rewrite import rewrite_patterns
from llmir_lang.executor.constraints.schema_support import ANNOTATIONS
from llmir_lang.executor.constraints.schema_walk import (
    holds_resource,
    iter_subschemas,
    ref_ignores_siblings,
    resolve_local_ref,
    starts_resource,
)

__all__ = ["llguidance_error", "rewrite_for_llguidance"]  # llguidance_error: where compiler finds it


@dataclass(slots=True)
class _Document:
    original: dict[str, Any]  # the schema as given: the validator reads it, never a rewritten one
    ref_alone: bool  # drafts 3-7: the keywords beside a $ref are not applied
    pointers: frozenset[str]  # the JSON pointers of every $ref's fragment ("/definitions/a")


def rewrite_for_llguidance(schema: Any) -> tuple[Any, list[str]]:
    """(equivalent schema, notes on what was rewritten where). The input is not modified."""
    if not isinstance(schema, dict):
        return schema, []
    out = copy.deepcopy(schema)
    notes: list[str] = []
    nodes = list(iter_subschemas(out))
    resources = [path + "/" for path, node in nodes[1:] if starts_resource(node)]
    refs = (node["$ref"] for _, node in nodes if isinstance(node.get("$ref"), str))
    doc = _Document(schema, ref_ignores_siblings(schema), frozenset(r.partition("#")[2] for r in refs))
    # Children first, so a rewritten parent (allOf/anyOf appended) is not walked twice.
    for path, node in reversed(nodes):
        # the #/... refs inside a subschema with an $id of its own point into it, not into out
        inside = any((path + "/").startswith(r) for r in resources)
        _rewrite_node(node, None if inside else out, path, notes, doc)
    rewrite_patterns(out, schema, notes)
    return out, notes


def _add_all_of(node: dict[str, Any], extra: list[Any]) -> None:
    node.setdefault("allOf", [])
    node["allOf"] = list(node["allOf"]) + extra


def _pointed_into(doc: _Document, path: str, keys: list[str]) -> bool:
    """True if some ``$ref`` points at or into one of ``keys`` of the subschema at ``path``."""
    places = [f"{path[1:]}/{k.replace('~', '~0').replace('/', '~1')}" for k in keys]
    return any(p == q or p.startswith(q + "/") for p in doc.pointers for q in places)


# Counts llguidance reads only as JSON integers ("Expected positive integer for 'minLength', got
# 2.0"); JSON Schema takes any number with a zero fraction as an integer.
_COUNT_KEYWORDS = (
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
    "minContains", "maxContains",
)  # fmt: skip


def _rewrite_node(
    node: dict[str, Any], root: dict[str, Any] | None, path: str, notes: list[str], doc: _Document
) -> None:
    if doc.ref_alone and root is not None:
        _drop_ref_siblings(node, path, notes, doc)
    for kw in _COUNT_KEYWORDS:
        count = node.get(kw)
        if isinstance(count, float) and count.is_integer() and 0 <= count <= 2**53:
            node[kw] = int(count)
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt in DATETIME_PATTERNS:
        del node["format"]
        if "pattern" in node:
            _add_all_of(node, [{"pattern": DATETIME_PATTERNS[fmt]}])
        else:
            node["pattern"] = DATETIME_PATTERNS[fmt]
        notes.append(f"{path}: format {fmt!r} as a pattern of the RFC 3339 texts Python's datetime reads")
    elif isinstance(fmt, str) and not llguidance_knows_format(fmt):
        del node["format"]
        notes.append(f"{path}: format {fmt!r} kept as annotation (not enforced)")
    if node.get("uniqueItems") is False:
        del node["uniqueItems"]
    elif node.get("uniqueItems") is True and isinstance(node.get("maxItems"), int) and node["maxItems"] <= 1:
        del node["uniqueItems"]
    if "if" in node and "then" not in node and "else" not in node:
        del node["if"]
    if "if" not in node:
        for kw in ("then", "else"):
            node.pop(kw, None)
    if node.get("contains") in ({}, True) and "minContains" not in node and "maxContains" not in node:
        del node["contains"]
        node["minItems"] = max(1, int(node.get("minItems", 0)))
    if "contains" not in node:
        node.pop("minContains", None)
        node.pop("maxContains", None)
    _rewrite_dependencies(node, path, notes)
    _rewrite_property_counts(node, path, notes)
    if "not" in node and ("const" in node or "enum" in node) and root is not None:
        _values_outside_not(node, path, notes, doc)
    if "not" in node:
        neg = negate(node["not"], root)
        if neg is not None:
            del node["not"]
            _add_all_of(node, [neg])
            notes.append(f"{path}: 'not' rewritten as its complement")
    # a $ref into oneOf/<i> would point at nothing once the branches move
    moves = "oneOf" in node and not _pointed_into(doc, path, ["oneOf"])
    any_of = one_of_as_any_of(node, root) if moves else None
    if any_of is not None:
        del node["oneOf"]
        if "anyOf" in node:
            _add_all_of(node, [{"anyOf": any_of.branches}])
        else:
            node["anyOf"] = any_of.branches
        if any_of.objects_only:  # every other value matches two branches: none is valid
            _add_all_of(node, [{"type": "object"}])
        notes.append(f"{path}: oneOf as anyOf ({any_of.form})")
    if root is not None:
        _own_object_keywords_into_all_of(node, root, path, notes)
    if type_implied(node, root):
        # llguidance cannot meet a type beside branches that recur ("circular references with
        # sibling keys"): {"type": "object", "anyOf": [{"$ref": "#"}, ...]}
        notes.append(f"{path}: type {node.pop('type')!r} dropped (its anyOf / oneOf branches imply it)")


def _drop_ref_siblings(node: dict[str, Any], path: str, notes: list[str], doc: _Document) -> None:
    """Drafts 3-7: "All other properties in a "$ref" object MUST be ignored" (draft 7, 8.3)."""
    if not isinstance(node.get("$ref"), str):
        return
    kept = {"$ref", "$id", "id", *ANNOTATIONS}
    dropped = [k for k in node if k not in kept]
    if not dropped or _pointed_into(doc, path, dropped):
        return  # a $ref points in there: dropping it would leave the $ref pointing at nothing
    for k in dropped:
        del node[k]
    notes.append(f"{path}: {dropped} beside $ref dropped (the declared draft ignores them)")


def _names(node: dict[str, Any]) -> list[str] | None:
    """The property names an object ``node`` admits, when it is closed to all others."""
    props = node.get("properties", {})
    if (
        node.get("additionalProperties") is not False
        or node.get("patternProperties")
        or not isinstance(props, dict)
    ):
        return None
    return [name for name, sub in props.items() if sub is not False]


def _rewrite_property_counts(node: dict[str, Any], path: str, notes: list[str]) -> None:
    """A ``maxProperties`` no object meeting the rest of ``node`` can exceed (it is closed to all
    names but fewer than the bound), dropped: llguidance bounds the count (but for a bound of 1)
    only of objects all of whose listed properties are required, and refused such schemas."""
    high, names = node.get("maxProperties"), _names(node)
    if isinstance(high, int) and not isinstance(high, bool) and names is not None and high >= len(names):
        del node["maxProperties"]
        notes.append(f"{path}: maxProperties {high} dropped (the object can have {len(names)} names)")


def _values_outside_not(node: dict[str, Any], path: str, notes: list[str], doc: _Document) -> None:
    """``not`` beside ``const`` / ``enum``: keep the values the ``not`` subschema rejects, told by
    the ``jsonschema`` validator of the declared draft. Not where that reading may differ from the
    constraint's: a ``format`` (an annotation to the validator) or a float ``multipleOf`` (binary
    division to it, exact decimals here) in the subschema."""
    if "const" in node and "enum" in node:
        return  # both bound the value: rewriting one as the other's enum would drop it
    original = resolve_local_ref(doc.original, path + "/not")
    values = [node["const"]] if "const" in node else node["enum"]
    if original is None or not isinstance(values, list) or holds_resource(original):
        return
    for _, sub in iter_subschemas(original):
        step = sub.get("multipleOf")
        if "format" in sub or (isinstance(step, float) and not step.is_integer()):
            return
    try:
        from jsonschema import validators

        cls = validators.validator_for(doc.original, default=validators.Draft202012Validator)
        rejects = cls(doc.original).evolve(schema=original)
        kept = [v for v in values if not rejects.is_valid(v)]
    except Exception:  # a ref the validator cannot follow, its recursion limit: leave the not
        return
    node.pop("const", None)
    node["enum"] = kept
    del node["not"]
    notes.append(
        f"{path}: 'not' beside const / enum applied to the values ({len(kept)} of {len(values)} left)"
    )


# NOTE: llguidance 1.9 drops the patternProperties of a subschema that also has
# additionalProperties and allOf / anyOf / oneOf: every property name goes to
# additionalProperties, so {"patternProperties": {"^[ab]$": {}}, "additionalProperties": false,
# "allOf": [{"type": "object"}]} refused {"b": 1}, and with "required": ["a"] in the allOf it was
# called unsatisfiable. As an allOf member of their own, the same keywords are read right.
_OBJECT_KEYWORDS = (
    "properties", "patternProperties", "additionalProperties", "required", "minProperties",
    "maxProperties",
)  # fmt: skip


def _own_object_keywords_into_all_of(node: dict[str, Any], root: Any, path: str, notes: list[str]) -> None:
    if "patternProperties" not in node or "additionalProperties" not in node:
        return
    if not any(kw in node for kw in ("allOf", "anyOf", "oneOf")) or not isinstance(
        node.get("allOf", []), list
    ):
        return
    moved = [kw for kw in _OBJECT_KEYWORDS if kw in node]
    places = tuple(f"{path}/{kw}" for kw in moved)
    for _, other in iter_subschemas(root):
        ref = other.get("$ref")
        if isinstance(ref, str) and any(ref == p or ref.startswith(p + "/") for p in places):
            return  # a $ref points in there: moving it would leave the $ref pointing at nothing
    # appended, so a $ref into allOf/<i> still finds the member it named
    node["allOf"] = [*node.get("allOf", []), {kw: node.pop(kw) for kw in moved}]
    notes.append(f"{path}: patternProperties / additionalProperties moved into an allOf member")


def _rewrite_dependencies(node: dict[str, Any], path: str, notes: list[str]) -> None:
    extra: list[Any] = []
    for kw in ("dependencies", "dependentRequired", "dependentSchemas"):
        deps = node.get(kw)
        if not isinstance(deps, dict):
            continue
        for trigger, dep in deps.items():
            absent = {"properties": {trigger: False}}
            if isinstance(dep, list):
                # llguidance emits required-only keys in list order; dependencies usually come first
                present: Any = {"required": [*[d for d in dep if d != trigger], trigger]}
            elif dep is True or dep == {}:
                continue
            else:
                present = {"allOf": [{"required": [trigger]}, dep]}
            extra.append({"anyOf": [absent, present]})
        del node[kw]
        notes.append(f"{path}: {kw} rewritten as anyOf(absent, present-and-satisfied)")
    if extra:
        _add_all_of(node, extra)
