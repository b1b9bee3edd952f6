"""``get_obj``'s parsing: the text of a ``gen(json_schema=...)`` as the object its schema
describes (pydantic's value for a type, else the parsed JSON, validated)."""

from __future__ import annotations

from typing import Any


def _parse_obj(name: str, text: Any, schema: Any, meta: dict[str, Any], where: str) -> Any:
    """``get_obj`` for one generated text: pydantic's value of it, or the parsed JSON validated
    against the schema; ``ConstraintViolationError`` otherwise (``where`` names a fork branch)."""
    import json

    from llmir_lang.errors import ConstraintViolationError

    cut = (
        " (generation stopped at max_tokens: raise max_tokens)"
        if meta.get("finish_reason") == "length"
        else ""
    )
    from llmir_lang.executor.constraints.schema_pydantic import is_pydantic_type, type_name, validate_json_as

    if is_pydantic_type(schema):
        try:
            return validate_json_as(schema, text)
        except Exception as e:
            raise ConstraintViolationError(
                f"gen({name!r}){where} does not validate as {type_name(schema)}{cut}: {e}"
            ) from None
    import jsonschema

    from llmir_lang.dsl.lowering import json_validator

    try:
        obj = json.loads(text)
    except (ValueError, TypeError) as e:
        raise ConstraintViolationError(f"gen({name!r}){where} is not JSON{cut}: {e}") from None
    validator = json_validator(schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True))
    try:  # None, or a validator that cannot run (a $ref it cannot resolve): the engine's check stands
        error = jsonschema.exceptions.best_match(validator.iter_errors(obj)) if validator is not None else None
    except Exception:
        error = None
    if error is not None:
        raise ConstraintViolationError(
            f"gen({name!r}){where} does not validate against its schema{cut}: {error.message} "
            f"(at {error.json_path})"
        ) from None
    return obj
