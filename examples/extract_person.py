"""The pydantic model of a person record, for ``llmir extract --schema examples/extract_person.py:Person``.

It matches the bundled model's ``person`` schema (``llmir_lang.models.tiny_tasks.SCHEMAS``): same
fields, in the same order (the order the model was trained to write them in).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Occupation = Literal[
    "engineer", "teacher", "nurse", "baker", "doctor", "pilot", "farmer", "lawyer", "artist", "chef",
    "writer", "dentist", "plumber", "architect", "librarian", "musician", "accountant", "electrician",
    "designer", "mechanic", "pharmacist", "carpenter", "journalist", "photographer",
]  # fmt: skip


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    age: int
    city: str
    occupation: Occupation
    married: bool
