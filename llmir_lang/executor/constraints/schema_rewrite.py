"""Exact rewrites of JSON-schema keywords llguidance lacks, and its errors as typed errors.

Each rewrite gives a schema with the same set of valid instances (JSON Schema 2020-12
validation semantics, ``format`` as an annotation); a keyword with no exact rewrite is left in
place and llguidance then rejects it, which becomes ``UnsupportedSchemaError(keyword, path)``.

- ``format`` values llguidance does not know: annotation-only by the spec, dropped.
- ``uniqueItems: false``, and ``uniqueItems: true`` with ``maxItems <= 1``: no constraint.
- ``if`` with neither ``then`` nor ``else``, and ``then`` / ``else`` without ``if``: no constraint.
- ``contains: {}`` / ``true`` (no min/maxContains): ``minItems >= 1``.
- ``dependencies`` / ``dependentRequired`` / ``dependentSchemas``: for each trigger ``p``,
  ``anyOf: [{properties: {p: false}}, {required: [p, ...], ...S}]`` added to ``allOf``.
- ``not``: pushed inward where the complement is expressible (``negation.negate``).
- ``oneOf`` whose branches are pairwise disjoint (``negation.pairwise_disjoint``): ``anyOf``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints.errors import (
    InvalidRegexError,
    InvalidSchemaError,
    UnsatisfiableConstraintError,
    UnsupportedSchemaError,
)
from llmir_lang.executor.constraints.negation import negate, pairwise_disjoint
from llmir_lang.executor.constraints.schema_walk import find_keyword, iter_subschemas


@functools.lru_cache(maxsize=256)
def llguidance_knows_format(name: str) -> bool:
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "string", "format": name})
    return "Unknown format" not in llguidance.LLMatcher.validate_grammar(grammar)


def rewrite_for_llguidance(schema: Any) -> tuple[Any, list[str]]:
    """(equivalent schema, notes on what was rewritten where). The input is not modified."""
    if not isinstance(schema, dict):
        return schema, []
    out = copy.deepcopy(schema)
    notes: list[str] = []
    # Children first, so a rewritten parent (allOf/anyOf appended) is not walked twice.
    for path, node in reversed(list(iter_subschemas(out))):
        _rewrite_node(node, out, path, notes)
    return out, notes


def _add_all_of(node: dict[str, Any], extra: list[Any]) -> None:
    node.setdefault("allOf", [])
    node["allOf"] = list(node["allOf"]) + extra


def _rewrite_node(node: dict[str, Any], root: dict[str, Any], path: str, notes: list[str]) -> None:
    fmt = node.get("format")
    if isinstance(fmt, str) and not llguidance_knows_format(fmt):
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
    _rewrite_dependencies(node, path, notes)
    if "not" in node:
        neg = negate(node["not"], root)
        if neg is not None:
            del node["not"]
            _add_all_of(node, [neg])
            notes.append(f"{path}: 'not' rewritten as its complement")
    if isinstance(node.get("oneOf"), list) and pairwise_disjoint(node["oneOf"], root):
        branches = node.pop("oneOf")
        if "anyOf" in node:
            _add_all_of(node, [{"anyOf": branches}])
        else:
            node["anyOf"] = branches
        notes.append(f"{path}: oneOf with disjoint branches treated as anyOf")


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


# What to do instead, for keywords that schemas generated from code carry without the user
# writing them (a pydantic ``set[str]`` field is ``uniqueItems: true``).
_KEYWORD_HINTS = {
    "uniqueItems": "a pydantic set / frozenset field emits it: declare the field as a list and "
    "deduplicate after parsing, or remove the keyword",
}
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[([^\]]*)\]")
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (\S+)")
_DANGLING_REF = re.compile(r"(Pointer|Anchor) '([^']*)' does not exist")
_REMOTE_REF = re.compile(r"Resource '([^']*)' is not present in a registry and retrieving it failed")


def _pattern_error(message: str, schema: Any, first: str) -> InvalidRegexError:
    """Name the ``pattern`` / ``patternProperties`` regex that does not parse, where it is, and why.

    llguidance's message is "regex parse error:", the regex, a caret line, "error: <why>"; only
    the first line used to be kept, with the path of the first ``pattern`` in the schema, which
    need not be the bad one."""
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    regex = lines[1].strip() if len(lines) > 1 and lines[0].strip() == "regex parse error:" else None
    why = next((ln.strip()[len("error:") :].strip() for ln in lines if ln.strip().startswith("error:")), "")
    found: tuple[str, str] | None = None
    for path, node in iter_subschemas(schema):
        pattern = node.get("pattern")
        if isinstance(pattern, str) and (regex is None or pattern.strip() == regex):
            found = (path, "pattern")
        names = node.get("patternProperties")
        if (
            found is None
            and isinstance(names, dict)
            and (regex is None or any(k.strip() == regex for k in names))
        ):
            found = (path, "patternProperties")
        if found is not None:
            break
    path, keyword = found or ("#", "pattern")
    what = f"{keyword} {regex!r}" if regex is not None else f"a {keyword} regex"
    cause = why or first
    return InvalidRegexError(
        f"{what} at {path} does not parse: {cause}; schema patterns are read as Rust regex syntax "
        "(no look-around, no backreferences); fix or rewrite it"
    )


def _ref_path(schema: Any, wanted: str) -> tuple[str, str]:
    """(path of the subschema, its ``$ref``) whose ``$ref`` ends with ``wanted`` (a pointer or
    anchor from llguidance's message); the first ``$ref`` at all, or ``#``, when none does."""
    first: tuple[str, str] | None = None
    for path, node in iter_subschemas(schema):
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref.endswith(wanted):
                return path, ref
            first = first or (path, ref)
    return first or ("#", wanted)


def _ref_error(message: str, schema: Any) -> ConstraintError | None:
    """A ``$ref`` that points at nothing (``InvalidSchemaError``) or at another document, which is
    never fetched (``UnsupportedSchemaError``); both name the ``$ref`` and where it is. They were a
    bare ``ConstraintError`` quoting llguidance ("Pointer '/$defs/x' does not exist")."""
    m = _DANGLING_REF.search(message)
    if m:
        target = m.group(2) if m.group(1) == "Pointer" else "#" + m.group(2)
        path, ref = _ref_path(schema, target)
        return InvalidSchemaError(
            f"$ref {ref!r} at {path} points at nothing in the schema ({m.group(1).lower()} "
            f"{m.group(2)!r} does not exist); add the definition it names (under $defs) or fix the ref"
        )
    m = _REMOTE_REF.search(message)
    if m:
        path, ref = _ref_path(schema, m.group(1).rsplit("/", 1)[-1])
        return UnsupportedSchemaError(
            f"$ref {ref!r} at {path} names a schema outside this one ({m.group(1)}): schemas are "
            "never fetched, nor found through a nested $id; copy the referenced schema into this "
            "one under $defs and point at it ('#/$defs/...')",
            keyword="$ref",
            path=path,
        )
    return None


def llguidance_error(message: str, schema: Any) -> ConstraintError:
    """A typed error for an llguidance JSON-schema compile error, naming keyword and path."""
    first = message.strip().splitlines()[0] if message.strip() else message
    m = _UNIMPLEMENTED.search(message)
    if m:
        keywords = [json.loads(k) for k in re.findall(r'"[^"]*"', m.group(1))]
        for kw in keywords:
            path = find_keyword(schema, kw)
            if path is not None:
                return UnsupportedSchemaError(
                    f"unsupported JSON-schema keyword {kw!r} at {path}: no engine enforces it "
                    f"(all unsupported here: {keywords}); "
                    + _KEYWORD_HINTS.get(kw, "remove it or restate it with supported keywords"),
                    keyword=kw,
                    path=path,
                )
        return UnsupportedSchemaError(f"unsupported JSON-schema keywords {keywords}", keyword=keywords[0])
    if "oneOf constraints are not supported" in message:
        path = find_keyword(schema, "oneOf") or "#"
        return UnsupportedSchemaError(
            f"unsupported JSON-schema keyword 'oneOf' at {path}: its branches may overlap, so exactly-one "
            "cannot be enforced; use anyOf, or make the branches disjoint (distinct types or a "
            "const discriminator property)",
            keyword="oneOf",
            path=path,
        )
    m = _UNKNOWN_FORMAT.search(message)
    if m:
        path = find_keyword(schema, "format") or "#"
        return UnsupportedSchemaError(f"unknown format {m.group(1)} at {path}", keyword="format", path=path)
    ref_error = _ref_error(message, schema)
    if ref_error is not None:
        return ref_error
    if "recursion limit exceeded" in message:
        return UnsupportedSchemaError(
            "the JSON schema is nested too deeply for the engine to read (its JSON text nests over "
            "128 levels); move inner levels into $defs and refer to them with $ref",
            keyword="$ref",
        )
    if "nsatisfiable" in message or "is empty" in message or "never matches" in message:
        return UnsatisfiableConstraintError(f"the JSON schema admits no document: {first}")
    if "regex parse error" in message or "invalid regex" in message:
        return _pattern_error(message, schema, first)
    if "not supported" in message or "Unknown" in message:
        return UnsupportedSchemaError(f"the JSON schema uses a construct llguidance cannot enforce: {first}")
    return ConstraintError(f"the JSON schema cannot be compiled: {first}")
