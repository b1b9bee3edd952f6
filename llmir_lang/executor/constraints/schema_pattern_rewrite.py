"""Every ``pattern`` and ``patternProperties`` name of a schema made exact for llguidance.

``rewrite_patterns`` puts each through ``schema_pattern_shorthand.narrow_shorthands`` (``\\d``,
``\\W``, ``\\s``, ... spelled as the characters both ECMA-262 and Python's ``re`` put there), then
``schema_pattern_nul.exact_pattern`` (a set of characters the engine quotes wrong gets its U+0000
set apart), gives a rewrite's string lengths to ``minLength`` / ``maxLength``, and refuses the
schema naming the first pattern with no exact rewrite. ``written_as`` maps the rewritten regexes
back, for the engine's error messages.
"""

from __future__ import annotations

from typing import Any

from llmir_lang.executor.constraints.errors import UnsupportedSchemaError
from llmir_lang.executor.constraints.schema_pattern_nul import PatternFix, exact_pattern
from llmir_lang.executor.constraints.schema_pattern_shorthand import narrow_shorthands
from llmir_lang.executor.constraints.schema_walk import iter_subschemas


def rewrite_patterns(schema: Any, original: Any, notes: list[str]) -> None:
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
            notes.append(f"{path}: pattern {pattern!r} {_what(pattern, fix)}")
        names = node.get("patternProperties")
        if not isinstance(names, dict):
            continue
        fixes = {name: _checked(name, "patternProperties", path, original) for name in names}
        if not any(fixes.values()):
            continue
        for name, fix in fixes.items():
            place = f"{path[1:]}/patternProperties/{name.replace('~', '~0').replace('/', '~1')}"
            if fix is not None and any(f == place or f.startswith(place + "/") for f in fragments):
                why = "the engine gets it rewritten (its name changes), and a $ref points into its subschema"
                fix_it = "point the $ref at a $defs entry"
                raise _refusal(name, "patternProperties", path, original, why, fix_it)
        renamed = zip(names.items(), fixes.values())
        node["patternProperties"] = {(n if fix is None else fix.pattern): sub for (n, sub), fix in renamed}
        what = {_what(n, fix) for n, fix in fixes.items() if fix is not None}
        notes.append(f"{path}: patternProperties names {' / '.join(sorted(what))}")


def _checked(pattern: str, keyword: str, path: str, original: Any) -> PatternFix | None:
    result = _rewritten(pattern, keyword == "pattern")
    if isinstance(result, str):
        raise _refusal(pattern, keyword, path, original, result)
    return result


def _rewritten(pattern: str, lengths: bool) -> PatternFix | str | None:
    """``pattern`` as the engine should get it (module doc), None where as written, or why no
    exact rewrite exists."""
    narrowed = narrow_shorthands(pattern)
    result = exact_pattern(narrowed, lengths)
    return PatternFix(narrowed) if result is None and narrowed != pattern else result


def _what(pattern: str, fix: PatternFix) -> str:
    narrowed = narrow_shorthands(pattern)
    parts = ["with \\d-like classes as ECMA-262 and Python both read them"] if narrowed != pattern else []
    return " and ".join(parts + (["with U+0000 apart from its classes"] if fix.pattern != narrowed else []))


def _refusal(
    pattern: str, keyword: str, path: str, original: Any, why: str, fix: str = ""
) -> UnsupportedSchemaError:
    for where, node in iter_subschemas(original):
        names = node.get("patternProperties") if keyword == "patternProperties" else None
        own = node.get("pattern") == pattern and keyword == "pattern"
        if own or (isinstance(names, dict) and pattern in names):
            path = where
            break
    if fix:
        message = f"{keyword} {pattern!r} at {path}: {why}; {fix}"
        return UnsupportedSchemaError(message, keyword=keyword, path=path)
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
    """{a pattern as ``rewrite_patterns`` rewrote it: as ``schema`` spells it}, so that an engine
    message quoting the rewritten regex can name the user's."""
    out: dict[str, str] = {}
    for _, node in iter_subschemas(schema):
        names = node.get("patternProperties")
        for pattern, lengths in [(node.get("pattern"), True)] + [(n, False) for n in names or ()]:
            fix = _rewritten(pattern, lengths) if isinstance(pattern, str) else None
            if isinstance(fix, PatternFix):
                out[fix.pattern] = pattern
    return out
