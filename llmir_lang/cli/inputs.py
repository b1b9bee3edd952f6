"""What ``llmir extract`` reads: input records (JSON lines or CSV) and the target schema.

A schema is given as ``schema.json`` (a JSON Schema file; any case of ``.json``), ``module:Model``
(a module importable from the current folder or ``sys.path``) or ``file.py:Model`` (a pydantic
model class), or the name of a bundled schema (``person``, ``product``, ``event``:
``llmir_lang.models.tiny_tasks.SCHEMAS``). ``Schema.validate`` checks a generated value against it
and returns the record as plain JSON data.

A JSON Schema file's ``pattern`` / ``patternProperties`` regular expressions must compile in
Python's ``re`` (generated values are checked with ``jsonschema``, which uses it), checked when the
schema is loaded: ``\\p{L}`` and other syntax only the constraint engine reads is one setup error.

Input files are UTF-8 (a leading byte-order mark is accepted); ``--input -`` (or a pipe such as
``/dev/stdin``) is read whole from standard input as JSON lines; a byte that is not UTF-8 stops the
job before anything runs, with the file, line and byte position. Each record gets an id: its
``--id-field`` value, or ``"line:N"`` when it has none (``AUTO_ID_PREFIX``), N being its line
(JSON lines) or row (CSV, the header being row 1). A JSON-lines line that is not a JSON object is
still a record (id ``"line:N"``) whose ``problem`` says why, so that the job writes it as an error
and goes on; so is a CSV row with more fields than the header (a comma outside double quotes, which
would otherwise cut the text short without a word). CSV fields may be of any length (a text too
long for the model is that record's error, not the file's).
"""

from __future__ import annotations

import codecs
import csv
import importlib
import importlib.util
import io
import json
import os
import re
import stat
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
    model: Any = None  # a type pydantic validates (a BaseModel subclass, a dataclass, ...), or None

    def validate(self, text: str) -> dict[str, Any]:
        """The record that ``text`` encodes; raises ``ValueError`` saying why it is not one."""
        if self.model is not None:
            from llmir_lang.executor.constraints.schema_pydantic import dump_json_value, validate_json_as

            try:
                return dump_json_value(self.model, validate_json_as(self.model, text))
            except Exception as e:  # pydantic.ValidationError; its text lists every bad field
                raise ValueError(f"not a valid {self.name}: {e}") from None
        import jsonschema

        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e.msg} at char {e.pos})") from None
        try:
            errors = sorted(jsonschema.Draft202012Validator(self.json_schema).iter_errors(value), key=str)
        except re.error as e:  # a pattern ``check_patterns`` did not see: this record's error, not a crash
            raise ValueError(f"the schema's pattern cannot be checked with Python's re ({e})") from None
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
            raise ValueError(f"does not match the schema at {where}: {errors[0].message}")
        return value


AUTO_ID_PREFIX = "line:"


def _kind_of(obj: Any) -> str:
    """``an Enum``, ``a function``, ``an int value``: what a ``--schema`` name holds instead."""
    import enum

    if isinstance(obj, type):
        return "an Enum" if issubclass(obj, enum.Enum) else "a plain class"
    if callable(obj):
        return "a function"
    name = type(obj).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} value"


def load_schema(spec: str) -> Schema:
    """``schema.json`` | ``module:Model`` | ``path/file.py:Model`` | a bundled name."""
    from llmir_lang.models.tiny_tasks import SCHEMAS

    path = Path(spec)
    if spec.lower().endswith(".json"):
        if not path.is_file():
            raise ExtractInputError(f"--schema {spec!r}: no such file")
        data = path.read_bytes()
        try:
            schema = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise ExtractInputError(f"--schema {spec!r} is not UTF-8 ({where_in(data, e.start)})") from None
        except json.JSONDecodeError as e:
            raise ExtractInputError(f"--schema {spec!r} is not JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ExtractInputError(f"--schema {spec!r} must hold a JSON object (a JSON Schema)")
        check_patterns(schema, f"--schema {spec!r}")
        name = schema.get("title") if isinstance(schema.get("title"), str) else path.name.split(".")[0]
        return Schema(schema, name.lower())
    if ":" in spec:
        return _pydantic_schema(spec)
    if spec in SCHEMAS:
        return Schema(SCHEMAS[spec], spec)
    raise ExtractInputError(
        f"--schema {spec!r}: give a JSON Schema file (schema.json), a pydantic model, dataclass or "
        f"TypedDict (module:Model or file.py:Model), or a bundled schema ({', '.join(SCHEMAS)})"
    )


# keywords whose values are data, not schemas: a "pattern" key inside them is not a regex
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


def check_patterns(schema: Any, what: str) -> None:
    """Raise ``ExtractInputError`` for the first ``pattern`` / ``patternProperties`` regex of the
    schema that Python's ``re`` cannot compile: the constraint engine may read it (``\\p{L}``), but
    every generated value is validated with ``jsonschema``, which uses ``re``, and would crash."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}/{i}")
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key in _DATA_KEYWORDS:
                continue
            if key == "pattern" and isinstance(value, str):
                found.append((value, f"{where}/pattern"))
            elif key == "patternProperties" and isinstance(value, dict):
                found.extend((k, f"{where}/patternProperties") for k in value)
            walk(value, f"{where}/{key}")

    walk(schema, "")
    for pattern, where in found:
        try:
            re.compile(pattern)
        except re.error as e:
            hint = " (for \\p{L}, letters, use [^\\W\\d_])" if "\\p{" in pattern or "\\P{" in pattern else ""
            raise ExtractInputError(
                f"{what}: the pattern {pattern!r} at {where.lstrip('/') or '(root)'} is not a Python "
                f"regular expression ({e}), and every record is checked with Python's re; rewrite it "
                f"in Python's syntax{hint}"
            ) from None


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
            # the `llmir` console script, unlike `python -m`, does not put the current folder on
            # sys.path; a user naming module:Model means a module next to them
            cwd = os.getcwd()
            if "" not in sys.path and cwd not in sys.path:
                sys.path.insert(0, cwd)
            module = importlib.import_module(where)
    except ExtractInputError:
        raise
    except ImportError as e:
        raise ExtractInputError(f"--schema {spec!r}: cannot import {where!r} ({e})") from None
    except SyntaxError as e:
        raise ExtractInputError(
            f"--schema {spec!r}: {e.filename or where}, line {e.lineno}: syntax error ({e.msg})"
        ) from None
    except Exception as e:  # the module's own code raised while it was imported
        raise ExtractInputError(
            f"--schema {spec!r}: importing {where!r} raised {type(e).__name__}: {e}"
        ) from None
    from llmir_lang.executor.constraints import UnsupportedSchemaError, pydantic_json_schema
    from llmir_lang.executor.constraints.schema_pydantic import is_pydantic_type

    model = getattr(module, attr, None)
    if model is None or not is_pydantic_type(model):
        # a name that is there but is something else (an Enum, a function) was said to be missing
        why = (
            f"{where} has no pydantic model, dataclass or TypedDict named {attr!r}"
            if model is None
            else f"{attr!r} in {where} is {_kind_of(model)}; give a pydantic model, dataclass or TypedDict"
        )
        raise ExtractInputError(f"--schema {spec!r}: {why}")

    try:  # narrowed to what the model's own validation accepts (a NaiveDatetime, a UUID4, ...)
        json_schema = pydantic_json_schema(model)
    except UnsupportedSchemaError as e:
        raise ExtractInputError(f"--schema {spec!r}: {e}") from None
    except Exception as e:  # pydantic.PydanticUserError and friends: the model itself is broken
        raise ExtractInputError(f"--schema {spec!r}: the model has no JSON schema ({e})") from None
    return Schema(json_schema, attr.lower(), model)


def where_in(data: bytes, pos: int) -> str:
    """``line L, byte B`` (both 1-based) of the byte offset ``pos`` of ``data``."""
    line = data.count(b"\n", 0, pos) + 1
    start = data.rfind(b"\n", 0, pos) + 1
    return f"line {line}, byte {pos - start + 1}"


@dataclass(slots=True)
class InputRecord:
    """One record of the input file. ``row`` is None when the line is not a JSON object (then
    ``id`` is the line's ``"line:N"``) or the CSV row has more fields than the header (its id is
    kept); ``problem`` says why."""

    line: int  # JSON lines: the line number; CSV: the row number, the header being row 1
    id: Any
    row: dict[str, Any] | None
    auto_id: bool = False  # the id is ``"line:N"``, not the record's own
    problem: str | None = None


def read_records(path: str | Path, *, id_field: str = "id") -> Iterator[InputRecord]:
    """The records of a ``.csv`` file, or of a JSON-lines file (any other name), in file order.

    ``-`` is standard input, read whole as JSON lines; a pipe or FIFO (``/dev/stdin``) is read whole
    too. Blank lines are skipped. Raises ``ExtractInputError`` for a missing file, a directory, a
    terminal, or bytes that are not UTF-8, naming the file, line and byte.
    """
    file = Path(path)
    data = _stream_bytes(str(path), file)
    if file.suffix.lower() == ".csv" and str(path) != "-":
        yield from _csv_records(file, id_field, data)
        return
    with open(file, "rb") if data is None else io.BytesIO(data) as f:
        for n, raw in enumerate(f, 1):
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ExtractInputError(
                    f"--input {str(path)!r}: line {n} is not UTF-8 (byte {e.start + 1} of the line: "
                    f"{raw[e.start : e.start + 1]!r}); convert the file to UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield InputRecord(
                    n, AUTO_ID_PREFIX + str(n), None, True, f"not JSON ({e.msg} at char {e.pos})"
                )
                continue
            if not isinstance(row, dict):
                what = f"a JSON object, got {type(row).__name__}"
                yield InputRecord(n, AUTO_ID_PREFIX + str(n), None, True, f"not {what}")
                continue
            yield _with_id(row, id_field, n)


def _stream_bytes(name: str, file: Path) -> bytes | None:
    """None for a regular file (read where it is); the whole content of standard input (``-``),
    a pipe or a FIFO, which can be read only once; ``ExtractInputError`` for anything else."""
    if name == "-":
        stream = sys.stdin.buffer if sys.stdin is not None else None
        if stream is None or stream.isatty():
            raise ExtractInputError(
                "--input '-': standard input is a terminal; pipe the records in (... --input - < "
                "in.jsonl) or give the file"
            )
        return stream.read()
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError:
        raise ExtractInputError(f"--input {name!r}: no such file") from None
    except OSError as e:
        raise ExtractInputError(f"--input {name!r} cannot be read ({e.strerror or e})") from None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        raise ExtractInputError(f"--input {name!r} is a directory; give the input file")
    try:
        with open(file, "rb") as f:
            if f.isatty():
                raise ExtractInputError(
                    f"--input {name!r} is a terminal; pipe the records in (... --input - < in.jsonl) "
                    "or give the file"
                )
            return f.read()
    except OSError as e:
        raise ExtractInputError(f"--input {name!r} cannot be read ({e.strerror or e})") from None


def _csv_records(file: Path, id_field: str, data: bytes | None = None) -> Iterator[InputRecord]:
    text = (
        open(file, newline="", encoding="utf-8-sig")
        if data is None
        else io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")
    )
    # a record's text may be longer than csv's default field limit (128 KiB): that record fails
    # (its prompt is too long for the model), not the whole file
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    with text as f:
        reader = csv.DictReader(f, restkey=_CSV_EXTRA)
        n = 1  # line 1 is the header
        try:
            for row in reader:
                n += 1
                record = dict(row)
                extra = record.pop(_CSV_EXTRA, None)
                got = _with_id(record, id_field, n)
                if extra is not None:
                    # more fields than the header: a comma outside double quotes split a field,
                    # and the text would be cut short silently; the row is a record error instead
                    header = len(reader.fieldnames or ())
                    got.row = None
                    got.problem = (
                        f"a CSV row of {header + len(extra)} fields under a header of {header} (a field "
                        "with a comma must be in double quotes)"
                    )
                yield got
        except UnicodeDecodeError:
            line, byte = _first_bad_utf8(file, data)
            raise ExtractInputError(
                f"--input {str(file)!r}: line {line} is not UTF-8 (byte {byte} of the line); "
                "convert the file to UTF-8"
            ) from None
        except csv.Error as e:
            raise ExtractInputError(f"--input {str(file)!r}: line {reader.line_num}: {e}") from None


_CSV_EXTRA = object()  # DictReader's key for the fields of a row beyond the header's
_CSV_FIELD_LIMIT = 2**31 - 1  # the largest value every platform's csv accepts


def _first_bad_utf8(file: Path, data: bytes | None = None) -> tuple[int, int]:
    """(line, 1-based byte in the line) of the first byte of ``file`` (or ``data``) that is not UTF-8."""
    with open(file, "rb") if data is None else io.BytesIO(data) as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return n, e.start + 1
    return 0, 0


def _with_id(row: dict[str, Any], id_field: str, line: int) -> InputRecord:
    value = row.get(id_field)
    if value is None or value == "":
        return InputRecord(line, AUTO_ID_PREFIX + str(line), row, True)
    return InputRecord(line, value, row)
