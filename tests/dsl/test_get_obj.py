"""gen(json_schema=PydanticModel) + s.get_obj(name) on the bundled model."""

from __future__ import annotations

import random

import pytest
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


def test_get_obj_needs_a_schema(runtime):
    @llmir.function
    def plain(s):
        s += "Q: What is 2 + 2?\nA: " + llmir.gen("a", max_tokens=2, stop="\n")

    st = plain.run(backend=runtime)
    with pytest.raises(llmir.DSLError, match="json_schema"):
        st.get_obj("a")
