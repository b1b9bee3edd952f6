"""JSON-schema errors are typed and named, and schema numbers a float cannot hold are refused.

- Integers beyond ±2**53 in ``const`` / ``enum`` / bounds / ``multipleOf`` were rounded by
  llguidance (which reads schema numbers as 64-bit floats): ``{"const": 9007199254740993}``
  generated ``9007199254740992``. They are an ``UnsupportedSchemaError`` naming keyword and path
  now, on every engine; integers up to ±2**53 compile and constrain exactly as before.
- llguidance errors that were a bare ``ConstraintError`` ("Invalid type: foo", "min/maxProperties
  only supported when...") are an ``InvalidSchemaError`` when the schema fails its metaschema,
  else an ``UnsupportedSchemaError``, naming keyword and path where they can be found.
- "Unable to determine if regex is empty" is not a proof: it is unsupported, not unsatisfiable.
- A float ``const`` / ``enum`` member needing 17 significant digits was generated as a
  neighbouring float (``{"const": 1.4000000000000001}`` generated ``1.4``): llguidance's JSON
  reader is inexact there. Every float is now handed to it as a text it reads exactly, and the
  few that no text gives exactly (``1.9000000000000001``) are refused, naming keyword and path.
- A ``$ref`` cycle that never reaches a constraint (``{"allOf": [{"$ref": "#"}]}``) was called
  unsatisfiable; JSON Schema leaves it undefined (``jsonschema`` recurses forever on it), and it
  is a ``ReferenceLoopError`` (an ``UnsupportedSchemaError``) naming the ``$ref`` and the cycle
  now (loops next to a constraint: ``test_constraint_literals_and_loops.py``).
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints import (
    ConstraintCompiler,
    InvalidSchemaError,
    ReferenceLoopError,
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
    ({"type": "integer", "multipleOf": N - 1}, "multipleOf", "#", "significant digits"),
    (
        {"type": "object", "patternProperties": {"^a": {"type": "integer"}, "b$": {"type": "string"}}},
        "patternProperties",
        "#",
        "/^a/ and /b$/",
    ),
    (
        # (through a part of the value: not a reference loop, which ``allOf: [{$ref: a}]`` in a
        # is, and is refused as one before llguidance sees it)
        {
            "$defs": {
                "a": {"type": "object", "properties": {"n": {"$ref": "#/$defs/a", "minProperties": 1}}}
            },
            "$ref": "#/$defs/a",
        },
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


# --- floats that need 17 significant digits ----------------------------------------------------
# Each was generated as a neighbouring float before: llguidance read 1.4000000000000001 as 1.4.
ROUNDED_FLOATS = [
    1.4000000000000001,
    14.142135623730951,
    110.00000000000001,
    -9.200000000000001,
    13.927370519815263,
]
# llguidance's reader makes no number text into these (19 * 0.1, 38 * 0.1): refused, not rounded.
UNREADABLE_FLOATS = [1.9000000000000001, 3.8000000000000003]


def _exact_or_refused(compiler, schema, value):
    """True when the constraint generates exactly ``value``, False when the schema is refused with
    the float named; never a neighbouring float."""
    try:
        compiled = compiler.compile(spec_from_json_schema(schema))
    except UnsupportedSchemaError as e:
        # no text llguidance reads as it; or, beyond 2**53, it writes it as another integer
        assert repr(value) in str(e) and ("15 significant digits" in str(e) or "±2**53" in str(e)), str(e)
        return False
    forced = compiled.new_matcher().forced_text()
    assert float(forced) == value and json.loads(forced) == value, (value, forced)
    return True


def test_float_consts_and_enums_are_generated_exactly(compiler, bpe_hf):
    for v in [*ROUNDED_FLOATS, 0.30000000000000004, 1.0000000000000002]:
        assert _exact_or_refused(compiler, {"const": v}, v), v
        compiled = compiler.compile(spec_from_json_schema({"const": v}))
        assert accepts_text(compiled, bpe_hf, repr(v)).accepted, v
    for text, wrong in {"1.4000000000000001": "1.4", "14.142135623730951": "14.142135623730953"}.items():
        compiled = compiler.compile(spec_from_json_schema({"const": float(text)}))
        assert not accepts_text(compiled, bpe_hf, wrong).accepted, wrong
    enum = compiler.compile(spec_from_json_schema({"enum": [1.4000000000000001, 110.00000000000001, "x"]}))
    for good in ("1.4000000000000001", "110.00000000000001", '"x"'):
        assert accepts_text(enum, bpe_hf, good).accepted, good
    for bad in ("1.4", "110.0", "110"):
        assert not accepts_text(enum, bpe_hf, bad).accepted, bad
    obj = {
        "type": "object",
        "properties": {"x": {"const": [110.00000000000001, {"y": -9.200000000000001}]}},
        "required": ["x"],
        "additionalProperties": False,
    }
    compiled = compiler.compile(spec_from_json_schema(obj))
    assert accepts_text(compiled, bpe_hf, '{"x":[110.00000000000001,{"y":-9.200000000000001}]}').accepted
    assert not accepts_text(compiled, bpe_hf, '{"x":[110.00000000000001,{"y":-9.2}]}').accepted


def test_floats_the_engine_cannot_hold_are_refused_never_rounded(compiler):
    for v in UNREADABLE_FLOATS:
        schema = {"type": "object", "properties": {"p": {"enum": ["a", v]}}}
        if not _exact_or_refused(compiler, {"const": v}, v):  # exact, should llguidance's reader improve
            err = _refused(compiler, schema, UnsupportedSchemaError)
            assert (err.keyword, err.path) == ("enum", "#/properties/p")
            assert f"'enum' at #/properties/p holds the number {v!r}" in str(err)


def test_random_float_consts_are_exact_or_refused(compiler):
    """One float in six with 17 digits was read as a neighbour; about one in a thousand has no text
    llguidance reads exactly, and is refused (as are most integral floats beyond 2**53, which it
    writes as another integer: ``test_constraint_literals_and_loops.py``)."""
    rng = random.Random(0)
    values = [rng.uniform(-1, 1) * 10.0 ** rng.randint(-30, 30) for _ in range(300)]
    refused = [v for v in values if not _exact_or_refused(compiler, {"const": v}, v)]
    assert sum(abs(v) < N for v in refused) <= 5, refused


def test_a_float_the_engine_cannot_read_exactly_is_refused_with_keyword_and_path(bpe_info, monkeypatch):
    """Where no number text makes llguidance hold exactly the schema's float, the schema is refused
    (naming keyword and path); a float in an annotation does not matter. The reader is made to
    fail for every text here, so this does not depend on which floats it happens to miss."""
    from llmir_lang.executor.constraints import schema_checks

    monkeypatch.setattr(schema_checks, "_llguidance_reads", lambda text: None)
    compiler = ConstraintCompiler(bpe_info)
    schema = {"type": "object", "properties": {"p": {"type": "number", "maximum": 1.4000000000000001}}}
    err = _refused(compiler, schema, UnsupportedSchemaError)
    assert (err.keyword, err.path) == ("maximum", "#/properties/p")
    assert "'maximum' at #/properties/p holds the number 1.4000000000000001" in str(err)
    assert "15 significant digits" in str(err)  # what to do
    assert compiler.compile(spec_from_json_schema({"type": "number", "default": 1.4000000000000001}))
    assert compiler.compile(spec_from_json_schema({"const": 1.4}))  # 15 digits or fewer: exact anyway


# --- $ref cycles that never reach a constraint ------------------------------------------------
PURE_REF_CYCLES = [
    ({"allOf": [{"$ref": "#"}]}, "#/allOf/0", "# -> #/allOf/0 -> #"),
    ({"$ref": "#"}, "#", "# -> #"),
    ({"anyOf": [{"$ref": "#"}], "title": "t"}, "#/anyOf/0", "# -> #/anyOf/0 -> #"),
    (
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        "#/$defs/b",
        "#/$defs/a -> #/$defs/b -> #/$defs/a",
    ),
    (
        {
            "type": "object",
            "properties": {"x": {"$ref": "#/$defs/a"}},
            "required": ["x"],
            "$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}, True]}},
        },
        "#/$defs/a/allOf/0",
        "#/$defs/a -> #/$defs/a/allOf/0 -> #/$defs/a",
    ),
]


@pytest.mark.parametrize(("schema", "path", "cycle"), PURE_REF_CYCLES)
def test_pure_ref_cycles_are_unsupported_not_unsatisfiable(compiler, schema, path, cycle):
    with pytest.raises(RecursionError):  # the JSON Schema validator cannot decide any instance either
        jsonschema.Draft202012Validator(schema).is_valid({"x": 1})
    err = _refused(compiler, schema, ReferenceLoopError)
    assert (err.keyword, err.path) == ("$ref", path)
    message = str(err)
    assert f"'$ref' at {path} " in message and cycle in message
    assert "infinite reference loop" in message and "{}" in message  # what is wrong, what to write


def test_recursive_schemas_that_reach_a_constraint_still_compile(compiler, bpe_hf):
    schemas = [
        {"type": "array", "items": {"$ref": "#"}},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"type": "integer"}}, "$ref": "#/$defs/a"},
        {"$defs": {"loop": {"$ref": "#/$defs/loop"}}, "type": "integer"},  # never referenced
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {"next": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/node"}]}},
                    "required": ["next"],
                }
            },
            "$ref": "#/$defs/node",
        },
    ]
    texts = ["[[],[[]]]", "7", "7", '{"next":{"next":null}}']
    for schema, text in zip(schemas, texts):
        assert accepts_text(compiler.compile(spec_from_json_schema(schema)), bpe_hf, text).accepted, schema
