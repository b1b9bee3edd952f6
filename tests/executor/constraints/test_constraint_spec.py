"""Spec builders: canonical forms, validation, typed errors before any model step."""

from __future__ import annotations

import json
import re

import pydantic
import pytest

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints import (
    ConstraintSpec,
    GrammarSyntaxError,
    InvalidChoicesError,
    InvalidSchemaError,
    UnknownDtypeError,
    parse_dtype_value,
    spec_from_choices,
    spec_from_dtype,
    spec_from_grammar,
    spec_from_json_schema,
    spec_from_regex,
)
from llmir_lang.executor.constraints.spec import canonical_schema_text, escape_regex


class Person(pydantic.BaseModel):
    name: str
    age: int
    tags: list[str] = []


def test_schema_canonical_text_sorts_keywords_but_keeps_property_order():
    a = {
        "type": "object",
        "required": ["z"],
        "properties": {"z": {"type": "string"}, "a": {"type": "integer"}},
    }
    b = {
        "properties": {"z": {"type": "string"}, "a": {"type": "integer"}},
        "required": ["z"],
        "type": "object",
    }
    assert spec_from_json_schema(a) == spec_from_json_schema(b)
    assert hash(spec_from_json_schema(a)) == hash(spec_from_json_schema(b))
    text = spec_from_json_schema(a).value
    assert text.index('"z"') < text.index('"a"')  # generation order is the written order
    assert list(json.loads(text)) == ["required", "type", "properties"]  # member keywords last
    swapped = {**a, "properties": {"a": {"type": "integer"}, "z": {"type": "string"}}}
    assert spec_from_json_schema(swapped) != spec_from_json_schema(a)


def test_schema_from_text_dict_bool_and_pydantic_model():
    assert spec_from_json_schema('{"type": "integer"}') == spec_from_json_schema({"type": "integer"})
    assert spec_from_json_schema(True).value == "true"
    spec = spec_from_json_schema(Person, whitespace="")
    schema = json.loads(spec.value)
    assert list(schema["properties"]) == ["name", "age", "tags"] and spec.whitespace == ""
    assert schema == json.loads(canonical_schema_text(Person.model_json_schema()))


@pytest.mark.parametrize(
    "bad, match",
    [
        ("{not json", "not valid JSON"),
        (42, "object or a boolean"),
        (int, "pydantic BaseModel"),
        ([1], "object"),
    ],
)
def test_bad_schemas_are_typed_errors(bad, match):
    with pytest.raises(InvalidSchemaError, match=match):
        spec_from_json_schema(bad)


def test_choices_validation():
    spec = spec_from_choices(["yes", "no", "C'est ça"])
    assert json.loads(spec.value) == ["yes", "no", "C'est ça"]
    with pytest.raises(InvalidChoicesError, match="empty"):
        spec_from_choices([])
    with pytest.raises(InvalidChoicesError, match="duplicates"):
        spec_from_choices(["a", "b", "a"])
    with pytest.raises(InvalidChoicesError, match="strings"):
        spec_from_choices(["a", 1])
    with pytest.raises(InvalidChoicesError, match="empty string"):
        spec_from_choices(["a", ""])
    with pytest.raises(InvalidChoicesError, match="list of strings"):
        spec_from_choices("abc")


@pytest.mark.parametrize(
    "dtype, good, bad",
    [
        (int, ["0", "-17", "123456789012345678901"], ["01", "1.0", "+1", ""]),
        (float, ["0", "-2.5", "1e10", "3.25E-2"], ["1.", ".5", "1e", "nan"]),
        (bool, ["true", "False"], ["yes", "TRUE"]),
        (str, ['""', '"a \\"quoted\\" \\u00e9"'], ['"unterminated', "bare"]),
    ],
)
def test_dtype_regexes_and_parse_back(dtype, good, bad):
    spec = spec_from_dtype(dtype)
    assert spec == spec_from_dtype(dtype.__name__) and spec.kind == "regex"
    pattern = re.compile(spec.value)
    for text in good:
        assert pattern.fullmatch(text), text
        value = parse_dtype_value(dtype, text)
        assert isinstance(value, dtype)
    for text in bad:
        assert not pattern.fullmatch(text), text
    assert parse_dtype_value(bool, "true") is True and parse_dtype_value(bool, "False") is False


@pytest.mark.parametrize("dtype", [list, dict, "int32", None, complex])
def test_unknown_dtype(dtype):
    with pytest.raises(UnknownDtypeError, match="int, float, bool or str"):
        spec_from_dtype(dtype)


def test_grammar_syntax_errors_give_line_and_column():
    spec_from_grammar('start: "a" b\nb: "b"+\n')
    with pytest.raises(GrammarSyntaxError) as e:
        spec_from_grammar('start: "a" b\nb: ( "b"\n')
    assert e.value.line == 2 and e.value.column > 0 and "line 2" in str(e.value)
    with pytest.raises(GrammarSyntaxError) as e:
        spec_from_grammar('start: "a" | nothere\n')
    assert e.value.line == 1 and "nothere" in str(e.value)
    with pytest.raises(GrammarSyntaxError):
        spec_from_grammar("   ")
    assert "gbnf" not in str(e.value).lower()  # no dialect hint for a lark grammar's own error


def test_a_gbnf_grammar_is_refused_with_how_to_convert_it():
    """``grammar=`` is lark; a GBNF / EBNF grammar (``root ::= ...``) failed with "Expected
    token '_', found '='" alone, which does not say the dialect is the problem."""
    gbnf = 'root ::= answer\nanswer ::= "yes" | "no"\n'
    with pytest.raises(GrammarSyntaxError, match="lark syntax.*gbnf_to_lark") as e:
        spec_from_grammar(gbnf)
    assert e.value.line == 1
    from llguidance.gbnf_to_lark import gbnf_to_lark

    assert spec_from_grammar(gbnf_to_lark(gbnf)).kind == "grammar"  # what the hint says works


def test_spec_is_plain_hashable_data():
    assert spec_from_regex("a+") == ConstraintSpec("regex", "a+")
    assert len({spec_from_regex("a+"), ConstraintSpec("regex", "a+")}) == 1
    with pytest.raises(ValueError):
        ConstraintSpec("sql", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ConstraintSpec("regex", "a", whitespace=" ")
    assert issubclass(InvalidChoicesError, ConstraintError) and issubclass(ConstraintError, ValueError)


def test_escape_regex_is_literal_for_python_re_too():
    text = "a.b*c?(d)[e]{f}|g^h$i\\j-k~l&m#n\x01"
    assert re.fullmatch(escape_regex(text).replace("\\x{1}", "\\x01"), text)
