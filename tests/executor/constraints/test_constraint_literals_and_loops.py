"""Number literals that JSON-parse to exactly the schema's value, and reference loops.

- A float ``const`` / ``enum`` member must be generated as a text that Python's ``json`` (what
  the ``jsonschema`` validator compares) reads as exactly that float. llguidance writes a number
  as its shortest digits in plain notation, so an integral float beyond 2**53 whose digits padded
  with zeros are not its value came out as a JSON integer of another value: ``{"const": 1e23}``
  generated ``100000000000000000000000`` (the float is 99999999999999991611392), which
  ``jsonschema`` rejects, and ``{"const": 1e300}`` a 301-digit integer. No text llguidance writes
  is that float, so such a schema is an ``UnsupportedSchemaError`` naming keyword and path now;
  the integral floats whose written digits are exact (``1e22``, ``2.0**53``) compile as before.
- ``oneOf`` branches were told apart by the JSON text of their ``const`` / ``enum`` values, so
  ``1`` and ``1.0`` (or ``0`` and ``-0.0``), one JSON value, counted as disjoint and the ``oneOf``
  became an ``anyOf``: ``{"k": 1}``, which matches both branches, was generated.
- A ``$ref`` that leads back to its own subschema through keywords that apply to the same value
  (``allOf`` / ``anyOf`` / ``oneOf`` / ``not`` / ``if`` ...), never through one that checks a part
  of it, is an infinite loop: the ``jsonschema`` validator raises ``RecursionError`` on every
  value that reaches it, and JSON Schema leaves such a schema undefined. Pure loops were refused
  already; a loop next to a constraint (``{"anyOf": [{"$ref": "#"}, {"type": "integer"}]}``)
  compiled to a guess (integers) or got llguidance's advice about sibling keywords. Every such
  loop is a ``ReferenceLoopError`` (an ``UnsupportedSchemaError``) naming the ``$ref`` and the loop.
  A ``$ref`` is read as the validator reads it: against the ``$id`` around it (a ``#/...`` inside a
  subschema with an ``$id`` points into that subschema; an absolute URI names a resource of the
  document), and in drafts 3-7 without the keywords beside it. Every ref was read from the root,
  which saw loops that were not there and missed some that were.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from llmir_lang.executor.constraints import (
    ReferenceLoopError,
    UnsatisfiableConstraintError,
    UnsupportedSchemaError,
    spec_from_json_schema,
)
from llmir_lang.executor.constraints.schema_disjoint import pairwise_disjoint
from llmir_lang.executor.constraints.testing import accepts_text

N = 2**53


def _generated(compiled, tokenizer) -> str:
    """The one text a single-value constraint admits: its forced text, which must be complete."""
    text = compiled.new_matcher().forced_text()
    assert accepts_text(compiled, tokenizer, text).accepted, text
    return text


def _exact_or_refused(compiler, tokenizer, schema: dict, value: float) -> bool:
    """True when the constraint generates a text Python's json reads as exactly ``value`` (and
    jsonschema accepts); False when the schema is refused naming the float; never another value."""
    try:
        compiled = compiler.compile(spec_from_json_schema(schema))
    except UnsupportedSchemaError as e:
        assert repr(value) in str(e), str(e)
        return False
    text = _generated(compiled, tokenizer)
    parsed = json.loads(text)
    assert parsed == value and float(text) == value, (value, text)
    assert jsonschema.Draft202012Validator(schema).is_valid(parsed), (value, text)
    return True


# --- integral floats beyond 2**53 --------------------------------------------------------------
# llguidance wrote each as its shortest digits padded with zeros: a JSON integer of another value.
WRITTEN_AS_ANOTHER_INTEGER = [1e23, 2.0**60, -1.2345678901234567e19, 1e300, 1.7976931348623157e308]
# Shortest digits padded with zeros are the float's value exactly: generated as before.
WRITTEN_EXACTLY = [1e22, float(N), -float(N), 1.2345678901234568e17, 1e16, 5e-324, -0.0, 1.0]


@pytest.mark.parametrize("value", WRITTEN_AS_ANOTHER_INTEGER)
def test_big_integral_floats_are_refused_not_written_as_another_integer(compiler, bpe_hf, value):
    assert not _exact_or_refused(compiler, bpe_hf, {"const": value}, value)
    cases = [
        ({"type": "object", "properties": {"p": {"enum": ["a", value]}}}, "enum", "#/properties/p"),
        ({"type": "array", "items": {"const": {"x": [value]}}}, "const", "#/items"),
    ]
    for schema, keyword, path in cases:
        with pytest.raises(UnsupportedSchemaError) as e:
            compiler.compile(spec_from_json_schema(schema))
        assert (e.value.keyword, e.value.path) == (keyword, path)
        message = str(e.value)
        assert f"{keyword!r} at {path} holds the number {value!r}" in message
        assert "2**53" in message and "string" in message  # what to do instead


@pytest.mark.parametrize("value", WRITTEN_EXACTLY)
def test_floats_written_exactly_still_compile(compiler, bpe_hf, value):
    assert _exact_or_refused(compiler, bpe_hf, {"const": value}, value)
    compiled = compiler.compile(spec_from_json_schema({"enum": [value, "a"]}))
    assert accepts_text(compiled, bpe_hf, '"a"').accepted


def test_a_big_float_in_an_annotation_or_a_bound_is_not_refused(compiler, bpe_hf):
    compiled = compiler.compile(
        spec_from_json_schema({"type": "integer", "default": 1e23, "examples": [2.0**60]})
    )
    assert accepts_text(compiled, bpe_hf, "7").accepted
    assert compiler.compile(spec_from_json_schema({"type": "number", "maximum": 1e18}))


def test_random_float_consts_parse_back_to_the_same_value_or_are_refused(compiler, bpe_hf):
    """Across every magnitude: each generated text JSON-parses to exactly the float; about one
    float in a thousand (no text llguidance reads as it) and the big integral floats above are
    refused instead."""
    rng = random.Random(1)
    values = [rng.uniform(1, 10) * 10.0 ** rng.randint(-300, 300) * rng.choice((1, -1)) for _ in range(120)]
    values += [rng.uniform(-1, 1) * 10.0 ** rng.randint(-20, 20) for _ in range(120)]
    exact = [v for v in values if _exact_or_refused(compiler, bpe_hf, {"const": v}, v)]
    unreadable = [v for v in set(values) - set(exact) if abs(v) < N]
    assert len(unreadable) <= 3, unreadable
    assert len(exact) >= 150, len(exact)


# --- oneOf branches told apart by value ----------------------------------------------------------
def _keyed(value, other):
    return {
        "oneOf": [
            {"type": "object", "properties": {"k": {"const": value}}, "required": ["k"]},
            {"type": "object", "properties": {"k": {"enum": [other, "x"]}}, "required": ["k"]},
        ]
    }


@pytest.mark.parametrize(
    ("value", "other"), [(1, 1.0), (0, -0.0), (-2.0, -2), ([1], [1.0]), ({"a": 0}, {"a": -0.0})]
)
def test_oneof_branches_holding_one_json_value_are_not_disjoint(compiler, bpe_hf, value, other):
    schema = _keyed(value, other)
    instance = {"k": value}
    assert not jsonschema.Draft202012Validator(schema).is_valid(instance)  # it matches both branches
    assert not pairwise_disjoint(schema["oneOf"], schema)
    try:
        compiled = compiler.compile(spec_from_json_schema(schema))
    except UnsupportedSchemaError as e:
        assert e.keyword == "oneOf"
        return
    assert not accepts_text(compiled, bpe_hf, json.dumps(instance, separators=(",", ":"))).accepted


def test_oneof_branches_with_different_values_are_still_disjoint():
    for value, other in [(1, 2), (1, True), (0, False), (0, None), (1.5, 1), ("1", 1), ([1], [1, 1])]:
        schema = _keyed(value, other)
        assert pairwise_disjoint(schema["oneOf"], schema), (value, other)


# --- reference loops ----------------------------------------------------------------------------
MIXED_LOOP_DEFS = {
    "a": {"anyOf": [{"$ref": "#/$defs/b"}, {"type": "string"}]},
    "b": {"allOf": [{"$ref": "#/$defs/a"}], "minLength": 1},
}
_ITEM_LOOP = {"$id": "item", "$defs": {"n": {"$ref": "#"}}, "$ref": "#/$defs/n"}
_ITEM_BACK = {"$id": "item", "allOf": [{"$ref": "http://x/root#/properties/a"}]}
REFERENCE_LOOPS = [
    # (schema, an instance that reaches the loop, path of the closing $ref, the loop)
    ({"$ref": "#"}, 1, "#", "# -> #"),
    ({"allOf": [{"$ref": "#"}]}, 1, "#/allOf/0", "# -> #/allOf/0 -> #"),
    (
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        1,
        "#/$defs/b",
        "#/$defs/a -> #/$defs/b -> #/$defs/a",
    ),
    # a loop next to a constraint: it compiled to a guess (integers), or got llguidance's advice
    # about sibling keywords; the validator still recurses without end
    ({"anyOf": [{"$ref": "#"}, {"type": "integer"}]}, 1, "#/anyOf/0", "# -> #/anyOf/0 -> #"),
    ({"allOf": [{"$ref": "#"}], "type": "integer"}, 1, "#/allOf/0", "# -> #/allOf/0 -> #"),
    ({"$ref": "#", "type": "string"}, "s", "#", "# -> #"),
    ({"not": {"$ref": "#"}}, 1, "#/not", "# -> #/not -> #"),
    ({"if": {"$ref": "#"}, "then": {"type": "integer"}}, 1, "#/if", "# -> #/if -> #"),
    (
        {"$defs": MIXED_LOOP_DEFS, "type": "array", "items": {"$ref": "#/$defs/a"}},
        ["s"],
        "#/$defs/b/allOf/0",
        "#/$defs/a -> #/$defs/a/anyOf/0 -> #/$defs/b -> #/$defs/b/allOf/0 -> #/$defs/a",
    ),
    # refs read against the $id around them: "#" in "item" is "item", not the root, whose own
    # #/$defs/n is an integer; an absolute URI names a resource of the document; "#A" an anchor.
    # Reading every ref from the root, none of these was seen
    (
        {"$id": "http://x/root", "$defs": {"n": {"type": "integer"}}, "properties": {"a": _ITEM_LOOP}},
        {"a": 1},
        "#/properties/a/$defs/n",
        "#/properties/a -> #/properties/a/$defs/n -> #/properties/a",
    ),
    (
        {"$id": "http://x/root", "properties": {"a": {"$ref": "item"}, "b": _ITEM_BACK}},
        {"a": 1},
        "#/properties/b/allOf/0",
        "#/properties/a -> #/properties/b -> #/properties/b/allOf/0 -> #/properties/a",
    ),
    (
        {"$defs": {"a": {"$anchor": "A", "anyOf": [{"$ref": "#A"}, {"type": "null"}]}}, "$ref": "#/$defs/a"},
        1,
        "#/$defs/a/anyOf/0",
        "#/$defs/a -> #/$defs/a/anyOf/0 -> #/$defs/a",
    ),
]


def _validator_recurses_without_end(schema, instance) -> bool:
    try:
        jsonschema.Draft202012Validator(schema).is_valid(instance)
    except RecursionError:
        return True
    except BaseException as e:  # rpds, under jsonschema's referencing, may wrap it in a pyo3 panic
        return "RecursionError" in str(e)
    return False


@pytest.mark.parametrize(("schema", "instance", "path", "loop"), REFERENCE_LOOPS)
def test_reference_loops_are_a_typed_error_never_unsatisfiable(compiler, schema, instance, path, loop):
    assert _validator_recurses_without_end(schema, instance)  # what jsonschema does with such a schema
    with pytest.raises(UnsupportedSchemaError) as e:
        compiler.compile(spec_from_json_schema(schema))
    err = e.value
    assert type(err) is ReferenceLoopError and not isinstance(err, UnsatisfiableConstraintError)
    assert (err.keyword, err.path) == ("$ref", path)
    assert " -> ".join(err.cycle) == loop
    message = str(err)
    assert f"'$ref' at {path} " in message and loop in message
    assert "infinite reference loop" in message and "unsatisfiable" not in message
    assert "RecursionError" in message and "{}" in message  # what the validator does; what to write


# (schema, a valid instance, an invalid one): no loop once each $ref is read as the validator reads it
NOT_LOOPS = [
    # "#/$defs/n" inside "item" is item's integer, not the root's n, which leads back to item
    (
        {
            "$id": "http://x/root",
            "$defs": {"n": {"$ref": "#/properties/a"}},
            "properties": {"a": {"$id": "item", "$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n"}},
        },
        {"a": 1},
        {"a": "s"},
    ),
    # the same, the inner resource named by an absolute $id
    (
        {
            "$defs": {"n": {"$ref": "#/properties/a"}},
            "properties": {
                "a": {"$id": "http://x/item", "$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n"}
            },
        },
        {"a": 1},
        {"a": "s"},
    ),
]


@pytest.mark.parametrize(("schema", "valid", "invalid"), NOT_LOOPS)
def test_refs_read_against_their_id_make_no_false_loop(compiler, bpe_hf, schema, valid, invalid):
    """These were ``ReferenceLoopError``s: every ``$ref`` was read from the root."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert validator.is_valid(valid) and not validator.is_valid(invalid)  # no RecursionError
    compiled = compiler.compile(spec_from_json_schema(schema))
    assert accepts_text(compiled, bpe_hf, json.dumps(valid, separators=(",", ":"))).accepted
    assert not accepts_text(compiled, bpe_hf, json.dumps(invalid, separators=(",", ":"))).accepted


def test_draft7_keywords_beside_a_ref_make_no_loop(compiler, bpe_hf):
    """Drafts 3-7 ignore the ``allOf`` beside the ``$ref``: the validator checks an integer and
    ends. It was a ``ReferenceLoopError``, then llguidance's refusal of a recursive $ref with
    siblings; the siblings are dropped now, as the validator ignores them, so it compiles exactly."""
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"n": {"type": "integer"}},
        "$ref": "#/definitions/n",
        "allOf": [{"$ref": "#"}],
    }
    assert jsonschema.Draft7Validator(schema).is_valid(1) and not jsonschema.Draft7Validator(schema).is_valid(
        "s"
    )
    compiled = compiler.compile(spec_from_json_schema(schema))
    assert accepts_text(compiled, bpe_hf, "1").accepted
    assert not accepts_text(compiled, bpe_hf, '"s"').accepted


def test_recursion_through_a_part_of_the_value_still_compiles(compiler, bpe_hf):
    schemas = {
        '["s",["t",[]]]': {"type": "array", "items": {"anyOf": [{"type": "string"}, {"$ref": "#"}]}},
        '{"n":{"n":null}}': {
            "anyOf": [
                {"type": "null"},
                {"type": "object", "properties": {"n": {"$ref": "#"}}, "required": ["n"]},
            ]
        },
        "7": {"$defs": {"loop": {"anyOf": [{"$ref": "#/$defs/loop"}]}}, "type": "integer"},  # never used
        '"ab"': {"allOf": [{"$ref": "#/$defs/s"}], "$defs": {"s": {"type": "string", "minLength": 2}}},
    }
    for text, schema in schemas.items():
        assert jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))
        assert accepts_text(compiler.compile(spec_from_json_schema(schema)), bpe_hf, text).accepted, schema
