"""Every ``pattern`` and ``patternProperties`` name of a schema made exact for llguidance.

``rewrite_nul_sets`` puts each through ``schema_pattern_nul.exact_pattern`` (a set of characters
the engine quotes wrong gets its U+0000 set apart), gives a rewrite's string lengths to
``minLength`` / ``maxLength``, and refuses the schema naming the first pattern with no exact
rewrite. ``written_as`` maps the rewritten regexes back, for the engine's error messages.
"""

from __future__ import annotations

from typing import Any

from llmir_lang.executor.constraints.errors import UnsupportedSchemaError
from llmir_lang.executor.constraints.schema_pattern_nul import PatternFix, exact_pattern
from llmir_lang.executor.constraints.schema_walk import iter_subschemas


def rewrite_nul_sets(schema: Any, original: Any, notes: list[str]) -> None:
    """Every ``pattern`` and ``patternProperties`` name in ``schema`` (rewritten in place) made
    exact for llguidance (module doc), or ``UnsupportedSchemaError`` naming the first that cannot
    be. ``original`` is the schema as written, where the error finds the path."""
    refs = (n["$ref"] for _, n in iter_subschemas(schema) if isinstance(n.get("$ref"), str))
    fragments = [ref.partition("#")[2] for ref in refs]
    for path, node in list(iter_subschemas(schema)):
        pattern = node.get("pattern")
        fix = _checked(pattern, "pattern", path, original) if isinstance(pattern, str) else None
        if fix is not None:
            node["pattern"] = fix.pattern
            _add_lengths(node, fix)
            notes.append(f"{path}: pattern {pattern!r} with U+0000 apart from its classes")
        names = node.get("patternProperties")
        if not isinstance(names, dict):
            continue
        fixes = {name: _checked(name, "patternProperties", path, original) for name in names}
        if not any(fixes.values()):
            continue
        for name, fix in fixes.items():
            place = f"{path[1:]}/patternProperties/{name.replace('~', '~0').replace('/', '~1')}"
            if fix is not None and any(f == place or f.startswith(place + "/") for f in fragments):
                raise _refusal(name, "patternProperties", path, original, "a $ref points into its subschema")
        renamed = zip(names.items(), fixes.values())
        node["patternProperties"] = {(n if fix is None else fix.pattern): sub for (n, sub), fix in renamed}
        notes.append(f"{path}: patternProperties names with U+0000 apart from their classes")


def _checked(pattern: str, keyword: str, path: str, original: Any) -> PatternFix | None:
    result = exact_pattern(pattern, keyword == "pattern")
    if isinstance(result, str):
        raise _refusal(pattern, keyword, path, original, result)
    return result


def _refusal(pattern: str, keyword: str, path: str, original: Any, why: str) -> UnsupportedSchemaError:
    for where, node in iter_subschemas(original):
        names = node.get("patternProperties") if keyword == "patternProperties" else None
        own = node.get("pattern") == pattern and keyword == "pattern"
        if own or (isinstance(names, dict) and pattern in names):
            path = where
            break
    return UnsupportedSchemaError(
        f"{keyword} {pattern!r} at {path}: a set of characters in it holds every control character but "
        "not both '\"' and '\\', which the engine (llguidance 1.9) would let through escaped, and "
        f"U+0000 cannot be set apart exactly where it stands: {why}; leave U+0000 out of that set "
        "(add \\x00 to a [^...] class) if no string needs it there",
        keyword=keyword,
        path=path,
    )


def _add_lengths(node: dict[str, Any], fix: PatternFix) -> None:
    for key, value, tighter in (("minLength", fix.min_length, max), ("maxLength", fix.max_length, min)):
        if value is None or (key == "minLength" and value == 0):
            continue
        current = node.get(key)
        if current is None:
            node[key] = value
        elif isinstance(current, int) and not isinstance(current, bool):
            node[key] = tighter(current, value)
        else:
            node["allOf"] = [*node.get("allOf", []), {key: value}]


def written_as(schema: Any) -> dict[str, str]:
    """{a pattern as ``rewrite_nul_sets`` rewrote it: as ``schema`` spells it}, so that an engine
    message quoting the rewritten regex can name the user's."""
    out: dict[str, str] = {}
    for _, node in iter_subschemas(schema):
        names = node.get("patternProperties")
        for pattern, lengths in [(node.get("pattern"), True)] + [(n, False) for n in names or ()]:
            fix = exact_pattern(pattern, lengths) if isinstance(pattern, str) else None
            if isinstance(fix, PatternFix):
                out[fix.pattern] = pattern
    return out
