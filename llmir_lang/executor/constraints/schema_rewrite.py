"""Exact rewrites of JSON-schema keywords llguidance lacks, and its errors as typed errors.

Each rewrite gives a schema with the same set of valid instances (JSON Schema 2020-12
validation semantics, ``format`` as an annotation); a keyword with no exact rewrite is left in
place and llguidance then rejects it, which becomes ``UnsupportedSchemaError(keyword, path)``.

- ``format`` values llguidance does not know: annotation-only by the spec, dropped.
- ``format`` ``date`` / ``time`` / ``date-time``: a ``pattern`` of the RFC 3339 texts Python's
  ``datetime`` (so pydantic) reads. llguidance's own regexes also admit year 0000 and February 29
  of every year (invalid RFC 3339), and second 60: a leap second, which Python has no value for,
  so this one rewrite narrows the format (``"23:59:60Z"`` made ``get_obj`` of a model fail).
- ``uniqueItems: false``, and ``uniqueItems: true`` with ``maxItems <= 1``: no constraint.
- ``if`` with neither ``then`` nor ``else``, and ``then`` / ``else`` without ``if``: no constraint.
- ``contains: {}`` / ``true`` (no min/maxContains): ``minItems >= 1``.
- ``minContains`` / ``maxContains`` without ``contains``: no constraint (2019-09 on ignore them).
- ``dependencies`` / ``dependentRequired`` / ``dependentSchemas``: for each trigger ``p``,
  ``anyOf: [{properties: {p: false}}, {required: [p, ...], ...S}]`` added to ``allOf``.
- ``not``: pushed inward where the complement is expressible (``negation.negate``).
- ``oneOf`` whose branches are pairwise disjoint (``negation.pairwise_disjoint``): ``anyOf``.
- a length / count bound written as an integral float (``minLength: 2.0``): the integer.
- ``patternProperties`` with ``additionalProperties`` next to ``allOf`` / ``anyOf`` / ``oneOf``: the
  subschema's object keywords as an ``allOf`` member of their own (llguidance lost the patterns).

``not`` and ``oneOf`` are read through local ``$ref``s only where those point into the document
itself: inside a subschema with an ``$id`` of its own they point into that subschema, and are left
as they are (the keyword is then refused).

``llguidance_error`` types llguidance's compile errors: every one is an
``UnsupportedSchemaError`` (naming keyword and path where the message lets them be found, and
keeping llguidance's text), an ``InvalidSchemaError`` when the schema fails its metaschema, an
``InvalidRegexError`` or an ``UnsatisfiableConstraintError`` (only where llguidance proved it).
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
from llmir_lang.executor.constraints.schema_checks import NUMERIC_BOUNDS, metaschema_error
from llmir_lang.executor.constraints.schema_walk import find_keyword, iter_subschemas, starts_resource


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
    nodes = list(iter_subschemas(out))
    resources = [path + "/" for path, node in nodes[1:] if starts_resource(node)]
    # Children first, so a rewritten parent (allOf/anyOf appended) is not walked twice.
    for path, node in reversed(nodes):
        # the #/... refs inside a subschema with an $id of its own point into it, not into out
        inside = any((path + "/").startswith(r) for r in resources)
        _rewrite_node(node, None if inside else out, path, notes)
    return out, notes


def _add_all_of(node: dict[str, Any], extra: list[Any]) -> None:
    node.setdefault("allOf", [])
    node["allOf"] = list(node["allOf"]) + extra


# Counts llguidance reads only as JSON integers ("Expected positive integer for 'minLength', got
# 2.0"); JSON Schema takes any number with a zero fraction as an integer.
_COUNT_KEYWORDS = (
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
    "minContains", "maxContains",
)  # fmt: skip


_YEAR = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"  # 0001-9999
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)"
)
# NOTE: second 60. RFC 3339's grammar allows a leap second (``time-second = 2DIGIT ; 00-58, 59,
# 60``), but the rule here is that the constraint never admits a value the validator of its path
# rejects, and both validators reject it: pydantic (``TypeAdapter(datetime.time)`` refuses
# "23:59:60Z", "second value is outside expected range"; ``datetime`` has no second 60), the
# path of a model class, and ``jsonschema``'s format checker, the path of a plain schema, whose
# ``time`` / ``date-time`` go through rfc3339-validator ("leap seconds are not supported"; without
# that package installed the two formats are not checked at all). So seconds are 00-59 for
# ``time`` and ``date-time`` alike. The texts below are exactly those rfc3339-validator accepts
# (``jsonschema`` upper-cases ``t`` / ``z`` first) and a subset of pydantic's: pydantic also reads
# times without an offset ("12:00"), which RFC 3339's ``full-time``, what the format names, lacks.
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_DATETIME_PATTERNS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}[Tt]{_TIME}$"}


def _rewrite_node(node: dict[str, Any], root: dict[str, Any] | None, path: str, notes: list[str]) -> None:
    for kw in _COUNT_KEYWORDS:
        count = node.get(kw)
        if isinstance(count, float) and count.is_integer() and 0 <= count <= 2**53:
            node[kw] = int(count)
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt in _DATETIME_PATTERNS:
        del node["format"]
        if "pattern" in node:
            _add_all_of(node, [{"pattern": _DATETIME_PATTERNS[fmt]}])
        else:
            node["pattern"] = _DATETIME_PATTERNS[fmt]
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
    if root is not None:
        _own_object_keywords_into_all_of(node, root, path, notes)


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


# What to do instead, for keywords that schemas generated from code carry without the user
# writing them (a pydantic ``set[str]`` field is ``uniqueItems: true``).
_KEYWORD_HINTS = {
    "uniqueItems": "a pydantic set / frozenset field's model_json_schema() carries it: pass the "
    "model class itself (its sets are constrained as arrays, which pydantic deduplicates), or "
    "remove the keyword and deduplicate after parsing",
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


_REGEX_UNDECIDED = "Unable to determine if regex is empty"
_SEARCH_REGEX = re.compile(r"\(SearchRegex /(.*?)/\)")
_LOOKAROUND = re.compile(r"lookarounds not supported yet.*? in regex /(.*)/")
_CIRCULAR_REF = re.compile(r"circular references with sibling keys are not supported: \S*?(#\S*)")
_NOT_DISJOINT = re.compile(r"patternProperty regexes /(.*)/ and /(.*)/ are not disjoint")
_NUMERIC_RANGE = re.compile(r"Failed to generate regex for (?:float|integer) range")
_EXPECTED = re.compile(r"Expected [^']*'([A-Za-z$]+)'")
_COMBINATORS = ("allOf", "anyOf", "oneOf", "not")


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
    if _REGEX_UNDECIDED in message:
        # not a proof of emptiness: llguidance gave up deciding it (it was reported as unsatisfiable)
        path = _pattern_path(schema, _SEARCH_REGEX.findall(message))
        return UnsupportedSchemaError(
            f"the string constraints at {path} (pattern together with length bounds / other "
            "patterns it must also match) are too complex for the engine to check whether any "
            "string satisfies them; simplify the pattern or drop minLength / maxLength (llguidance: "
            f"{_clip(first)})",
            keyword="pattern",
            path=path,
        )
    if "nsatisfiable" in message or "is empty" in message or "never matches" in message:
        return UnsatisfiableConstraintError(f"the JSON schema admits no document: {first}")
    if "regex parse error" in message or "invalid regex" in message:
        return _pattern_error(message, schema, first)
    invalid = metaschema_error(schema)
    if invalid is not None:
        return invalid
    return _unsupported(message, first, schema)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pattern_path(schema: Any, regexes: list[str]) -> str:
    """Path of the subschema whose ``pattern`` is one of ``regexes`` (preferring one with a length
    bound), else of the first pattern next to a length bound, else of the first pattern."""
    wanted = {r.strip() for r in regexes}
    named, bounded, any_pattern = None, None, None
    for path, node in iter_subschemas(schema):
        pattern = node.get("pattern")
        if not isinstance(pattern, str):
            continue
        has_bound = "minLength" in node or "maxLength" in node
        if pattern.strip() in wanted and (has_bound or named is None):
            named = path
            if has_bound:
                break
        bounded = bounded or (path if has_bound else None)
        any_pattern = any_pattern or path
    return named or bounded or any_pattern or "#"


def _node_with(schema: Any, keywords: tuple[str, ...], match: Any = None) -> tuple[str, str]:
    """(keyword, path) of the first subschema using one of ``keywords`` for which ``match(node)``
    holds; of the first using one at all when none does; ``(keywords[0], "#")`` when none."""
    fallback = None
    for path, node in iter_subschemas(schema):
        kw = next((k for k in keywords if k in node), None)
        if kw is None:
            continue
        if match is None or match(node):
            return kw, path
        fallback = fallback or (kw, path)
    return fallback or (keywords[0], "#")


def _unsupported(message: str, first: str, schema: Any) -> UnsupportedSchemaError:
    """llguidance's refusals of a valid schema, with keyword, path and what to do where the
    message tells them; any other message is kept as it is."""
    said = f"(llguidance: {_clip(first)})"
    if "min/maxProperties only supported" in message:

        def partly_optional(node: dict[str, Any]) -> bool:
            props = node.get("properties")
            required = node.get("required")
            return isinstance(props, dict) and not (
                isinstance(required, list) and all(p in required for p in props)
            )

        kw, path = _node_with(schema, ("maxProperties", "minProperties"), partly_optional)
        return UnsupportedSchemaError(
            f"{kw!r} at {path}: the engine bounds the number of properties only of objects whose "
            "listed properties are all required; list them all in 'required', or remove the "
            f"bound {said}",
            keyword=kw,
            path=path,
        )
    m = _NOT_DISJOINT.search(message)
    if m:
        regexes = {m.group(1), m.group(2)}

        def names_one(node: dict[str, Any]) -> bool:
            names = node.get("patternProperties")
            return isinstance(names, dict) and bool(regexes & set(names))

        kw, path = _node_with(schema, ("patternProperties",), names_one)
        return UnsupportedSchemaError(
            f"'patternProperties' at {path}: regexes /{m.group(1)}/ and /{m.group(2)}/ can match the "
            "same property name, and the engine needs each name to be matched by one regex at most; "
            "make the regexes exclusive (anchors, distinct prefixes) or merge them",
            keyword=kw,
            path=path,
        )
    if "Schema intersection stack level exceeded" in message:
        kw, path = _node_with(schema, ("allOf",))
        return UnsupportedSchemaError(
            f"'allOf' at {path}: combining its branches (through their $refs) nests too deeply for "
            "the engine; merge the branches by hand or break the recursive $refs they go through "
            f"{said}",
            keyword=kw,
            path=path,
        )
    m = _CIRCULAR_REF.search(message)
    if m:
        path = m.group(1) or "#"
        return UnsupportedSchemaError(
            f"'$ref' at {path}: a recursive $ref with sibling keywords in the same subschema is not "
            "supported; make the $ref the only keyword of its subschema (move the siblings into "
            f"the definition it points at) {said}",
            keyword="$ref",
            path=path,
        )
    if _NUMERIC_RANGE.search(message):
        numbers = set(re.findall(r"Some\(([^)]*)\)", message))

        def bound_named(node: dict[str, Any]) -> bool:
            return any(_same_number(node.get(k), numbers) for k in NUMERIC_BOUNDS)

        kw, path = _node_with(schema, NUMERIC_BOUNDS, bound_named)
        return UnsupportedSchemaError(
            f"{kw!r} at {path}: the engine cannot build a number range this close to the largest "
            f"float; remove the bound or choose a smaller one {said}",
            keyword=kw,
            path=path,
        )
    if "Value for 'multipleOf' has too many digits" in message:
        path = find_keyword(schema, "multipleOf") or "#"
        return UnsupportedSchemaError(
            f"'multipleOf' at {path}: its value has more significant digits than the engine handles "
            f"(at most about 16); remove it or use a shorter value {said}",
            keyword="multipleOf",
            path=path,
        )
    if "schema too large" in message and any(find_keyword(schema, kw) for kw in _COMBINATORS):
        kw, path = _node_with(schema, _COMBINATORS)
        return UnsupportedSchemaError(
            f"{kw!r} at {path}: combining its subschemas (with their patterns, bounds and $refs) makes "
            f"a grammar past the engine's size limit {said}; simplify the combination or split the "
            "schema",
            keyword=kw,
            path=path,
        )
    m = _LOOKAROUND.search(message)
    if m:
        path = _pattern_path(schema, [m.group(1)])
        return UnsupportedSchemaError(
            f"'pattern' at {path}: the engine reads '^' / '$' inside a regex (not at its very start or "
            f"end) as a look-around, which it does not support; rewrite the pattern {said}",
            keyword="pattern",
            path=path,
        )
    m = _EXPECTED.search(first)
    if m:
        kw = m.group(1)
        path = find_keyword(schema, kw) or "#"
        return UnsupportedSchemaError(
            f"{kw!r} at {path}: the engine cannot read its value {said}; write it as the JSON "
            "type the specification gives it (a count as an integer, 'required' as a list of names)",
            keyword=kw,
            path=path,
        )
    return UnsupportedSchemaError(f"the JSON schema uses a construct the engine cannot compile {said}")


def _same_number(value: Any, texts: set[str]) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    for text in texts:
        try:
            if float(text) == float(value):
                return True
        except ValueError:
            continue
    return False
