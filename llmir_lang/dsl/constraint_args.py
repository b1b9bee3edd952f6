"""A gen's or select's constraint arguments as IR attributes, checked where they are written:
choice lists, ``dtype`` names, ``json_schema`` as JSON text, and a regex or schema that does not
parse (``_check_constraint``), so the error names the user's line, not the run."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from llmir_lang.dsl.errors import DSLError, SourceLocation
from llmir_lang.errors import ConstraintError, NotYetSupportedError


def _choice_list(choices: object, where: SourceLocation | None, what: str) -> list[str]:
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise DSLError(f"{what} must be a list of strings, got {type(choices).__name__}", where=where)
    out = list(choices)
    if not out:
        raise DSLError(f"{what} must not be empty", where=where)
    bad = [c for c in out if not isinstance(c, str) or c == ""]
    if bad:
        raise DSLError(f"{what} must be non-empty strings; bad: {bad!r}", where=where)
    # repeats are kept: a select's meta info has one entry per choice as given (SGLang's shape),
    # and the IR builder scores each distinct choice once; gen's constraint drops them itself
    return out


def _check_constraint(given: dict[str, Any], where: SourceLocation | None, name: str | None) -> None:
    """Build the constraint spec now, so a malformed schema or choice list is reported at the
    gen's line (a regex or grammar is only compiled when the gen runs)."""
    from llmir_lang.dsl.lowering import constraint_spec

    try:
        constraint_spec(given)
    except NotYetSupportedError:
        pass  # reported when the gen runs, where the backend decides
    except ConstraintError as e:
        raise DSLError(f"gen({name!r}): {e}", where=where) from e
    pattern = given.get("regex")
    problem = _regex_syntax_error(pattern) if isinstance(pattern, str) else None
    if problem is not None:  # else it failed only when the gen ran, after the gens before it
        raise DSLError(f"gen({name!r}): regex {pattern!r} does not parse: {problem}", where=where)


@functools.lru_cache(maxsize=256)
def _regex_syntax_error(pattern: str) -> str | None:
    """The syntax error of a ``regex=`` pattern (Rust regex syntax, which both constraint engines
    parse alike), or None; checked without a tokenizer (about a millisecond, once per pattern).
    Only a parse error counts here: anything else is the engine's to decide when the gen runs."""
    try:
        import llguidance

        grammar = llguidance.grammar_from("regex", pattern)
        messages = llguidance.LLMatcher.validate_grammar(grammar)
    except Exception:
        return None
    text = messages if isinstance(messages, str) else " ".join(str(m) for m in messages or [])
    if "regex parse error" not in text:
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("error:")]
    return lines[0].removeprefix("error:").strip() if lines else text.strip().splitlines()[0]


def _dtype_name(dtype: type | str, where: SourceLocation | None) -> str:
    names = {int: "int", float: "float", bool: "bool", str: "str"}
    name = names.get(dtype, dtype) if isinstance(dtype, type) else dtype  # type: ignore[call-overload]
    if name not in ("int", "float", "bool", "str"):
        raise DSLError(f"dtype must be int, float, bool or str, got {dtype!r}", where=where)
    return str(name)


def _schema_text(schema: object, where: SourceLocation | None) -> str:
    """A JSON schema as text: a string as is, a dict dumped, the schema of a type pydantic
    validates (a model class, a dataclass, a TypedDict, ``list[Item]``, ...)."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    from llmir_lang.executor.constraints.schema_pydantic import is_pydantic_type, pydantic_json_schema

    if is_pydantic_type(schema):
        # narrowed to what the type's own validation accepts (a NaiveDatetime, a UUID4, ...)
        return json.dumps(pydantic_json_schema(schema))
    raise DSLError(
        "json_schema must be a JSON string, a dict, or a type pydantic validates (a BaseModel "
        "subclass, a dataclass, a TypedDict, list[Item], ...), got "
        + (repr(schema) if isinstance(schema, type) else type(schema).__name__)
        + ("; for a single int / float / bool / str value use dtype=" if schema in (int, float, bool, str) else ""),
        where=where,
    )
