"""``get_obj`` and the finished-value check read a schema as the engine does: any draft the engine
takes, patterns Python's ``re`` cannot read, ``multipleOf`` in decimal arithmetic; and a stop the
gen has but that did not end it does not turn on the stop's stricter check. What the engine
generates is what ``get_obj`` gives back: floats of 17 digits exactly, times pydantic reads."""

from __future__ import annotations

import datetime

import pydantic
import pytest

import llmir_lang as llmir
from llmir_lang.dsl.lowering import json_validator, unfinished_value


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "^\\p{Lu}\\p{Ll}{1,3}$"},  # re cannot read it: not checkable here
        {"type": "array", "items": [{"type": "integer"}, {"type": "boolean"}], "maxItems": 2},  # draft 7
        {"type": "integer", "minimum": 1, "maximum": 9, "exclusiveMaximum": True},  # draft 4
        {"type": "number", "multipleOf": 0.01, "minimum": 0.05, "maximum": 0.09},  # 0.07: float division said no
    ],
)
def test_get_obj_reads_every_schema_the_engine_takes(rt, schema):
    @llmir.function
    def prog(s):
        s += "Q: What is 3 + 4?\nA: " + llmir.gen("v", json_schema=schema, max_tokens=16, stop=["\n\n"])

    state = prog.run(backend=rt)
    assert state.error() is None
    import json

    assert state.get_obj("v") == json.loads(state["v"])


def test_multiple_of_is_decimal_and_drafts_fall_back():
    import json

    v = json_validator(json.dumps({"multipleOf": 0.01}))
    assert not list(v.iter_errors(0.07)) and list(v.iter_errors(0.075))
    draft7 = json_validator(json.dumps({"items": [{"type": "integer"}]}))
    assert draft7 is not None and list(draft7.iter_errors(["x"]))
    assert json_validator(json.dumps({"pattern": "\\p{L}"})) is None


def test_only_a_stop_that_ended_the_gen_counts():
    attrs = {"json_schema": '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}',
             "stop": ("\n",)}  # fmt: skip
    text = '{"a": 1}'  # parses, but misses "b": only a stop's cut is checked against the schema
    assert unfinished_value("x", attrs, text, matched=None) is not None  # a backend that does not say
    assert unfinished_value("x", attrs, text, matched="\n") is not None
    assert unfinished_value("x", attrs, text, matched=2) is None  # EOS ended it, not the stop


class Moment(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    at: datetime.time
    when: datetime.datetime


def test_get_obj_gives_back_exact_floats_and_times_pydantic_reads(rt):
    """A float const needing 17 digits was generated as its neighbour (1.4000000000000001 as
    "1.4"), which ``get_obj`` then refused against the schema; a ``datetime.time`` field could be
    generated with second 60, which the pydantic model refuses."""
    floats = {
        "type": "object",
        "properties": {
            "x": {"const": 1.4000000000000001},
            "y": {"enum": [110.00000000000001, -9.200000000000001]},
        },
        "required": ["x", "y"],
        "additionalProperties": False,
    }

    @llmir.function
    def prog(s):
        s += "Q: Give the values.\nA: " + llmir.gen("v", json_schema=floats, max_tokens=64)
        s += "\nQ: When?\nA: " + llmir.gen("t", json_schema=Moment, max_tokens=96)

    state = prog.run(backend=rt)
    assert state.error() is None
    obj = state.get_obj("v")
    assert obj["x"] == 1.4000000000000001 and obj["y"] in (110.00000000000001, -9.200000000000001), state["v"]
    assert isinstance(state.get_obj("t"), Moment), state["t"]


def test_a_pydantic_models_schema_is_narrowed_to_what_the_model_validates():
    """gen(json_schema=Model) takes the schema the constraint package narrows to what the model's
    own validation accepts (model_json_schema() writes a UUID4 as format 'uuid4', which the
    engine drops: any string; a NaiveDatetime as any date-time, offsets included)."""
    class Rec(pydantic.BaseModel):
        id: pydantic.UUID4
        at: pydantic.NaiveDatetime

    @llmir.function
    def f(s):
        s += "x" + llmir.gen("r", json_schema=Rec, max_tokens=8)

    text = str(f.trace())
    assert "uuid4" not in text and "-4" in text  # the version digit is in the pattern

    class Later(pydantic.BaseModel):
        when: pydantic.FutureDatetime

    @llmir.function
    def g(s):
        s += "x" + llmir.gen("r", json_schema=Later, max_tokens=8)

    with pytest.raises(llmir.ProgramExecutionError, match="UnsupportedSchemaError: pydantic field 'when'"):
        g.trace()
