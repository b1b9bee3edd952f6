"""The JSON schema of a pydantic model, narrowed to texts the model's own validation accepts.

``model_json_schema()`` describes a field by its JSON type and a ``format`` name, which loses
what pydantic's validator checks besides: a ``NaiveDatetime`` and an ``AwareDatetime`` are both
``format: date-time``, a ``timedelta`` is ``format: duration`` (whose regex admits durations past
``timedelta``'s 999,999,999 days), a ``UUID4`` is ``format: uuid4`` (unknown to the engine, so
dropped: any string), bounds on dates and decimal digit counts are not written at all. The
constraint of a model must only generate values the model validates, so ``pydantic_json_schema``
builds the schema with a generator that reads pydantic's core schema and writes, per field:

- ``NaiveDatetime``: a pattern of date-times without an offset; ``AwareDatetime``: with one
  (plain ``datetime`` reads both; its ``format: date-time`` rewrite generates aware ones, a subset).
- ``timedelta``: a pattern of ISO 8601 durations whose every digit count keeps the value inside
  what pydantic reads (``_DURATION``; a conservative subset).
- ``UUID1`` .. ``UUID8``: a pattern fixing the version digit and the RFC 4122 variant (pydantic
  checks both); ``IPvAnyAddress``: ``anyOf`` the ``ipv4`` / ``ipv6`` formats.
- ``Decimal``: a plain decimal text (string), digit counts bounded by ``max_digits`` /
  ``decimal_places``; with numeric bounds, the JSON number pydantic wrote (the bounds keep it finite).
- ``bytes`` with a length bound: printable ASCII only (the bound counts bytes, JSON counts characters).
- URLs with ``allowed_schemes`` (``HttpUrl``) or ``host_required``: a pattern of simple URLs.
- ``EmailStr`` (``format: email``, which generates addresses pydantic's email-validator refuses:
  no period after the @, labels past 63 characters, special-use domains): a pattern of plain
  addresses (``EMAIL_PATTERN``; a conservative subset).
- finite-only floats (``FiniteFloat``, ``allow_inf_nan=False``) and bounded decimals: an open side
  bounded at 1e18 (a JSON number past 1.8e308 reads as infinity, which they refuse).
- a float with a ``multiple_of`` that binary floats do not hold exactly (0.1, not 0.25): within
  +-1e6 (pydantic's float check refuses some multiples past 2**23: ``8388857.7`` is no
  multiple of 0.1 to it).
- ``set`` / ``frozenset``: arrays without ``uniqueItems`` (which no engine enforces; pydantic drops
  duplicates), refused where a ``min_length`` of 2 or more would count items after that.
- ``ByteSize``: a number and one of pydantic's units (its pattern admits any word as a unit).
- a string stripped of whitespace (``strip_whitespace``, ``str_strip_whitespace``) with a
  ``min_length``: no whitespace at either end (pydantic counts the length after stripping).

and refuses with ``UnsupportedSchemaError`` (naming the field) what no pattern expresses:
``FutureDate`` / ``PastDate`` / ``FutureDatetime`` / ``PastDatetime`` (the accepted set moves with
the clock), bounds on dates, times, date-times and durations, ``Json[...]`` fields, and any other
``format`` the engine does not know (pydantic writes one for a type it validates: networks,
interfaces, paths that must exist, colors, ``base64`` bytes, ...; only ``password`` and
``binary``, any string to pydantic, pass).
"""

from __future__ import annotations

import decimal
import functools
import re
from typing import Any

from llmir_lang.executor.constraints.errors import InvalidSchemaError, UnsupportedSchemaError
from llmir_lang.executor.constraints.schema_formats import llguidance_knows_format
from llmir_lang.executor.constraints.schema_pydantic_patterns import (
    _ANY_STRING_FORMATS,
    _HEX,
    _URL_REST,
    _UUID_VERSION,
    AWARE_DATETIME_PATTERN,
    AWARE_TIME_PATTERN,
    DURATION_PATTERN,
    EMAIL_PATTERN,
    NAIVE_DATETIME_PATTERN,
    NAIVE_TIME_PATTERN,
    STRIPPED_PATTERN,
    _byte_size_pattern,
    _decimal_pattern,
)
from llmir_lang.executor.constraints.schema_walk import iter_subschemas

# A generator writes this key where a field cannot be constrained exactly; ``pydantic_json_schema``
# turns the first one into an error naming the field (the generator does not know the path).
_REFUSE = "x-llmir-refuse"

# A float multiple_of check in pydantic fails past about 2**23 (8.4e6) where the step is no binary
# fraction (0.1, 12.3: measured with pydantic-core on random multiples); 1e6 keeps clear.
_INEXACT_STEP_LIMIT = 1e6


# The engine builds number ranges up to about 1e18 (1e19 and past: "Failed to generate regex for
# float range"), so a finite-only float with an open side is bounded there: a subset.
_FLOAT_LIMIT = 1e18


def _within(number: dict[str, Any], limit: float) -> None:
    """Narrow ``number``'s bounds to ``[-limit, limit]`` (a bound already inside stays)."""
    for inclusive, exclusive, sign in (
        ("maximum", "exclusiveMaximum", 1),
        ("minimum", "exclusiveMinimum", -1),
    ):
        for key in (inclusive, exclusive):
            if key in number and sign * number[key] > limit:
                del number[key]
        if inclusive not in number and exclusive not in number:
            number[inclusive] = sign * limit


def _refuse(why: str) -> dict[str, Any]:
    return {"type": "string", _REFUSE: why}


def _bounds(schema: dict[str, Any]) -> list[str]:
    return [k for k in ("gt", "ge", "lt", "le") if schema.get(k) is not None]


@functools.cache
def _generator_class() -> type:
    from pydantic.json_schema import GenerateJsonSchema

    class NarrowingGenerator(GenerateJsonSchema):
        """``GenerateJsonSchema`` whose temporal, decimal, bytes, URL and float schemas are
        narrowed to what pydantic's validator of the same core schema accepts."""

        def _temporal(self, schema: Any, what: str) -> dict[str, Any] | None:
            if schema.get("now_op"):
                return _refuse(
                    f"a {what} that must lie in the {schema['now_op']} (Future*/Past* types): the "
                    "values it accepts change with the clock, so no fixed constraint generates only "
                    "valid ones; use the plain type and check the time after parsing"
                )
            if _bounds(schema):
                return _refuse(
                    f"a {what} with bounds ({', '.join(_bounds(schema))}): the JSON schema cannot "
                    "state them; drop the bounds and check after parsing"
                )
            if isinstance(schema.get("tz_constraint"), int):
                return _refuse(f"a {what} with a fixed UTC offset, which the constraint cannot express")
            return None

        def _zoned(self, schema: Any, what: str, naive: str, aware: str, plain: Any) -> Any:
            """A datetime or time: refused (``_temporal``), or the pattern of its ``tz_constraint``
            (naive / aware), or pydantic's own schema (``plain``)."""
            refused = self._temporal(schema, what)
            if refused is not None:
                return refused
            pattern = {"naive": naive, "aware": aware}.get(schema.get("tz_constraint"))
            return {"type": "string", "pattern": pattern} if pattern is not None else plain(schema)

        def datetime_schema(self, schema: Any) -> Any:
            return self._zoned(
                schema, "datetime", NAIVE_DATETIME_PATTERN, AWARE_DATETIME_PATTERN, super().datetime_schema
            )

        def date_schema(self, schema: Any) -> Any:
            return self._temporal(schema, "date") or super().date_schema(schema)

        def time_schema(self, schema: Any) -> Any:
            return self._zoned(schema, "time", NAIVE_TIME_PATTERN, AWARE_TIME_PATTERN, super().time_schema)

        def timedelta_schema(self, schema: Any) -> Any:
            refused = self._temporal(schema, "timedelta")
            if refused is not None:
                return refused
            base = super().timedelta_schema(schema)
            if base.get("format") != "duration":  # ser_json_timedelta='float': a number of seconds
                return _refuse("a timedelta read as a number of seconds (ser_json_timedelta='float')")
            return {"type": "string", "pattern": DURATION_PATTERN}

        def decimal_schema(self, schema: Any) -> Any:
            digits, places = schema.get("max_digits"), schema.get("decimal_places")
            bounded = _bounds(schema) or schema.get("multiple_of") is not None
            if not bounded:
                return {"type": "string", "pattern": _decimal_pattern(digits, places)}
            if digits is not None or places is not None:
                return _refuse(
                    "a Decimal with both numeric bounds and max_digits / decimal_places, which one "
                    "JSON schema cannot state together; keep one of the two"
                )
            base = super().decimal_schema(schema)
            number = next((b for b in base.get("anyOf", [base]) if b.get("type") == "number"), None)
            if number is None:
                return _refuse("a Decimal whose JSON schema has no number form")
            return self._finite(dict(number))

        def float_schema(self, schema: Any) -> Any:
            base = super().float_schema(schema)
            step = schema.get("multiple_of")
            if (
                step is not None
                and not float(step).is_integer()
                and decimal.Decimal(str(step)) != decimal.Decimal(step)
            ):
                _within(base, _INEXACT_STEP_LIMIT)
            return self._finite(base) if schema.get("allow_inf_nan") is False else base

        def set_schema(self, schema: Any) -> Any:
            return self._distinct(super().set_schema(schema), "set")

        def frozenset_schema(self, schema: Any) -> Any:
            return self._distinct(super().frozenset_schema(schema), "frozenset")

        def _distinct(self, base: dict[str, Any], what: str) -> dict[str, Any]:
            # pydantic reads a JSON array with repeats as the set of its items: the array needs no
            # uniqueItems, except that a lower bound then counts distinct items, which no
            # constraint keeps apart
            if base.get("minItems", 0) >= 2:
                return _refuse(
                    f"a {what} of at least {base['minItems']} items: pydantic counts them after "
                    "dropping repeats, which the constraint cannot keep apart; use a list with "
                    "min_length and make the set after parsing"
                )
            return {k: v for k, v in base.items() if k != "uniqueItems"}

        def str_schema(self, schema: Any) -> Any:
            import pydantic

            base = super().str_schema(schema)
            if schema.get("pattern") == pydantic.ByteSize.byte_string_pattern:
                base["pattern"] = _byte_size_pattern()
            strip = schema.get("strip_whitespace")
            if strip is None:  # the model's str_strip_whitespace, which pydantic keeps in its config
                strip = getattr(self._config, "str_strip_whitespace", False)
            if strip and base.get("minLength", 0) >= 1:
                # the length is counted after stripping: " a" is 1 character to min_length=2
                if "pattern" in base:
                    base["allOf"] = [*base.get("allOf", []), {"pattern": STRIPPED_PATTERN}]
                else:
                    base["pattern"] = STRIPPED_PATTERN
            return base

        def _finite(self, number: dict[str, Any]) -> dict[str, Any]:
            # JSON numbers past 1.8e308 read as inf; bound each open side
            if "maximum" not in number and "exclusiveMaximum" not in number:
                number["maximum"] = _FLOAT_LIMIT
            if "minimum" not in number and "exclusiveMinimum" not in number:
                number["minimum"] = -_FLOAT_LIMIT
            return number

        def bytes_schema(self, schema: Any) -> Any:
            base = super().bytes_schema(schema)
            if base.get("format") == "binary" and (
                schema.get("max_length") is not None or schema.get("min_length") is not None
            ):
                base = {**base, "pattern": "^[ -~]*$"}
            return base

        def url_schema(self, schema: Any) -> Any:
            base = super().url_schema(schema)
            schemes = schema.get("allowed_schemes")
            if not schemes and not schema.get("host_required"):
                return base
            if schemes:
                scheme = "(?:" + "|".join(re.escape(s.lower()) for s in schemes) + ")"
            else:
                scheme = "[a-z][a-z0-9+.-]{0,15}"
            out = {k: v for k, v in base.items() if k != "format"}
            out["pattern"] = f"^{scheme}://{_URL_REST}$"
            return out

        def json_schema(self, schema: Any) -> Any:  # Json[...] fields: JSON text inside a string
            return _refuse("a Json[...] field (JSON text inside a string), which the engine does not nest")

    return NarrowingGenerator


def _field_name(path: str) -> str:
    parts = path.split("/")
    if len(parts) >= 2 and parts[-2] == "properties":
        return f"field {parts[-1].replace('~1', '/').replace('~0', '~')!r} ({path})"
    return path


def _refused(path: str, why: str) -> UnsupportedSchemaError:
    return UnsupportedSchemaError(f"pydantic {_field_name(path)}: {why}", keyword="format", path=path)


def is_pydantic_type(obj: Any) -> bool:
    """Whether ``obj`` is a type whose JSON documents pydantic validates, to be taken as a
    ``json_schema``: a ``BaseModel`` subclass, a dataclass (standard or pydantic), a ``TypedDict``,
    or a parametrized type (``list[Item]``, ``dict[str, int]``, ``Item | None``, ``Literal[...]``,
    ``Annotated[...]``). Plain ``int`` / ``str`` / ``dict`` are not (``dtype=`` covers scalars)."""
    import dataclasses
    import typing

    import typing_extensions  # pydantic's own dependency; its is_typeddict knows both kinds

    if isinstance(obj, type):
        if callable(getattr(obj, "model_json_schema", None)) or dataclasses.is_dataclass(obj):
            return True
        return typing_extensions.is_typeddict(obj)
    return typing.get_origin(obj) is not None


def _adapter(tp: Any) -> Any:
    """pydantic's ``TypeAdapter`` of ``tp``, made once per type (a type with unhashable metadata
    gets a new one each time)."""
    try:
        return _cached_adapter(tp)
    except TypeError:  # unhashable: Annotated metadata without __hash__
        import pydantic

        return pydantic.TypeAdapter(tp)


@functools.lru_cache(maxsize=256)
def _cached_adapter(tp: Any) -> Any:
    import pydantic

    return pydantic.TypeAdapter(tp)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and callable(getattr(tp, "model_validate_json", None))


def validate_json_as(tp: Any, text: str | bytes) -> Any:
    """``text`` validated as ``tp`` (an ``is_pydantic_type``): a model instance, a dataclass
    instance, a dict, a list, ...; pydantic's ``ValidationError`` when it is not one."""
    return tp.model_validate_json(text) if _is_model(tp) else _adapter(tp).validate_json(text)


def dump_json_value(tp: Any, value: Any) -> Any:
    """``value`` (from ``validate_json_as(tp, ...)``) as plain JSON data, keyed by aliases as the
    schema is (by field name, a record of ``Field(alias="name")`` did not validate again)."""
    if _is_model(tp):
        return value.model_dump(mode="json", by_alias=True)
    return _adapter(tp).dump_python(value, mode="json", by_alias=True)


def type_name(tp: Any) -> str:
    """``Person``, ``list[Item]``: how messages name a type."""
    return tp.__name__ if isinstance(tp, type) else repr(tp).replace("typing.", "")


def pydantic_json_schema(model: Any) -> dict[str, Any]:
    """The JSON schema of ``model`` (a ``BaseModel`` subclass, or any ``is_pydantic_type``, through
    pydantic's ``TypeAdapter``), narrowed so that the constraint built from it generates only
    values ``model`` validates; ``UnsupportedSchemaError`` (naming the field) where a field's
    accepted texts cannot be written as a schema the engine enforces."""
    import pydantic

    try:
        if _is_model(model):
            schema = model.model_json_schema(schema_generator=_generator_class())
        else:
            schema = _adapter(model).json_schema(schema_generator=_generator_class())
    except (
        pydantic.PydanticUserError
    ) as e:  # the type itself: a typing.TypedDict before 3.12, a Callable field
        raise InvalidSchemaError(
            f"pydantic cannot build the JSON schema of {type_name(model)}: {e}"
        ) from None
    for path, node in iter_subschemas(schema):
        why = node.pop(_REFUSE, None)
        if why is not None:
            raise _refused(path, why)
        if "contentSchema" in node or node.get("contentMediaType") == "application/json":
            raise _refused(path, "JSON text inside a string (Json[...]), which the engine does not nest")
        fmt = node.get("format")
        if not isinstance(fmt, str):
            continue
        m = _UUID_VERSION.fullmatch(fmt)
        if m:
            del node["format"]
            node["pattern"] = (
                f"^{_HEX}{{8}}-{_HEX}{{4}}-{m.group(1)}{_HEX}{{3}}-[89abAB]{_HEX}{{3}}-{_HEX}{{12}}$"
            )
        elif fmt == "ipvanyaddress":
            del node["format"]
            node["anyOf"] = [{"format": "ipv4"}, {"format": "ipv6"}]
        elif fmt == "email":
            del node["format"]
            node["pattern"] = EMAIL_PATTERN
        elif fmt not in _ANY_STRING_FORMATS and not llguidance_knows_format(fmt):
            raise _refused(
                path,
                f"format {fmt!r}: pydantic validates it but the engine has no constraint for it, so "
                "it would generate strings the model rejects; use str and convert after parsing",
            )
    return schema
