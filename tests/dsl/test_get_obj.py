"""gen(json_schema=PydanticModel) + s.get_obj(name) on the bundled model."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import typing_extensions
from pydantic import BaseModel

import llmir_lang as llmir
from llmir_lang.errors import ConstraintViolationError
from llmir_lang.models import tiny_tasks


class Person(BaseModel):
    name: str
    age: int
    city: str
    occupation: str
    married: bool


@pytest.fixture(scope="module")
def runtime():
    if not llmir_lang_model_present():
        pytest.skip("the bundled model is missing")
    rt = llmir.Runtime()
    yield rt
    rt.shutdown()


def llmir_lang_model_present() -> bool:
    from llmir_lang.models import TINY_MODEL_DIR

    return (TINY_MODEL_DIR / "model.safetensors").is_file()


@llmir.function
def extract(s, text, max_tokens):
    s += tiny_tasks.extraction_prompt(text, "person")
    s += llmir.gen("person", json_schema=Person, max_tokens=int(max_tokens))


def test_get_obj_returns_the_validated_instance(runtime):
    text, record = tiny_tasks.make_extraction_example(random.Random(99), "person")
    st = extract.run(text=text, max_tokens="120", backend=runtime)
    obj = st.get_obj("person")
    assert isinstance(obj, Person)
    assert obj.model_dump() == record


def test_truncated_object_is_an_error_not_a_silent_value(runtime):
    text, _ = tiny_tasks.make_extraction_example(random.Random(7), "person")
    st = extract.run(text=text, max_tokens="5", backend=runtime)
    with pytest.raises(ConstraintViolationError, match="max_tokens"):
        st.get_obj("person")


def test_truncated_object_of_a_dict_schema_is_an_error_too(runtime):
    @llmir.function
    def extract_dict(s, text):
        s += tiny_tasks.extraction_prompt(text, "person")
        s += llmir.gen("person", json_schema=Person.model_json_schema(), max_tokens=5)

    text, _ = tiny_tasks.make_extraction_example(random.Random(7), "person")
    st = extract_dict.run(text=text, backend=runtime)
    with pytest.raises(ConstraintViolationError, match="max_tokens"):
        st.get_obj("person")


@dataclasses.dataclass
class PersonRecord:
    name: str
    age: int
    city: str
    occupation: str
    married: bool


class PersonDict(typing_extensions.TypedDict):
    name: str
    age: int
    city: str
    occupation: str
    married: bool


def test_dataclasses_typeddicts_and_parametrized_types_are_schemas_too(runtime):
    """Any type pydantic validates is a ``json_schema`` (was: a BaseModel subclass or a DSLError):
    a dataclass gives a dataclass instance, a TypedDict a dict, ``Person | None`` a Person."""
    text, record = tiny_tasks.make_extraction_example(random.Random(99), "person")

    @llmir.function
    def typed(s, schema):
        s += tiny_tasks.extraction_prompt(text, "person")
        s += llmir.gen("person", json_schema=schema, max_tokens=120)

    states = typed.run_batch(
        [{"schema": t} for t in (PersonRecord, PersonDict, Person | None)], backend=runtime
    )
    assert [st.error() for st in states] == [None] * 3
    dc, td, opt = (st.get_obj("person") for st in states)
    assert dc == PersonRecord(**record) and td == record and opt == Person(**record)
    with pytest.raises(llmir.DSLError, match="use dtype="):
        typed.run(schema=int, backend=runtime).get_obj("person")


def test_get_obj_needs_a_schema(runtime):
    @llmir.function
    def plain(s):
        s += "Q: What is 2 + 2?\nA: " + llmir.gen("a", max_tokens=2, stop="\n")

    st = plain.run(backend=runtime)
    with pytest.raises(llmir.DSLError, match="json_schema"):
        st.get_obj("a")


def test_get_obj_after_a_fork_join_gives_one_object_per_branch(runtime):
    """After ``join`` the variable is a list of texts: ``get_obj`` validates each (it passed the
    list whole to json.loads, a bare TypeError, or to pydantic, a misleading violation)."""
    text, record = tiny_tasks.make_extraction_example(random.Random(99), "person")

    @llmir.function
    def forked(s, schema, max_tokens=120):
        s += tiny_tasks.extraction_prompt(text, "person")
        forks = s.fork(2)
        forks += llmir.gen("person", json_schema=schema, max_tokens=max_tokens)
        forks.join()

    for schema in (Person, Person.model_json_schema()):
        objs = forked.run(schema=schema, backend=runtime).get_obj("person")
        assert len(objs) == 2
        assert all((o.model_dump() if isinstance(o, Person) else o) == record for o in objs)
        cut = forked.run(schema=schema, max_tokens=5, backend=runtime)
        with pytest.raises(ConstraintViolationError, match=r"fork branch 0\).*max_tokens"):
            cut.get_obj("person")


def test_a_constrained_value_cut_by_a_stop_string_fails_the_gen(runtime):
    """``stop`` strings end a constrained gen inside its value (``stop=","`` after the first JSON
    member, in a regex match, in a JSON string); the engine says finish_reason "stop". That text used
    to come back as a finished value: now the gen fails with a ``ConstraintViolationError``
    naming the cause, and the other programs of a batch are not affected."""
    text, record = tiny_tasks.make_extraction_example(random.Random(99), "person")

    @llmir.function
    def cut(s, kw):
        s += tiny_tasks.extraction_prompt(text, "person")
        s += llmir.gen("person", **{"max_tokens": 120, **kw})

    cases = [
        {"json_schema": Person, "stop": ","},
        {"regex": r'\{"name":"[A-Za-z ]+","age":[0-9]+,', "stop": ","},
        {"dtype": str, "max_tokens": 16, "stop": " "},  # '":71 less than...': cut at '":71'
        {"json_schema": Person},  # no stop: a finished, valid value
        {"json_schema": Person, "stop": "\n"},  # a stop the value cannot contain is harmless
    ]
    states = cut.run_batch([{"kw": kw} for kw in cases], backend=runtime)
    for st in states[:3]:
        err = st.error()
        assert isinstance(err, llmir.DSLError) and isinstance(err.__cause__, ConstraintViolationError), err
        assert "stop string" in str(err) and "not with a complete value" in str(err)
        assert "program 'cut'" in str(err) and "test_get_obj.py" in str(err)
    for st in states[3:]:
        assert st.error() is None and st.get_obj("person").model_dump() == record


def test_unfinished_value_checks_every_constraint_kind():
    """The check behind the test above, on texts a constraint engine could let through."""
    from llmir_lang.dsl.lowering import unfinished_value

    two = json.dumps({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 2})
    assert unfinished_value("x", {"json_schema": two}, '{"a":1,"b":2}') is None
    # without a stop, JSON is only parsed: jsonschema reads some schemas unlike the engine (a
    # float multipleOf), and a valid value must never fail; get_obj still validates what it reads
    assert unfinished_value("x", {"json_schema": two}, '{"a":1,"a":2}') is None
    cents = json.dumps({"type": "number", "multipleOf": 0.01})
    assert unfinished_value("x", {"json_schema": cents}, "0.07") is None
    assert unfinished_value("x", {"json_schema": two}, '{"a":1') is not None  # not JSON at all
    # with a stop, jsonschema judges: duplicate keys parse as one member under minProperties
    why = unfinished_value("x", {"json_schema": two, "stop": [";"]}, '{"a":1,"a":2}')
    assert why is not None and "enough properties" in why and "stop string" in why
    assert unfinished_value("x", {"json_schema": two, "stop": ["}"]}, '{"a":1') is not None
    assert unfinished_value("x", {"choices": ["yes", "no"]}, "ye") is not None
    assert unfinished_value("x", {"choices": ["yes", "no"]}, "no") is None
    assert unfinished_value("x", {"dtype": "int"}, "-") is not None
    assert unfinished_value("x", {"dtype": "float"}, "1.5e3") is None
    assert unfinished_value("x", {"regex": r"\p{Greek}{2}"}, "Θ") is not None
    assert unfinished_value("x", {"regex": r"\p{Greek}{2}"}, "ΘΔ") is None
    grammar = 'start: "[" NUM ("," NUM)* "]"\nNUM: /[0-9]+/\n'
    assert unfinished_value("x", {"grammar": grammar}, "[1,2") is not None
    assert unfinished_value("x", {"grammar": grammar}, "[1,2]") is None
    assert unfinished_value("x", {"max_tokens": 4}, "anything") is None  # no constraint
    # a pattern Python's re cannot read (jsonschema's oracle) is not checked, never a false failure
    letters = json.dumps({"type": "string", "pattern": r"^\p{L}+$"})
    assert unfinished_value("x", {"json_schema": letters}, '"abc"') is None
