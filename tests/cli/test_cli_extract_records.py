"""What ``llmir extract`` writes as a record of a pydantic model: the model's JSON, keyed as its
schema is, so that the record validates as the model again."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmir_lang.cli.inputs import ExtractInputError, load_schema

MODELS = """
from pydantic import BaseModel, ConfigDict, Field

class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    full_name: str = Field(alias="name")
    years: int = Field(alias="age", ge=0)
    nick: str | None = None

class Team(BaseModel):
    members: list[Person]
"""


def test_a_model_with_aliases_is_written_by_its_aliases(tmp_path: Path) -> None:
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    person = load_schema(f"{path}:Person")
    assert list(person.json_schema["properties"]) == ["name", "age", "nick"]
    record = person.validate('{"name": "Ada Lovelace", "age": 36}')
    assert record == {"name": "Ada Lovelace", "age": 36, "nick": None}  # was full_name / years
    person.model.model_validate(record)  # the record reads back as the model
    team = load_schema(f"{path}:Team")
    record = team.validate('{"members": [{"name": "Bo", "age": 3}]}')
    assert record == {"members": [{"name": "Bo", "age": 3, "nick": None}]}
    team.model.model_validate(record)


def test_a_list_of_models_is_written_by_its_aliases(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "aliased_models.py").write_text(MODELS + "\nPeople = list[Person]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    people = load_schema("aliased_models:People")
    assert people.validate('[{"name": "Bo", "age": 3}]') == [{"name": "Bo", "age": 3, "nick": None}]


def test_a_name_that_is_not_a_model_says_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "things.py"
    path.write_text("import enum\nclass Color(enum.Enum):\n    RED = 'red'\nLIMIT = 3\ndef make(): pass\n")
    for name, what in [("Color", "is an Enum"), ("LIMIT", "is an int value"), ("make", "is a function")]:
        with pytest.raises(ExtractInputError) as e:
            load_schema(f"{path}:{name}")
        assert f"{name!r} in {path} {what}; give a pydantic model" in str(e.value)  # was "has no ..."
    with pytest.raises(ExtractInputError, match="has no pydantic model, dataclass or TypedDict named 'Nope'"):
        load_schema(f"{path}:Nope")
