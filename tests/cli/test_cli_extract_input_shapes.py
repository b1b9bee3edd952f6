"""``llmir extract`` on inputs of the wrong shape, on a fake backend (fast): a file with no JSON
object (plain text lines, a JSON array) is a setup error, not one error line per line; a CSV row
with more fields than the header (an unquoted comma) is that record's error, not a text cut short
without a word; a CSV field longer than ``csv``'s default limit is one record, not a setup error."""

from __future__ import annotations

import argparse
import json
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from test_cli_extract_guards import InstantBackend

from llmir_lang.__main__ import main as llmir_main
from llmir_lang.cli import extract as extract_cli
from llmir_lang.cli.extract import add_arguments, run_extract, run_main
from llmir_lang.cli.inputs import ExtractInputError, read_records
from llmir_lang.executor.backend import ChainRequest


class EchoBackend(InstantBackend):
    """``InstantBackend`` that also remembers the prompts it saw."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def submit(self, request: ChainRequest, on_chunk: Any = None) -> Future:
        self.prompts.append(request.prompt)
        return super().submit(request, on_chunk)


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> EchoBackend:
    monkeypatch.setattr(extract_cli, "_check_schema", lambda backend, schema: None)
    return EchoBackend()


def _ns(tmp: Path, inp: str, *extra: str) -> argparse.Namespace:
    schema = tmp / "schema.json"
    schema.write_text(json.dumps({"type": "object"}))
    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["--schema", str(schema), "--input", str(tmp / inp), "--output", str(tmp / "out.jsonl")]
    return p.parse_args([*argv, "--no-progress", "--no-fsync", *extra])


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "content",
    [
        "Bob is 30 and lives in Paris.\nAlice is a nurse.\n",  # text lines
        '[{"id": 1, "text": "a"}, {"id": 2, "text": "b"}]\n',  # a JSON array on one line
        '{\n  "id": 1,\n  "text": "a"\n}\n',  # a pretty-printed JSON object
    ],
)
def test_an_input_without_any_json_object_is_a_setup_error(
    tmp_path: Path, fake: EchoBackend, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    (tmp_path / "in.txt").write_text(content)
    with pytest.raises(ExtractInputError, match=r"no line is a JSON object \(line 1 is not"):
        run_extract(_ns(tmp_path, "in.txt"), fake)
    assert not (tmp_path / "out.jsonl").exists() and fake.prompts == []
    # the command line says it in one line, exit 1
    argv = ["extract", "--schema", "person", "--input", str(tmp_path / "in.txt")]
    assert llmir_main([*argv, "--output", str(tmp_path / "out.jsonl"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --input") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out.jsonl").exists()


def test_some_bad_lines_among_objects_are_still_record_errors(tmp_path: Path, fake: EchoBackend) -> None:
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "a"}\nnot json\n')
    assert run_main(_ns(tmp_path, "in.jsonl"), fake) == 1
    assert _rows(tmp_path / "out.jsonl") == [
        {"id": 1, "record": {}},
        {"id": "line:2", "error": "input line 2 is not JSON (Expecting value at char 0)"},
    ]


def test_a_csv_row_with_more_fields_than_the_header_is_its_records_error(
    tmp_path: Path, fake: EchoBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.csv").write_text(
        'id,text\n1,"Bob is 30, and lives in Paris"\n2,Bob is 30, and lives in Paris\n3,Alice\n'
    )
    assert run_main(_ns(tmp_path, "in.csv"), fake) == 1
    rows = _rows(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == ["1", "2", "3"]  # the bad row keeps its id
    assert "record" in rows[0] and "record" in rows[2]
    assert rows[1]["error"].startswith("input row 3 is a CSV row of 3 fields under a header of 2")
    assert "double quotes" in rows[1]["error"]
    # the text was never sent cut short ("Bob is 30")
    assert len(fake.prompts) == 2 and not any(
        p.endswith("Bob is 30") or "Bob is 30\n" in p for p in fake.prompts
    )
    assert "1 malformed input lines" in capsys.readouterr().err


def test_a_csv_field_longer_than_the_csv_default_limit_is_one_record(
    tmp_path: Path, fake: EchoBackend
) -> None:
    long_text = "word " * 40_000  # 200 000 characters: csv's default limit is 131 072
    (tmp_path / "in.csv").write_text(f"id,text\na,short\nb,{long_text}\nc,short too\n")
    assert [r.id for r in read_records(tmp_path / "in.csv")] == ["a", "b", "c"]
    assert run_main(_ns(tmp_path, "in.csv"), fake) == 0
    assert [r["id"] for r in _rows(tmp_path / "out.jsonl")] == ["a", "b", "c"]
    assert any(long_text.strip() in p for p in fake.prompts)


def test_a_csv_file_whose_every_row_is_split_is_a_setup_error(tmp_path: Path, fake: EchoBackend) -> None:
    (tmp_path / "in.csv").write_text("id,text\n1,Bob is 30, lives in Paris\n2,Alice, a nurse\n")
    with pytest.raises(
        ExtractInputError, match="no row matches the header \\(row 2 is a CSV row of 3 fields"
    ):
        run_extract(_ns(tmp_path, "in.csv"), fake)
    assert not (tmp_path / "out.jsonl").exists() and fake.prompts == []


def test_ctrl_c_while_the_model_loads_says_the_job_did_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "extract: 0 ok, 0 failed, 0 already done (of 0 input records)", though the input
    held 3 records (and the output may already hold some of them)."""

    def loading(ns: argparse.Namespace) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_cli, "_make_backend", loading)
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "text": f"t {i}"}) + "\n" for i in range(3))
    )
    assert run_main(_ns(tmp_path, "in.jsonl")) == 130
    err = capsys.readouterr().err
    assert "interrupted before the job started (3 input records): no record ran" in err, err
    assert "of 0 input records" not in err and not (tmp_path / "out.jsonl").exists()
