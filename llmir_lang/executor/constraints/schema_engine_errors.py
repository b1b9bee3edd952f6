"""llguidance's JSON-schema compile errors as typed errors naming keyword and path.

``llguidance_error(message, schema)`` reads llguidance's message (against the schema as the user
wrote it, before ``schema_rewrite``) and gives an ``UnsupportedSchemaError`` (naming keyword and
path where the message lets them be found, keeping llguidance's text, with what to do), an
``InvalidSchemaError`` when the schema fails its metaschema or a ``$ref`` points at nothing, an
``InvalidRegexError`` naming the regex that does not parse and why, or an
``UnsatisfiableConstraintError`` (only where llguidance proved it).
"""

from __future__ import annotations

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
from llmir_lang.executor.constraints.schema_checks import NUMERIC_BOUNDS, metaschema_error
from llmir_lang.executor.constraints.schema_pattern_rewrite import written_as
from llmir_lang.executor.constraints.schema_walk import find_keyword, iter_subschemas

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
    for rewritten, written in written_as(schema).items():  # the regexes as the user wrote them
        message = message.replace(rewritten, written)
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
