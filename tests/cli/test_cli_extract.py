"""``llmir extract`` on the bundled model: records, per-record errors, resume, SIGKILL + rerun."""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from llmir_lang.cli.extract import add_arguments, run_extract
from llmir_lang.cli.inputs import ExtractInputError, load_schema
from llmir_lang.cli.output import OutputFileError, ResumableOutput
from llmir_lang.models.tiny_tasks import make_extraction_example

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
    assert (again.skipped, again.done) == (13, 0)  # the duplicate r0 row is already done too
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


def test_sigkill_mid_run_then_rerun_writes_every_id_once(tmp_path: Path, backend: Any) -> None:
    expected = _write_inputs(tmp_path / "in.jsonl", 40, seed=11)
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable, "-m", "llmir_lang", "extract", "--schema", "person", "--input", str(tmp_path / "in.jsonl"),
        "--output", str(out), "--batch-size", "2", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
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
