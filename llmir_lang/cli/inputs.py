"""What ``llmir extract`` reads: input records (JSON lines or CSV) and the target schema.

A schema is given as ``schema.json`` (a JSON Schema file), ``module:Model`` or ``file.py:Model`` (a
pydantic model class), or the name of a bundled schema (``person``, ``product``, ``event``:
``llmir_lang.models.tiny_tasks.SCHEMAS``). ``Schema.validate`` checks a generated value against it
and returns the record as plain JSON data.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmir_lang.errors import LLMIRError


class ExtractInputError(LLMIRError):
    """The schema or the input file of ``llmir extract`` cannot be used as given."""


@dataclass(slots=True)
class Schema:
    """A JSON Schema, and the pydantic model it came from (if any). ``name`` names the record kind
    for the default prompt (``Text: ...⏎<Name> JSON:⏎``)."""

    json_schema: dict[str, Any]
    name: str
    model: Any = None  # a pydantic BaseModel subclass, or None

    def validate(self, text: str) -> dict[str, Any]:
        """The record that ``text`` encodes; raises ``ValueError`` saying why it is not one."""
        if self.model is not None:
            try:
                return self.model.model_validate_json(text).model_dump(mode="json")
            except Exception as e:  # pydantic.ValidationError; its text lists every bad field
                raise ValueError(f"not a valid {self.name}: {e}") from None
        import jsonschema

        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e.msg} at char {e.pos})") from None
        errors = sorted(jsonschema.Draft202012Validator(self.json_schema).iter_errors(value), key=str)
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
            raise ValueError(f"does not match the schema at {where}: {errors[0].message}")
        return value


def load_schema(spec: str) -> Schema:
    """``schema.json`` | ``module:Model`` | ``path/file.py:Model`` | a bundled name."""
    from llmir_lang.models.tiny_tasks import SCHEMAS

    path = Path(spec)
    if spec.endswith(".json"):
        if not path.is_file():
            raise ExtractInputError(f"--schema {spec!r}: no such file")
        try:
            schema = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ExtractInputError(f"--schema {spec!r} is not JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ExtractInputError(f"--schema {spec!r} must hold a JSON object (a JSON Schema)")
        name = schema.get("title") if isinstance(schema.get("title"), str) else path.name.split(".")[0]
        return Schema(schema, name.lower())
    if ":" in spec:
        return _pydantic_schema(spec)
    if spec in SCHEMAS:
        return Schema(SCHEMAS[spec], spec)
    raise ExtractInputError(
        f"--schema {spec!r}: give a JSON Schema file (schema.json), a pydantic model "
        f"(module:Model or file.py:Model), or a bundled schema ({', '.join(SCHEMAS)})"
    )


def _pydantic_schema(spec: str) -> Schema:
    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            file = Path(where)
            if not file.is_file():
                raise ExtractInputError(f"--schema {spec!r}: no such file {where!r}")
            sys.path.insert(0, str(file.resolve().parent))
            loader = importlib.util.spec_from_file_location(f"_llmir_schema_{file.stem}", file)
            assert loader is not None and loader.loader is not None
            module = importlib.util.module_from_spec(loader)
            # registered first so that pydantic can resolve the module's postponed annotations
            sys.modules[loader.name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise ExtractInputError(f"--schema {spec!r}: cannot import {where!r} ({e})") from None
    model = getattr(module, attr, None)
    if model is None or not callable(getattr(model, "model_json_schema", None)):
        raise ExtractInputError(f"--schema {spec!r}: {where} has no pydantic model named {attr!r}")
    try:
        json_schema = model.model_json_schema()
    except Exception as e:  # pydantic.PydanticUserError and friends: the model itself is broken
        raise ExtractInputError(f"--schema {spec!r}: the model has no JSON schema ({e})") from None
    return Schema(json_schema, attr.lower(), model)


def read_records(path: str | Path, *, id_field: str = "id") -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, row)`` for each record of a ``.jsonl`` / ``.json`` lines or ``.csv`` file.

    A row without ``id_field`` gets its line number (CSV: its row number, the header being 1) as
    id, so reruns still match records.
    """
    file = Path(path)
    if not file.is_file():
        raise ExtractInputError(f"--input {str(path)!r}: no such file")
    if file.suffix.lower() == ".csv":
        with open(file, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), 2):  # line 1 is the header
                yield n, _with_id(dict(row), id_field, n)
        return
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ExtractInputError(f"{path}:{n} is not JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise ExtractInputError(f"{path}:{n} must be a JSON object, got {type(row).__name__}")
            yield n, _with_id(row, id_field, n)


def _with_id(row: dict[str, Any], id_field: str, line: int) -> dict[str, Any]:
    if row.get(id_field) in (None, ""):
        row[id_field] = line
    return row
