"""``llmir extract`` on the bundled model: records, per-record errors, resume, SIGKILL + rerun,
Ctrl-C, setup errors refused before the output is touched, the output file's guards."""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from llmir_lang.cli.extract import ExtractAbortedError, add_arguments, run_extract, run_main
from llmir_lang.cli.inputs import ExtractInputError, load_schema, read_records
from llmir_lang.cli.output import OutputFileError, OutputLockedError, ResumableOutput
from llmir_lang.errors import CheckpointError
from llmir_lang.models.tiny_tasks import make_extraction_example
from llmir_lang.optimizer import PassPipelineError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def backend() -> Any:
    import llmir_lang as llmir

    torch.set_num_threads(1)
    rt = llmir.Runtime()
    yield rt
    rt.shutdown()


def _write_inputs(path: Path, n: int, seed: int = 7) -> dict[str, dict[str, Any]]:
    rng = random.Random(seed)
    expected = {}
    with open(path, "w") as f:
        for i in range(n):
            text, record = make_extraction_example(rng, "person")
            expected[f"r{i}"] = record
            f.write(json.dumps({"id": f"r{i}", "text": text}) + "\n")
    return expected


def _ns(tmp: Path, *extra: str, inp: str = "in.jsonl", out: str = "out.jsonl") -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = ["--schema", "person", "--input", str(tmp / inp), "--output", str(tmp / out), "--no-progress"]
    return p.parse_args([*args, *extra])


def _rows(path: Path) -> list[dict[str, Any]]:
    data = path.read_text()
    assert data == "" or data.endswith("\n"), "the output must end with a whole line"
    return [json.loads(line) for line in data.splitlines()]


def test_extract_records_errors_and_resume(tmp_path: Path, backend: Any) -> None:
    expected = _write_inputs(tmp_path / "in.jsonl", 10)
    with open(tmp_path / "in.jsonl", "a") as f:
        f.write(json.dumps({"id": "empty", "text": "  "}) + "\n")
        f.write(json.dumps({"id": "no-text", "body": "x"}) + "\n")
        f.write(json.dumps({"id": "r0", "text": "a duplicate id"}) + "\n")
    summary = run_extract(_ns(tmp_path, "--batch-size", "4"), backend)
    rows = _rows(tmp_path / "out.jsonl")
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == len(by_id) == 12
    assert (summary.ok, summary.failed, summary.duplicates, summary.total) == (10, 2, 1, 13)
    assert "is empty" in by_id["empty"]["error"] and "is missing" in by_id["no-text"]["error"]
    right = sum(by_id[i].get("record") == rec for i, rec in expected.items())
    assert right >= 8, [by_id[i] for i in expected]  # the bundled model gets ~100% of these
    assert summary.completion_tokens > 10 * 20 and summary.tokens_per_s > 0

    before = (tmp_path / "out.jsonl").read_bytes()
    again = run_extract(_ns(tmp_path), backend)
    # the repeated r0 row is a duplicate (as in the first run), not one more "already done"
    assert (again.skipped, again.skipped_failed, again.duplicates, again.done) == (12, 2, 1, 0)
    assert "12 already done (2 of them errors" in again.report() and "(line 13)" in again.report()
    assert (tmp_path / "out.jsonl").read_bytes() == before


def test_tiny_max_tokens_is_a_record_error(tmp_path: Path, backend: Any) -> None:
    _write_inputs(tmp_path / "in.jsonl", 2)
    summary = run_extract(_ns(tmp_path, "--max-tokens", "3"), backend)
    rows = _rows(tmp_path / "out.jsonl")
    assert summary.failed == 2 and len(rows) == 2
    for row in rows:
        assert "record" not in row and "--max-tokens" in row["error"] and row["output"].startswith("{")


def test_partial_last_line_is_truncated_and_redone(tmp_path: Path, backend: Any) -> None:
    _write_inputs(tmp_path / "in.jsonl", 3)
    (tmp_path / "out.jsonl").write_text('{"id":"r0","record":{"name":"A"}}\n{"id":"r1","rec')
    summary = run_extract(_ns(tmp_path), backend)
    rows = _rows(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
    assert summary.skipped == 1 and summary.ok == 2


def test_csv_input_and_pydantic_schema(tmp_path: Path, backend: Any) -> None:
    rng = random.Random(3)
    with open(tmp_path / "in.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "body"])
        for i in range(3):
            w.writerow([str(100 + i), make_extraction_example(rng, "person")[0]])
    ns = _ns(
        tmp_path, "--id-field", "key", "--text-field", "body", inp="in.csv",
    )  # fmt: skip
    ns.schema = f"{ROOT / 'examples' / 'extract_person.py'}:Person"
    summary = run_extract(ns, backend)
    rows = _rows(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == ["100", "101", "102"] and summary.ok >= 2
    assert all(
        set(r["record"]) == {"name", "age", "city", "occupation", "married"} for r in rows if "record" in r
    )


def test_dataclass_schema(tmp_path: Path, backend: Any) -> None:
    # a dataclass (or TypedDict) in a file is a schema as a pydantic model is: records validate
    # through pydantic and come out as JSON data
    (tmp_path / "kinds.py").write_text(
        "import dataclasses\n\n\n@dataclasses.dataclass\nclass Person:\n    name: str\n    age: int\n"
        "    city: str\n    occupation: str\n    married: bool\n\n\nnot_a_type = 3\n"
    )
    _write_inputs(tmp_path / "in.jsonl", 2)
    ns = _ns(tmp_path)
    ns.schema = f"{tmp_path / 'kinds.py'}:Person"
    summary = run_extract(ns, backend)
    rows = _rows(tmp_path / "out.jsonl")
    assert summary.ok == 2 and all(
        set(r["record"]) == {"name", "age", "city", "occupation", "married"} for r in rows
    )
    with pytest.raises(ExtractInputError, match="'not_a_type' in .* is an int value; give a pydantic model"):
        load_schema(f"{tmp_path / 'kinds.py'}:not_a_type")


def test_prompt_file_template(tmp_path: Path, backend: Any) -> None:
    _write_inputs(tmp_path / "in.jsonl", 2)
    (tmp_path / "prompt.txt").write_text("Text: {text}\nPerson JSON:\n")
    summary = run_extract(_ns(tmp_path, "--prompt-file", str(tmp_path / "prompt.txt")), backend)
    assert summary.ok == 2


def test_bad_schema_and_bad_output_file(tmp_path: Path) -> None:
    with pytest.raises(ExtractInputError, match="bundled schema"):
        load_schema("nonsense")
    with pytest.raises(ExtractInputError, match="no such file"):
        load_schema(str(tmp_path / "missing.json"))
    (tmp_path / "s.json").write_text(json.dumps({"title": "Person", "type": "object"}))
    assert load_schema(str(tmp_path / "s.json")).name == "person"
    (tmp_path / "out.jsonl").write_text("not json\n")
    with pytest.raises(OutputFileError, match="not an output"):
        ResumableOutput(tmp_path / "out.jsonl").open()


def _extract_subprocess(tmp_path: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    """``python -m llmir_lang extract`` over ``tmp_path/in.jsonl`` in small rounds, and its env."""
    cmd = [
        sys.executable, "-m", "llmir_lang", "extract", "--schema", "person", "--input", str(tmp_path / "in.jsonl"),
        "--output", str(out), "--batch-size", "2", "--no-progress",
    ]  # fmt: skip
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_sigkill_mid_run_then_rerun_writes_every_id_once(tmp_path: Path, backend: Any) -> None:
    expected = _write_inputs(tmp_path / "in.jsonl", 40, seed=11)
    out = tmp_path / "out.jsonl"
    cmd, env = _extract_subprocess(tmp_path, out)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    lines_at_kill = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and (lines_at_kill := out.read_bytes().count(b"\n")) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"extract ended before the kill: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= lines_at_kill < 40, lines_at_kill
    done_before = len(_rows(out))
    summary = run_extract(_ns(tmp_path, "--batch-size", "8"), backend)
    assert summary.skipped == done_before and summary.done == 40 - done_before
    counts = Counter(r["id"] for r in _rows(out))
    assert counts == Counter({i: 1 for i in expected})


def _texts(n: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [make_extraction_example(rng, "person")[0] for _ in range(n)]


def _write_jsonl(path: Path, rows: list[Any]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _dead_url() -> str:
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_a_file_that_is_not_an_output_is_never_modified(tmp_path: Path, backend: Any) -> None:
    _write_inputs(tmp_path / "in.jsonl", 2)
    for name, content in (
        ("notes.txt", b"line one\nimportant last line"),  # no newline at the end: not a cut-off write
        ("one.txt", b"important"),
        ("mixed.jsonl", b'{"id":"r0","record":{}}\n{"id": 1}\nlast'),
        ("tail.jsonl", b'{"id":"r0","record":{}}\nnot ours'),
    ):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(OutputFileError) as refused:
            run_extract(_ns(tmp_path, out=name), backend)
        assert (tmp_path / name).read_bytes() == content, name
        assert "left untouched" in str(refused.value)
    # a whole output line that only lacks its newline is kept (and completed), not redone
    (tmp_path / "out.jsonl").write_bytes(b'{"id":"r0","record":{"name":"A"}}')
    summary = run_extract(_ns(tmp_path), backend)
    assert [r["id"] for r in _rows(tmp_path / "out.jsonl")] == ["r0", "r1"] and summary.skipped == 1


def test_output_that_is_the_input_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_inputs(tmp_path / "in.jsonl", 2)
    before = (tmp_path / "in.jsonl").read_bytes()
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "in.jsonl")
    os.link(tmp_path / "in.jsonl", tmp_path / "hard.jsonl")
    monkeypatch.chdir(tmp_path)
    for out in ("in.jsonl", "./sub/../in.jsonl", "link.jsonl", "hard.jsonl"):
        ns = _ns(tmp_path, out="x")
        ns.output = out
        with pytest.raises(OutputFileError, match="is the --input file"):
            run_extract(ns)  # no backend: refused before any model loads
    assert (tmp_path / "in.jsonl").read_bytes() == before


def test_setup_errors_stop_the_job_before_the_output_exists(tmp_path: Path, backend: Any) -> None:
    _write_inputs(tmp_path / "in.jsonl", 2)
    out = "sub/out.jsonl"  # neither the file nor its folder may be created by a refused job

    def refused(error: type[Exception], match: str, *extra: str, use_backend: bool = True, **kw: Any) -> None:
        with pytest.raises(error, match=match):
            run_extract(_ns(tmp_path, *extra, out=out, **kw), backend if use_backend else None)
        assert not (tmp_path / "sub").exists(), (match, extra)

    for schema, match in (
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "if": {"required": ["a"]},
                "then": {},
            },
            "'if'",
        ),
        ({"type": "foo"}, r"invalid at #/type \(keyword 'type'"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}, "/\\$defs/nope"),
    ):
        (tmp_path / "s.json").write_text(json.dumps(schema))
        refused(ExtractInputError, match, "--schema", str(tmp_path / "s.json"))
    refused(PassPipelineError, "unknown pass 'bogus'", "--passes", "bogus")
    refused(ExtractInputError, "--text-field 'body': no record", "--text-field", "body")
    refused(ExtractInputError, "--id-field 'key': no record", "--id-field", "key")
    refused(ExtractInputError, "does not answer", "--url", _dead_url(), use_backend=False)
    refused(CheckpointError, "does not exist", "--model", str(tmp_path / "nope"), use_backend=False)
    refused(ExtractInputError, "no such file", inp="nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"id": 1, "text": "ok"}\n{"id": 2, "text": "caf\xe9"}\n')
    refused(ExtractInputError, "line 2 is not UTF-8", inp="latin1.jsonl")


def test_a_backend_failure_stops_the_job_and_a_rerun_redoes_the_records(
    tmp_path: Path, backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmir_lang.executor.remote import Endpoint

    _write_inputs(tmp_path / "in.jsonl", 3)
    with Endpoint(_dead_url()) as down:  # passed in, so no health check: the server "dies" mid-job
        assert run_main(_ns(tmp_path), down) == 1
        with pytest.raises(ExtractAbortedError, match="ConnectError"):
            run_extract(_ns(tmp_path), down)
    err = capsys.readouterr().err
    assert "the backend failed" in err and "rerun the same command" in err
    assert _rows(tmp_path / "out.jsonl") == []  # nothing recorded as done-with-error
    summary = run_extract(_ns(tmp_path), backend)
    assert summary.ok == 3 and len(_rows(tmp_path / "out.jsonl")) == 3


def test_retry_failed_reruns_error_lines_and_keeps_one_line_per_id(tmp_path: Path, backend: Any) -> None:
    _write_inputs(tmp_path / "in.jsonl", 3)
    kept = ['{"id":"r0","record":{"name":"kept"}}', '{"id":"gone","error":"not in this input"}']
    (tmp_path / "out.jsonl").write_text(kept[0] + '\n{"id":"r1","error":"boom"}\n' + kept[1] + "\n")
    plain = run_extract(_ns(tmp_path), backend)
    assert (plain.ok, plain.skipped, plain.skipped_failed) == (1, 2, 1)  # r2 ran, r1's error stays
    retry = run_extract(_ns(tmp_path, "--retry-failed"), backend)
    assert (retry.ok, retry.retried, retry.skipped) == (1, 1, 2)
    rows = _rows(tmp_path / "out.jsonl")
    assert Counter(r["id"] for r in rows) == Counter(["r0", "gone", "r1", "r2"])
    assert (tmp_path / "out.jsonl").read_text().splitlines()[:2] == kept  # untouched, in place
    assert "record" in {r["id"]: r for r in rows}["r1"]
    assert not list(tmp_path.glob(".out.jsonl.*"))  # the temp file was renamed over the output


def test_exit_status_and_summary_say_when_records_failed(
    tmp_path: Path, backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_inputs(tmp_path / "in.jsonl", 2)
    assert run_main(_ns(tmp_path, "--max-tokens", "3"), backend) == 1  # both records fail
    err = capsys.readouterr().err
    assert "0 ok, 2 failed" in err and "no record succeeded, so no rates" in err and "records/s" not in err
    assert run_main(_ns(tmp_path), backend) == 0  # nothing left to do
    assert "2 already done (2 of them errors: --retry-failed" in capsys.readouterr().err
    assert run_main(_ns(tmp_path, "--retry-failed"), backend) == 0
    err = capsys.readouterr().err
    assert "2 ok, 0 failed" in err and "ok records/s" in err


def test_ids_are_typed_never_collide_and_bad_lines_are_record_errors(
    tmp_path: Path, backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    t = _texts(4)
    _write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": 7, "text": t[0]},
            {"id": "7", "text": t[1]},  # a different record than 7
            {"text": t[2]},  # line 3: id "line:3", never a real id such as 3
            {"id": 3, "text": t[3]},
            '{"id": 9, "text": ',  # line 5: malformed, an error line; the job goes on
            {"id": "7", "text": "a repeat"},  # line 6
            {"id": 7, "text": "a repeat"},  # line 7
            "[1, 2]",  # line 8
        ],
    )
    summary = run_extract(_ns(tmp_path), backend)
    by_id = {json.dumps(r["id"]): r for r in _rows(tmp_path / "out.jsonl")}
    assert list(by_id) == ["7", '"7"', '"line:3"', "3", '"line:5"', '"line:8"']
    assert "not JSON" in by_id['"line:5"']["error"] and "JSON object" in by_id['"line:8"']["error"]
    assert (summary.ok, summary.failed, summary.malformed, summary.duplicate_lines) == (4, 2, 2, [6, 7])
    assert "(lines 6, 7)" in capsys.readouterr().err and "2 malformed input lines" in summary.report()
    again = run_extract(_ns(tmp_path), backend)
    assert (again.skipped, again.duplicates, again.done) == (6, 2, 0)

    _write_jsonl(tmp_path / "clash.jsonl", [{"text": t[0]}, {"id": "line:1", "text": t[1]}])
    with pytest.raises(ExtractInputError, match="line 2 has the id 'line:1'"):
        run_extract(_ns(tmp_path, inp="clash.jsonl", out="clash-out.jsonl"), backend)


def test_byte_order_marks_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_bytes(b"\xef\xbb\xbfkey,body\r\n5,some text\r\n,no key\r\n")
    got = [(r.line, r.id, r.row) for r in read_records(tmp_path / "in.csv", id_field="key")]
    assert got == [(2, "5", {"key": "5", "body": "some text"}), (3, "line:3", {"key": "", "body": "no key"})]
    (tmp_path / "in.jsonl").write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "x"}\n')
    assert [r.id for r in read_records(tmp_path / "in.jsonl")] == ["a"]
    assert load_schema(str(ROOT / "examples" / "extract_person.py") + ":Person").name == "person"
    (tmp_path / "S.JSON").write_bytes(b'\xef\xbb\xbf{"title": "Thing", "type": "object"}')
    assert load_schema(str(tmp_path / "S.JSON")).name == "thing"  # any case of .json is a file


def test_a_second_run_on_the_same_output_is_refused(tmp_path: Path, backend: Any) -> None:
    _write_inputs(tmp_path / "in.jsonl", 2)
    (tmp_path / "out.jsonl").write_text('{"id":"r0","error":"x"}\n')
    with ResumableOutput(tmp_path / "out.jsonl").open(retry={'"r0"'}) as first:  # after its rewrite too
        assert first.retried_ids == {'"r0"'}
        with pytest.raises(OutputLockedError, match="another `llmir extract`"):
            run_extract(_ns(tmp_path), backend)
        with pytest.raises(OutputLockedError):
            ResumableOutput(tmp_path / "out.jsonl").open()
    assert run_extract(_ns(tmp_path), backend).ok == 2  # the lock went with the first writer


def test_lone_surrogates_in_ids_and_texts(tmp_path: Path, backend: Any) -> None:
    t = _texts(2)
    (tmp_path / "in.jsonl").write_text(
        json.dumps({"id": "bad\ud800id", "text": t[0]}) + "\n"  # json.dumps escapes it: valid JSON
        + json.dumps({"id": "r1", "text": "Ann \udc00 lives in Paris."}) + "\n"
    )  # fmt: skip
    summary = run_extract(_ns(tmp_path), backend)
    rows = {r["id"]: r for r in _rows(tmp_path / "out.jsonl")}
    assert "record" in rows["bad\ud800id"] and summary.ok == 1
    assert rows["r1"]["error"] == "the text has an invalid character (lone surrogate U+DC00) at position 4"
    assert run_extract(_ns(tmp_path), backend).skipped == 2  # and a rerun reads it back


def test_lines_are_written_in_input_order(tmp_path: Path, backend: Any) -> None:
    t = _texts(3)
    _write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "a", "text": t[0]}, {"id": "b", "text": t[1]}, {"id": "c"}, {"id": "d", "text": t[2]}],
    )
    run_extract(_ns(tmp_path, "--batch-size", "2"), backend)
    assert [r["id"] for r in _rows(tmp_path / "out.jsonl")] == ["a", "b", "c", "d"]


def test_record_error_names_no_meaningless_location(tmp_path: Path, backend: Any) -> None:
    _write_jsonl(tmp_path / "in.jsonl", [{"id": "long", "text": " ".join(_texts(60))}])
    summary = run_extract(_ns(tmp_path), backend)
    (row,) = _rows(tmp_path / "out.jsonl")
    assert summary.failed == 1 and row["error"].startswith("GenerationError: gen/select 'record' failed:")
    assert "threading.py" not in row["error"] and "program 'extract'" not in row["error"]


def test_module_schema_is_found_in_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the `llmir` console script starts with the script's folder, not the current one, on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cwd_schema_mod.py").write_text(
        "from pydantic import BaseModel\n\nclass Thing(BaseModel):\n    name: str\n"
    )
    try:
        assert load_schema("cwd_schema_mod:Thing").json_schema["properties"] == {
            "name": {"title": "Name", "type": "string"}
        }
    finally:
        sys.modules.pop("cwd_schema_mod", None)


def test_module_schema_is_narrowed_to_what_the_model_validates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--schema module:Model takes the schema narrowed to the model's own validation (a UUID4's
    version digit in a pattern; model_json_schema()'s format 'uuid4' constrains nothing), and a
    field no schema can express is a setup error naming it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "narrow_schema_mod.py").write_text(
        "from pydantic import UUID4, BaseModel, FutureDate\n\n"
        "class Rec(BaseModel):\n    id: UUID4\n\n"
        "class Later(BaseModel):\n    due: FutureDate\n"
    )
    try:
        prop = load_schema("narrow_schema_mod:Rec").json_schema["properties"]["id"]
        assert "format" not in prop and "-4" in prop["pattern"]
        with pytest.raises(ExtractInputError, match="'due'"):
            load_schema("narrow_schema_mod:Later")
    finally:
        sys.modules.pop("narrow_schema_mod", None)


def test_ctrl_c_prints_the_summary_and_exits_130(tmp_path: Path) -> None:
    _write_inputs(tmp_path / "in.jsonl", 40, seed=12)
    out = tmp_path / "out.jsonl"
    cmd, env = _extract_subprocess(tmp_path, out)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted; rerun the same command to resume" in err
    import re

    m = re.search(r"extract: (\d+) ok, (\d+) failed", err)
    assert m is not None and int(m[1]) + int(m[2]) == len(_rows(out)) >= 2, err[-2000:]
