"""``llmir extract`` stopped mid-job (Ctrl-C, a backend failure, a full disk): the chunk that was
already running next to the one being written stops too, instead of running on in the background;
a write that fails ends the job with its summary and a one-line error, and a rerun resumes."""

from __future__ import annotations

import argparse
import json
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from llmir_lang.cli import extract as extract_cli
from llmir_lang.cli.extract import add_arguments, run_extract
from llmir_lang.dsl.workers import IDLE_NAME
from llmir_lang.executor.backend import Backend, ChainRequest, ChainResult, StepResult


class GatedBackend(Backend):
    """Answers every request at once with ``{}``, except those whose prompt holds ``WAIT``: they
    are answered only when ``gate`` is set (or never, if nobody sets it)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.submitted = 0
        self._lock = threading.Lock()

    def submit(self, request: ChainRequest, on_chunk: Any = None) -> Future:
        with self._lock:
            self.submitted += 1
        future: Future = Future()

        def answer() -> None:
            if "WAIT" in request.prompt:
                self.gate.wait()
            steps = [st for st in request.steps if not isinstance(st, str)]
            results = [StepResult(st.name, "{}", [1, 2], "stop", 5, 2, 0, None) for st in steps]
            if future.set_running_or_notify_cancel():  # a stopped run cancels what it waits for
                future.set_result(ChainResult(results, "{}"))

        threading.Thread(target=answer, daemon=True).start()
        return future

    def score(self, prompt: str, continuations: Any) -> list[list[float]]:
        raise AssertionError("extract never scores")

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = False) -> str:
        return "".join(m["content"] for m in messages)


def _ns(tmp: Path, *extra: str) -> argparse.Namespace:
    schema = tmp / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = ["--schema", str(schema), "--input", str(tmp / "in.jsonl"), "--output", str(tmp / "out.jsonl")]
    return p.parse_args([*args, "--no-progress", "--no-fsync", "--batch-size", "4", *extra])


def _batch_threads() -> set[threading.Thread]:
    """llmir's threads doing something: not the pooled workers parked for the next batch."""
    return {t for t in threading.enumerate() if t.name.startswith("llmir-") and t.name != IDLE_NAME}


@pytest.fixture()
def gated(monkeypatch: pytest.MonkeyPatch) -> Any:
    backend = GatedBackend()
    # no tokenizer is needed to check this schema
    monkeypatch.setattr(extract_cli, "_check_schema", lambda backend, schema: None)
    yield backend
    backend.gate.set()


def _inputs(tmp: Path) -> None:
    rows = [{"id": i, "text": "fast" if i < 4 else "WAIT"} for i in range(8)]
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_ctrl_c_while_writing_stops_the_next_chunk(
    tmp_path: Path, gated: GatedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    _inputs(tmp_path)
    before = _batch_threads()
    writes = 0
    real_write = extract_cli.ResumableOutput.write

    def write(self: Any, row: dict[str, Any]) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:  # Ctrl-C arrives while the first chunk is being written
            raise KeyboardInterrupt
        real_write(self, row)

    monkeypatch.setattr(extract_cli.ResumableOutput, "write", write)
    with pytest.raises(KeyboardInterrupt):
        run_extract(_ns(tmp_path), gated)
    # the second chunk (records 4-7) waits on the backend: it was stopped, and its threads are gone
    assert not (_batch_threads() - before)
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1


def test_a_backend_failure_stops_the_next_chunk(tmp_path: Path, gated: GatedBackend) -> None:
    _inputs(tmp_path)
    before = _batch_threads()
    real = extract_cli._Job._outcome

    def outcome(self: Any, item: Any, state: Any) -> dict[str, Any]:
        if item.id == 1:
            raise extract_cli.ExtractAbortedError("the backend failed at record 1")
        return real(self, item, state)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(extract_cli._Job, "_outcome", outcome)
        with pytest.raises(extract_cli.ExtractAbortedError):
            run_extract(_ns(tmp_path), gated)
    assert not (_batch_threads() - before)
    # a rerun on a backend that answers does every record not written, each once
    gated.gate.set()
    summary = run_extract(_ns(tmp_path), gated)
    assert (summary.ok, summary.skipped) == (7, 1)
    ids = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(ids) == list(range(8))


def test_a_full_disk_stops_the_job_with_a_summary_and_a_rerun_resumes(
    tmp_path: Path, gated: GatedBackend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno
    import os

    _inputs(tmp_path)
    gated.gate.set()
    real_write_all = extract_cli.ResumableOutput._write_all
    lines = 0

    def write_all(fd: int, data: bytes) -> None:
        nonlocal lines
        lines += 1
        if lines == 3:  # half the line fits, then the disk is full
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_all(fd, data)

    monkeypatch.setattr(extract_cli.ResumableOutput, "_write_all", staticmethod(write_all))
    assert extract_cli.run_main(_ns(tmp_path), gated) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "extract: 2 ok, 0 failed" in err  # the summary, then one line saying what to do
    assert "cannot write (No space left on device)" in err and "rerun the same command" in err
    data = (tmp_path / "out.jsonl").read_bytes()
    assert data.count(b"\n") == 2 and data.endswith(b"\n")  # the cut-off line was removed
    monkeypatch.setattr(extract_cli.ResumableOutput, "_write_all", staticmethod(real_write_all))
    summary = run_extract(_ns(tmp_path), gated)
    assert (summary.ok, summary.skipped) == (6, 2)
    ids = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ids == list(range(8))
