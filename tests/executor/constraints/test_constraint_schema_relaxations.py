"""JSON schemas that were refused though an exact constraint exists, and their near misses.

Each relaxed schema compiles, its matcher accepts exactly the instances the ``jsonschema``
validator accepts (``_agrees``), and outputs sampled under it are valid; a schema one step away,
where no exact rewrite exists, is still refused naming the keyword.

- a ``maxProperties`` that a closed object can never exceed (``schema_rewrite``);
- ``oneOf`` whose branches no value matches two of: pinned to disjoint values, a discriminator
  without ``type: object`` in the branches, or disjoint on the types a sibling ``type`` leaves;
  and ``oneOf`` of overlapping branches whose complements are expressible, as each branch without
  the others (``schema_one_of``);
- ``not`` of ``const`` / ``enum`` strings and numbers (``negation``), and ``not`` beside
  ``const`` / ``enum`` (the values it excludes are taken out);
- in drafts 3-7 the keywords beside a ``$ref``, which validators ignore, and a ``type`` beside
  recursive ``anyOf`` branches that imply it (llguidance refused both with "circular references
  with sibling keys").

Instances list object members in the order the schema lists them: llguidance generates listed
members in that order, a limit of every object constraint here, not of these rewrites.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from jsonschema import validators

from llmir_lang.executor.constraints import (
    UnsatisfiableConstraintError,
    UnsupportedSchemaError,
    spec_from_json_schema,
)
from llmir_lang.executor.constraints.testing import accepts_text, sample_text


@pytest.fixture(scope="module")
def chars(bpe_hf) -> set[int]:
    return {t for t in range(len(bpe_hf)) if len(bpe_hf.decode([t])) == 1}


def _valid(schema: Any, text: str) -> bool:
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    return cls(schema).is_valid(json.loads(text))


def _agrees(compiler, tok, schema: Any, values: list[Any], texts: tuple[str, ...] = ()) -> Any:
    """Compile ``schema`` and walk each value (compact JSON) and text: accepted exactly when the
    validator finds it valid; both verdicts must occur."""
    compiled = compiler.compile(spec_from_json_schema(schema))
    verdicts = set()
    for text in [json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in values] + list(texts):
        valid = _valid(schema, text)
        verdicts.add(valid)
        assert accepts_text(compiled, tok, text).accepted == valid, (schema, text, valid)
    assert verdicts == {True, False}, verdicts
    return compiled


def _samples_valid(compiled, tok, chars: set[int], schema: Any, n: int = 6) -> None:
    for i in range(n):
        text = sample_text(compiled, tok, random.Random(i), chars, 200, 0.3 if i % 2 else None)
        if text is not None:
            assert _valid(schema, text), (schema, text)


def _refused(compiler, schema: Any, keyword: str) -> None:
    with pytest.raises(UnsupportedSchemaError) as e:
        compiler.compile(spec_from_json_schema(schema))
    assert e.value.keyword == keyword, e.value


# --- property counts -------------------------------------------------------------------------
def _closed(*names: str, **extra: Any) -> dict[str, Any]:
    props = {n: {"type": "string"} for n in names}
    return {"type": "object", "properties": props, "additionalProperties": False, **extra}


def test_max_properties_a_closed_object_cannot_exceed_is_dropped(compiler, bpe_hf, chars):
    """JSONSchemaBench Github_hard o71303: ``maxProperties: 2`` on an object closed to two names."""
    schema = _closed("op", "expr", maxProperties=2)
    values = [{}, {"op": "a"}, {"op": "a", "expr": "b"}, {"op": "a", "x": 1}, {"op": 1}, []]
    _samples_valid(_agrees(compiler, bpe_hf, schema, values), bpe_hf, chars, schema)
    never = {**_closed("a", "b"), "maxProperties": 1}
    never["properties"]["b"] = False  # a name it cannot have does not count
    _agrees(compiler, bpe_hf, never, [{"a": "x"}, {}, {"b": "x"}])


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        (_closed("a", "b", "c", maxProperties=2), "maxProperties"),  # three names, at most two
        ({"type": "object", "properties": {"a": {}}, "maxProperties": 5}, "maxProperties"),  # open
        ({**_closed("a", "b", "c"), "minProperties": 2}, "minProperties"),
    ],
)
def test_property_counts_that_constrain_are_still_refused(compiler, schema, keyword):
    _refused(compiler, schema, keyword)


# --- oneOf -----------------------------------------------------------------------------------
def test_one_of_pinned_to_disjoint_values_is_any_of(compiler, bpe_hf):
    """JSONSchemaBench Github_trivial o26950: ``oneOf`` of number ``const`` branches (llguidance
    tells string values apart itself), beside a keyword of the schema's own."""
    schema = {
        "oneOf": [
            {"standsFor": "normal", "const": 0},
            {"standsFor": "screen", "const": 1},
            {"enum": [2, "2"]},
        ]
    }
    _agrees(compiler, bpe_hf, schema, [0, 1, 2, "2", 3, "0", True, None])


def test_one_of_discriminated_objects_without_type_object(compiler, bpe_hf, chars):
    """The branches hold object keywords alone, so a string matches both (invalid); on objects the
    required ``status`` tells them apart. The ``pattern``s leave no complement to build."""
    schema = {
        "oneOf": [
            {"required": ["status"], "properties": {"status": {"const": "ok"}, "id": {"pattern": "^x"}}},
            {
                "required": ["status", "error"],
                "properties": {"status": {"const": "error"}, "error": {"pattern": "^E"}},
            },
        ]
    }
    values = [
        {"status": "ok"},
        {"status": "ok", "id": "x1"},
        {"status": "ok", "id": "y"},
        {"status": "error", "error": "E1"},
        {"status": "error"},
        {"status": "other"},
        {},
        "text",
        1,
    ]
    _samples_valid(_agrees(compiler, bpe_hf, schema, values), bpe_hf, chars, schema)
    typed = {"oneOf": [{**schema["oneOf"][0], "type": "object"}, schema["oneOf"][1]]}
    _agrees(compiler, bpe_hf, typed, ["text", 1, {"status": "ok"}, {"status": "other"}])  # one branch: valid


def test_one_of_disjoint_on_the_types_a_sibling_leaves(compiler, bpe_hf):
    branch = {"required": ["k"], "properties": {"k": {"const": 1}, "p": {"pattern": "^x"}}}
    schema = {
        "type": "object",
        "oneOf": [branch, {"required": ["k"], "properties": {"k": {"const": 2}, "p": {"pattern": "^y"}}}],
    }
    _agrees(compiler, bpe_hf, schema, [{"k": 1, "p": "x1"}, {"k": 2, "p": "y"}, {"k": 2, "p": "x"}, {}, "s"])


def test_one_of_of_overlapping_branches_keeps_each_without_the_others(compiler, bpe_hf, chars):
    """JSONSchemaBench Github_ultra o81 / o62895, Glaiveai2K calculate_area: ``required`` alone."""
    schema = {"properties": {"a": {}, "b": {}}, "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}
    values = [{"a": 1}, {"b": 2}, {"a": 1, "b": 2}, {}, "s", 1]
    _samples_valid(_agrees(compiler, bpe_hf, schema, values), bpe_hf, chars, schema)
    three = {
        "type": "object",
        "properties": {"r": {"type": "number"}, "l": {"type": "number"}, "w": {"type": "number"}},
        "oneOf": [{"required": ["r"]}, {"required": ["l", "w"]}, {"required": ["w"]}],
    }
    values = [{"r": 1}, {"l": 1, "w": 2}, {"w": 2}, {"r": 1, "w": 2}, {"l": 1}, {"r": 1, "l": 1}, {}]
    _agrees(compiler, bpe_hf, three, values)
    values_overlap = {"oneOf": [{"enum": ["a", "b"]}, {"enum": ["b", "c"]}]}
    _agrees(compiler, bpe_hf, values_overlap, ["a", "b", "c", "d"])


@pytest.mark.parametrize(
    "schema",
    [
        {"oneOf": [{"type": "integer"}, {"minimum": 2}]},  # "not an integer" has no keyword
        {"oneOf": [{"pattern": "^a"}, {"pattern": "b$"}]},
        {
            "oneOf": [
                {"required": ["k"], "properties": {"k": {"enum": ["a", "b"]}, "p": {"pattern": "^x"}}},
                {"required": ["k"], "properties": {"k": {"enum": ["b"]}, "p": {"pattern": "y$"}}},
            ]
        },
        {"oneOf": [{"const": [1]}, {"const": [1.0]}]},  # one value; "not this array" has no keyword
    ],
)
def test_one_of_with_no_exact_any_of_is_still_refused(compiler, schema):
    _refused(compiler, schema, "oneOf")


# --- not -------------------------------------------------------------------------------------
def test_not_enum_of_strings_beside_other_keywords(compiler, bpe_hf, chars):
    """JSONSchemaBench Github_trivial o25761: ``not: {enum: ["upstart"]}`` beside ``minLength``."""
    schema = {"type": "string", "minLength": 1, "not": {"enum": ["upstart", "sysv"]}}
    values = ["systemd", "upstart", "upstar", "upstarts", "sysv", "sys", "", "sysvinit", 1]
    _samples_valid(_agrees(compiler, bpe_hf, schema, values), bpe_hf, chars, schema)


def test_not_const_strings_with_characters_json_escapes(compiler, bpe_hf):
    """The other strings are a pattern: every character of the excluded ones and their neighbours
    (quote, backslash, controls, U+0000, non-ASCII, astral) counts as the validator counts it."""
    excluded = ["", '"', "\\", "\n", "a\u0000", "é", "😀", "a/b"]
    schema = {"type": "string", "not": {"enum": excluded}}
    values = [
        *excluded,
        '""',
        "\\\\",
        "\n\n",
        "\u0000",
        "a",
        "a\u0000b",
        "e",
        "😀😀",
        "\u2028",
        "\t",
        "ab",
        "a/",
    ]
    _agrees(compiler, bpe_hf, schema, values)


def test_not_numbers_and_literals(compiler, bpe_hf):
    """Numbers compare by value (``1.0`` is ``1``); ``true`` is not ``1``. Numbers other than the
    excluded ones are generated in plain notation, as under any numeric bound."""
    numbers = {"type": "number", "not": {"enum": [1, 2.5]}}
    _agrees(compiler, bpe_hf, numbers, [1, 2.5, 0, 2, 3, -1, 1.5], ("1.0", "25e-1", "2.50"))
    mixed = {"not": {"enum": [None, True, "x", 0]}}
    _agrees(compiler, bpe_hf, mixed, [None, True, False, "x", "y", 0, 1, [], {}], ("-0", "0.0"))
    _agrees(compiler, bpe_hf, {"not": {"const": 1}}, [1, True, 2])
    _agrees(compiler, bpe_hf, {"not": {"enum": [True]}}, [True, 1, False])


def test_not_beside_const_or_enum_takes_the_values_out(compiler, bpe_hf):
    schema = {"enum": ["apple", "banana", "cherry"], "not": {"pattern": "an"}}
    _agrees(compiler, bpe_hf, schema, ["apple", "banana", "cherry", "date"])
    defs = {"$defs": {"a": {"pattern": "^a"}}}
    through_ref = {"const": "apple", "not": {"$ref": "#/$defs/a"}}
    _agrees(compiler, bpe_hf, {**defs, "properties": {"p": through_ref}}, [{"p": "apple"}, {}])  # p: none
    with pytest.raises(UnsatisfiableConstraintError):
        compiler.compile(spec_from_json_schema({**defs, **through_ref}))


def test_not_beside_both_const_and_enum_keeps_both(compiler, bpe_hf):
    """Only const's value was kept and written over the enum: "a" was accepted though no value
    is both "a" and in ["b"]."""
    for schema in ({"const": "a", "enum": ["b"], "not": {"const": "c"}}, {"const": "a", "enum": ["a", "b"], "not": {"const": "c"}}):
        try:
            compiled = compiler.compile(spec_from_json_schema(schema))
        except (UnsupportedSchemaError, UnsatisfiableConstraintError):
            continue  # refused: exact too
        for value in ("a", "b", "c"):
            text = json.dumps(value)
            assert accepts_text(compiled, bpe_hf, text).accepted == _valid(schema, text), (schema, value)


@pytest.mark.parametrize(
    "schema",
    [
        {"not": {"const": [1]}},  # "any array but this one" has no keyword
        {"type": "string", "not": {"pattern": "^a"}},
        {"enum": [0.3, 0.5], "not": {"multipleOf": 0.1}},  # a float step: validators disagree on 0.3
        {"type": "string", "not": {"enum": [f"v{i}" for i in range(65)]}},  # past the value limit
    ],
)
def test_not_with_no_exact_complement_is_still_refused(compiler, schema):
    _refused(compiler, schema, "not")


# --- keywords beside a recursive $ref ---------------------------------------------------------
def test_draft4_keywords_beside_a_ref_are_ignored_as_the_validator_ignores_them(compiler, bpe_hf):
    defs = {"s": {"type": "string"}}
    draft4 = {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "definitions": defs,
        "type": "object",
        "properties": {"x": {"$ref": "#/definitions/s", "type": "object"}},
    }
    _agrees(compiler, bpe_hf, draft4, [{"x": "a"}, {"x": {}}, {}])
    later = {"definitions": defs, "type": "object", "properties": draft4["properties"]}  # they apply
    _agrees(compiler, bpe_hf, later, [{"x": "a"}, {"x": {}}, {}])


def test_a_ref_into_a_keyword_beside_a_ref_keeps_it(compiler, bpe_hf):
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"s": {"$ref": "#/definitions/t", "properties": {"a": {"type": "integer"}}}, "t": {}},
        "type": "object",
        "properties": {"y": {"$ref": "#/definitions/s/properties/a"}},
    }
    _agrees(compiler, bpe_hf, schema, [{"y": 1}, {"y": "a"}])


def test_a_type_beside_recursive_branches_that_imply_it(compiler, bpe_hf):
    """JSONSchemaBench Github_medium o72177: ``type: object`` beside an ``anyOf`` of ``$ref``s that
    recur, which llguidance refused ("circular references with sibling keys")."""
    kind = {"a": {"enum": ["a"]}, "b": {"enum": ["b"]}}
    schema = {
        "type": "object",
        "anyOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/b"}],
        "$defs": {
            "a": {"type": "object", "properties": {"x": {"$ref": "#"}, "k": kind["a"]}, "required": ["k"]},
            "b": {"type": "object", "properties": {"k": kind["b"]}, "required": ["k"]},
        },
    }
    values = [{"x": {"k": "b"}, "k": "a"}, {"k": "b"}, {"x": {"k": "c"}, "k": "a"}, {"x": 1, "k": "a"}, {}, 1]
    _agrees(compiler, bpe_hf, schema, values)
