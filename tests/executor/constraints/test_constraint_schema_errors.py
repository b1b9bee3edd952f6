"""JSON-schema errors are typed and named, and schema numbers a float cannot hold are refused.

- Integers beyond ±2**53 in ``const`` / ``enum`` / bounds / ``multipleOf`` were rounded by
  llguidance (which reads schema numbers as 64-bit floats): ``{"const": 9007199254740993}``
  generated ``9007199254740992``. They are an ``UnsupportedSchemaError`` naming keyword and path
  now, on every engine; integers up to ±2**53 compile and constrain exactly as before.
- llguidance errors that were a bare ``ConstraintError`` ("Invalid type: foo", "min/maxProperties
  only supported when...") are an ``InvalidSchemaError`` when the schema fails its metaschema,
  else an ``UnsupportedSchemaError``, naming keyword and path where they can be found.
- "Unable to determine if regex is empty" is not a proof: it is unsupported, not unsatisfiable.
"""

from __future__ import annotations

import json

import pytest

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints import (
    ConstraintCompiler,
    InvalidSchemaError,
    UnsatisfiableConstraintError,
    UnsupportedSchemaError,
    spec_from_json_schema,
)
from llmir_lang.executor.constraints.schema_rewrite import llguidance_error
from llmir_lang.executor.constraints.testing import accepts_text

N = 2**53  # 9007199254740992: every integer up to it is exact in a 64-bit float


def _refused(compiler, schema, cls):
    with pytest.raises(cls) as e:
        compiler.compile(spec_from_json_schema(schema))
    assert type(e.value) is cls, type(e.value)
    return e.value


# --- integers a 64-bit float cannot hold -----------------------------------------------------
BIG_INTEGERS = [
    ({"const": N + 1}, "const", "#"),
    ({"const": -(N + 1)}, "const", "#"),
    (
        {"type": "object", "properties": {"id": {"const": 12345678901234567890}}, "required": ["id"]},
        "const",
        "#/properties/id",
    ),
    ({"enum": [1, 2, N + 3]}, "enum", "#"),
    ({"enum": [{"id": [N + 1]}, "x"]}, "enum", "#"),  # inside an object / array value
    ({"const": 2**60}, "const", "#"),  # exact in a float, still beyond 2**53: refused too
    ({"type": "integer", "minimum": N + 1, "maximum": N + 3}, "minimum", "#"),
    ({"type": "integer", "maximum": 2**63 - 1}, "maximum", "#"),
    ({"type": "number", "exclusiveMinimum": -(N + 5)}, "exclusiveMinimum", "#"),
    ({"type": "integer", "exclusiveMaximum": 10**20}, "exclusiveMaximum", "#"),
    ({"type": "integer", "multipleOf": N + 1}, "multipleOf", "#"),
    ({"anyOf": [{"type": "string"}, {"const": N + 1}]}, "const", "#/anyOf/1"),
    ({"type": "array", "items": {"enum": [N + 1]}}, "enum", "#/items"),
    ({"type": "array", "prefixItems": [{"type": "integer", "maximum": N + 1}]}, "maximum", "#/prefixItems/0"),
    ({"$defs": {"big": {"const": N + 1}}, "$ref": "#/$defs/big"}, "const", "#/$defs/big"),
    (
        {"type": "object", "properties": {"a/b": {"not": {"minimum": N + 1}}}},
        "minimum",
        "#/properties/a~1b/not",
    ),
]


@pytest.mark.parametrize(("schema", "keyword", "path"), BIG_INTEGERS)
def test_integers_beyond_2_53_are_refused_with_keyword_and_path(compiler, schema, keyword, path):
    err = _refused(compiler, schema, UnsupportedSchemaError)
    assert (err.keyword, err.path) == (keyword, path)
    message = str(err)
    assert f"{keyword!r} at {path} " in message
    assert "2**53" in message and "string" in message  # what to do: big ids as strings


@pytest.mark.parametrize("engine", ["llguidance", "outlines-core"])
def test_big_integers_are_refused_whatever_the_engine(bpe_info, engine):
    c = ConstraintCompiler(bpe_info, engine=engine)
    err = _refused(c, {"const": 9007199254740993}, UnsupportedSchemaError)
    assert err.keyword == "const" and err.path == "#"


def test_integers_up_to_2_53_still_compile_and_constrain_exactly(compiler, bpe_hf):
    cases = [
        ({"const": N - 1}, [N - 1], [N - 2, N]),
        ({"const": N}, [N], [N - 1, N + 1]),
        ({"const": -N}, [-N], [-N + 1, -N - 1]),
        ({"enum": [N - 1, -(N - 1), 5]}, [N - 1, -(N - 1), 5], [N - 2, 4]),
        ({"type": "integer", "minimum": N - 2, "maximum": N}, [N - 2, N - 1, N], [N - 3, N + 1]),
        ({"type": "integer", "exclusiveMinimum": N - 2, "exclusiveMaximum": N}, [N - 1], [N - 2, N]),
        ({"type": "integer", "minimum": -N, "maximum": -N + 1}, [-N, -N + 1], [-N - 1, -N + 2]),
        ({"const": 42}, [42], [41, 420]),
        ({"enum": ["a", 7, None]}, ["a", 7, None], ["b", 8]),
        ({"type": "integer", "minimum": -5, "maximum": 5}, [-5, 0, 5], [-6, 6]),
    ]
    for schema, good, bad in cases:
        compiled = compiler.compile(spec_from_json_schema(schema))
        for value in good:
            assert accepts_text(compiled, bpe_hf, json.dumps(value)).accepted, (schema, value)
        for value in bad:
            assert not accepts_text(compiled, bpe_hf, json.dumps(value)).accepted, (schema, value)


def test_big_ids_as_strings_and_big_numbers_in_annotations_are_fine(compiler, bpe_hf):
    ids = {
        "type": "object",
        "properties": {"id": {"type": "string", "pattern": "^-?[0-9]+$"}},
        "required": ["id"],
    }
    compiled = compiler.compile(spec_from_json_schema(ids))
    assert accepts_text(compiled, bpe_hf, '{"id":"12345678901234567890"}').accepted
    assert compiler.compile(spec_from_json_schema({"const": "9007199254740993"}))
    # annotations, and a property that is merely *named* like a keyword, are not numbers to enforce
    assert compiler.compile(spec_from_json_schema({"type": "integer", "minimum": 0, "default": 2**60}))
    named = {
        "type": "object",
        "properties": {"maximum": {"type": "integer"}},
        "examples": [{"maximum": N + 1}],
    }
    assert compiler.compile(spec_from_json_schema(named))


def test_integers_over_64_bits_elsewhere_are_named(compiler):
    err = _refused(compiler, {"type": "string", "maxLength": 2**70}, UnsupportedSchemaError)
    assert err.keyword == "maxLength" and err.path == "#" and "#/maxLength" in str(err)


# --- invalid schemas -------------------------------------------------------------------------
INVALID = [
    ({"type": "foo"}, "type", "#"),
    ({"type": ["string", 5]}, "type", "#"),
    ({"type": "string", "minLength": "3"}, "minLength", "#"),
    ({"type": "string", "minLength": -1}, "minLength", "#"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": "a"}, "required", "#"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": [1]}, "required", "#"),
    ({"type": "number", "multipleOf": 0}, "multipleOf", "#"),
    ({"properties": {"a": 5}}, "properties", "#"),
    ({"type": "array", "items": {"type": "string", "pattern": 5}}, "pattern", "#/items"),
    # a property *named* minLength holding a bad minLength
    (
        {"type": "object", "properties": {"minLength": {"minLength": "x"}}},
        "minLength",
        "#/properties/minLength",
    ),
    # declared draft: checked against that draft's metaschema
    ({"$schema": "http://json-schema.org/draft-07/schema#", "type": "strin"}, "type", "#"),
]


@pytest.mark.parametrize(("schema", "keyword", "path"), INVALID)
def test_invalid_schemas_are_invalid_schema_errors_naming_keyword_and_path(compiler, schema, keyword, path):
    err = _refused(compiler, schema, InvalidSchemaError)
    assert (err.keyword, err.path) == (keyword, path)
    assert f"keyword {keyword!r} of the subschema at {path}" in str(err)


def test_a_draft4_schema_without_schema_keyword_is_not_called_invalid(compiler):
    """``exclusiveMinimum: true`` is draft 4 (invalid in 2020-12): another fault is reported."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "exclusiveMinimum": True}},
        "maxProperties": 1,
    }
    err = _refused(compiler, schema, UnsupportedSchemaError)
    assert err.keyword == "maxProperties"


# --- valid schemas the engine cannot take --------------------------------------------------------
def _intersection_too_deep():
    cycle = {
        "x0": {"additionalProperties": {"$ref": "#/$defs/x1"}, "minProperties": 1},
        "x1": {"additionalProperties": {"$ref": "#/$defs/x0"}},
        "y0": {"additionalProperties": {"$ref": "#/$defs/y1"}, "minProperties": 1},
        "y1": {"additionalProperties": {"$ref": "#/$defs/y2"}},
        "y2": {"additionalProperties": {"$ref": "#/$defs/y0"}},
    }
    return {"allOf": [{"$ref": "#/$defs/x0"}, {"$ref": "#/$defs/y0"}], "$defs": cycle}


UNSUPPORTED = [
    (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "maxProperties": 1},
        "maxProperties",
        "#",
        "all required",
    ),
    (
        {
            "type": "object",
            "properties": {"o": {"type": "object", "properties": {"a": {}}, "minProperties": 1}},
        },
        "minProperties",
        "#/properties/o",
        "all required",
    ),
    ({"type": "number", "minimum": 1e308}, "minimum", "#", "Failed to generate regex"),
    (
        {"type": "object", "properties": {"x": {"maximum": -1e308}}},
        "maximum",
        "#/properties/x",
        "float range",
    ),
    ({"type": "integer", "multipleOf": N - 1}, "multipleOf", "#", "too many digits"),
    (
        {"type": "object", "patternProperties": {"^a": {"type": "integer"}, "b$": {"type": "string"}}},
        "patternProperties",
        "#",
        "/^a/ and /b$/",
    ),
    (
        {"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}], "type": "object"}}, "$ref": "#/$defs/a"},
        "$ref",
        "#/$defs/a",
        "circular references",
    ),
    (_intersection_too_deep(), "allOf", "#", "Schema intersection stack level exceeded"),
    (
        {
            "type": "object",
            "properties": {"s": {"type": "string", "pattern": "^([a-z][0-9])+$", "minLength": 10000}},
        },
        "pattern",
        "#/properties/s",
        "too complex",
    ),
]


@pytest.mark.parametrize(("schema", "keyword", "path", "text"), UNSUPPORTED)
def test_unsupported_constructs_name_keyword_and_path(compiler, schema, keyword, path, text):
    err = _refused(compiler, schema, UnsupportedSchemaError)
    assert (err.keyword, err.path) == (keyword, path)
    assert f"{keyword!r} at {path}" in str(err) or f"at {path} " in str(err)
    assert text in str(err)


def test_undecided_regex_emptiness_is_not_called_unsatisfiable(compiler):
    """ "Unable to determine if regex is empty" matched "is empty" and became unsatisfiable; this
    schema has solutions ("a0" * 5000). A regex llguidance proves empty stays unsatisfiable."""
    satisfiable = {"type": "string", "pattern": "^([a-z][0-9])+$", "minLength": 10000}
    err = _refused(compiler, satisfiable, UnsupportedSchemaError)
    assert "too complex" in str(err) and "minLength" in str(err) and err.keyword == "pattern"
    _refused(compiler, {"type": "string", "pattern": "^a$", "minLength": 5}, UnsatisfiableConstraintError)
    _refused(compiler, {"type": "string", "minLength": 5, "maxLength": 3}, UnsatisfiableConstraintError)


def test_unknown_llguidance_messages_stay_unsupported_with_their_text():
    for message in ("schema too large", "some future llguidance failure\nwith detail"):
        err = llguidance_error(message, {"type": "object"})
        assert type(err) is UnsupportedSchemaError
        assert message.splitlines()[0] in str(err)
    # every message gets a subclass, never the bare base class
    assert type(llguidance_error("", {})) is not ConstraintError


def test_integral_float_counts_compile(compiler, bpe_hf):
    """``minLength: 2.0`` is the integer 2 in JSON Schema; llguidance wanted an integer token."""
    compiled = compiler.compile(spec_from_json_schema({"type": "string", "minLength": 2.0, "maxLength": 3.0}))
    assert accepts_text(compiled, bpe_hf, '"ab"').accepted
    assert not accepts_text(compiled, bpe_hf, '"a"').accepted
    assert not accepts_text(compiled, bpe_hf, '"abcd"').accepted
