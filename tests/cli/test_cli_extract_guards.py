"""``llmir extract``'s guards, on a fake backend (fast): a user's own JSON file given as --output is
never modified and a dropped cut-off line is reported; only regular files are outputs; schema
patterns Python's ``re`` cannot read are a setup error; --api-key and a server that refuses the key;
what the summary says when a run stops before any record; --input as a directory or stdin; SIGTERM."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from llmir_lang.cli import extract as extract_cli
from llmir_lang.cli.extract import add_arguments, run_extract, run_main
from llmir_lang.cli.inputs import ExtractInputError, load_schema, read_records
from llmir_lang.cli.output import OutputFileError, scan_output
from llmir_lang.executor.backend import Backend, ChainRequest, ChainResult, StepResult


class InstantBackend(Backend):
    """Answers every request at once with ``{}``."""

    def submit(self, request: ChainRequest, on_chunk: Any = None) -> Future:
        future: Future = Future()
        steps = [st for st in request.steps if not isinstance(st, str)]
        future.set_result(
            ChainResult([StepResult(st.name, "{}", [1, 2], "stop", 5, 2, 0, None) for st in steps], "{}")
        )
        return future

    def score(self, prompt: str, continuations: Any) -> list[list[float]]:
        raise AssertionError("extract never scores")

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = False) -> str:
        return "".join(m["content"] for m in messages)


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> InstantBackend:
    monkeypatch.setattr(extract_cli, "_check_schema", lambda backend, schema: None)
    return InstantBackend()


def _argv(tmp: Path, *extra: str, out: str = "out.jsonl", inp: str = "in.jsonl") -> list[str]:
    schema = tmp / "schema.json"
    if not schema.exists():
        schema.write_text(json.dumps({"type": "object"}))
    rows = [{"id": i, "text": f"text {i}"} for i in range(3)]
    if not (tmp / "in.jsonl").exists():
        (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--schema", str(schema), "--input", str(tmp / inp), "--output", str(tmp / out)]
    return [*args, "--no-progress", "--no-fsync", *extra]


def _ns(tmp: Path, *extra: str, out: str = "out.jsonl", inp: str = "in.jsonl") -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(_argv(tmp, *extra, out=out, inp=inp))


def _one_line_error(err: str, *parts: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(p in lines[0] for p in parts), err


# --- 1. a user's JSON file is never modified; a dropped cut-off line is reported ---------------


def test_a_users_json_document_without_newline_is_refused_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, content in (
        ("meta.json", json.dumps({"id": "my-dataset", "description": "important metadata"}).encode()),
        ("compact.json", b'{"id":"x","note":"kept"}'),  # complete JSON: never a cut-off write
        ("array.json", b'{"id":"r0","record":{}}\n{"id":[1, 2]'),  # json.dump's spacing: not ours
        ("spaced.json", b'{"id": "x", "desc": "trunc'),
    ):
        (tmp_path / name).write_bytes(content)
        assert extract_cli.main(_argv(tmp_path, out=name)) == 1, name  # before any model loads
        _one_line_error(capsys.readouterr().err, "left untouched", name)
        assert (tmp_path / name).read_bytes() == content, name


def test_a_cut_off_line_is_dropped_and_reported(
    tmp_path: Path, fake: InstantBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    fragment = '{"id":1,"record":{"name":"Zo\u00eb'.encode()[:-1]  # cut inside a 2-byte character
    (tmp_path / "out.jsonl").write_bytes(b'{"id":0,"record":{}}\n' + fragment)
    assert scan_output(tmp_path / "out.jsonl").done_ids == {"0"}
    assert run_main(_ns(tmp_path), fake) == 0
    err = capsys.readouterr().err
    assert f"removed the cut-off last line of --output ({len(fragment)} bytes" in err
    assert [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [0, 1, 2]


# --- 4. only regular files are outputs ---------------------------------------------------------


def _refused_in_time(ns: argparse.Namespace, match: str) -> None:
    """``run_extract(ns)`` raises ``OutputFileError`` matching ``match``, and does not hang."""
    result: list[BaseException | None] = []

    def target() -> None:
        try:
            run_extract(ns)  # no backend: refused before any model loads
            result.append(None)
        except BaseException as e:
            result.append(e)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), f"--output {ns.output} hangs"
    assert isinstance(result[0], OutputFileError) and match in str(result[0]), result


def test_outputs_that_are_not_regular_files_are_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    _refused_in_time(_ns(tmp_path, out="fifo"), "is a FIFO (named pipe); the output must be a regular file")
    _refused_in_time(_ns(tmp_path, out="dir"), "is a directory")
    ns = _ns(tmp_path)
    ns.output = "/dev/null"
    _refused_in_time(ns, "is a device")
    ns.output = "-"
    _refused_in_time(ns, "the output must be a file")
    assert not (tmp_path / "-").exists() and not Path("-").exists()


# --- 2. schema patterns Python's re cannot read ------------------------------------------------


def test_a_pattern_python_re_cannot_read_is_a_setup_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = tmp_path / "schema.json"
    for bad, where in (
        (
            {"type": "object", "properties": {"name": {"type": "string", "pattern": "^\\p{L}+$"}}},
            "properties/name/pattern",
        ),
        ({"type": "object", "patternProperties": {"(?<=a+)b": {}}}, "(root)/patternProperties"),
        ({"$defs": {"n": {"pattern": "a{2,1}"}}, "$ref": "#/$defs/n"}, "$defs/n/pattern"),
    ):
        schema.write_text(json.dumps(bad))
        with pytest.raises(ExtractInputError, match="is not a Python regular expression") as e:
            load_schema(str(schema))
        assert where.replace("(root)/", "") in str(e.value)
    assert "[^\\W\\d_]" in str(
        pytest.raises(ExtractInputError, load_schema, _write(schema, {"pattern": "\\p{L}"})).value
    )
    # data that merely holds a "pattern" key, and a property named pattern, are not regexes
    fine = {
        "properties": {"pattern": {"type": "string", "pattern": "^[a-z]+$"}},
        "enum": [{"pattern": "\\p"}],
    }
    assert load_schema(_write(schema, fine)).json_schema == fine
    # end to end: one line, before the output exists (the model never loads)
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "x"}\n')
    _write(schema, {"type": "object", "properties": {"name": {"type": "string", "pattern": "^\\p{L}+$"}}})
    assert extract_cli.main(_argv(tmp_path)) == 1
    _one_line_error(capsys.readouterr().err, "--schema", "\\p{L}")
    assert not (tmp_path / "out.jsonl").exists()


def _write(path: Path, schema: dict[str, Any]) -> str:
    path.write_text(json.dumps(schema))
    return str(path)


# --- 3. --api-key ------------------------------------------------------------------------------


class _KeyedServer(BaseHTTPRequestHandler):
    """/health answers anyone (as on llmir and SGLang servers); every other path needs key K."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/health" or self.headers.get("authorization") == "Bearer K":
            status, body = 200, {}
        else:
            status, body = 401, {"error": {"message": "missing or wrong API key"}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def keyed_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeyedServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_api_key_is_checked_before_the_job_and_a_refused_key_stops_it(
    tmp_path: Path, keyed_url: str, fake: InstantBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmir_lang.executor.remote import Endpoint

    for extra, words in (
        ((), "needs an API key: give it with --api-key"),
        (("--api-key", "bad"), "refused --api-key"),
    ):
        assert extract_cli.main(_argv(tmp_path, "--url", keyed_url, *extra)) == 1
        _one_line_error(capsys.readouterr().err, words, "HTTP 401")
        assert not (tmp_path / "out.jsonl").exists()
    extract_cli._check_server(keyed_url, "K")  # the right key passes
    assert extract_cli.main(_argv(tmp_path, "--api-key", "K")) == 1  # a key without --url
    _one_line_error(capsys.readouterr().err, "give it with --url")
    # the key is refused mid-job (here: an Endpoint without it): stop, no error line per record
    with Endpoint(keyed_url) as no_key:
        assert run_main(_ns(tmp_path, "--url", keyed_url), no_key) == 1
    err = capsys.readouterr().err
    _one_line_error(err, "needs an API key", "stopped at record 0")
    assert "stopped by a failure before any record of this run finished" in err
    assert (tmp_path / "out.jsonl").read_text() == ""


# --- minor: the summary of a stopped run, --input, SIGTERM -------------------------------------


def test_a_run_stopped_before_any_record_says_so(
    tmp_path: Path, fake: InstantBackend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_cli._Job, "start", interrupted)
    assert run_main(_ns(tmp_path), fake) == 130
    err = capsys.readouterr().err
    assert "interrupted before any record of this run finished" in err and "nothing to run" not in err


def test_input_directory_and_standard_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ExtractInputError, match="is a directory"):
        list(read_records(tmp_path))
    with pytest.raises(ExtractInputError, match="no such file"):
        list(read_records(tmp_path / "nope.jsonl"))

    class Stdin:
        def __init__(self, data: bytes, tty: bool = False) -> None:
            self.buffer = io.BytesIO(data)
            self.buffer.isatty = lambda: tty  # type: ignore[method-assign]

    monkeypatch.setattr("sys.stdin", Stdin(b'{"id": "a", "text": "x"}\n\n{"text": "y"}\n'))
    assert [(r.id, r.row) for r in read_records("-")] == [
        ("a", {"id": "a", "text": "x"}),
        ("line:3", {"text": "y"}),
    ]
    monkeypatch.setattr("sys.stdin", Stdin(b"", tty=True))
    with pytest.raises(ExtractInputError, match="standard input is a terminal"):
        list(read_records("-"))
    os.mkfifo(tmp_path / "pipe.csv")  # a pipe is read whole, CSV too

    def feed() -> None:
        with open(tmp_path / "pipe.csv", "wb") as f:
            f.write(b"id,text\n7,hello\n")

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    assert [(r.id, r.row) for r in read_records(tmp_path / "pipe.csv")] == [
        ("7", {"id": "7", "text": "hello"})
    ]
    writer.join(10)


def test_sigterm_stops_like_ctrl_c_with_the_summary(
    tmp_path: Path, fake: InstantBackend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    writes = 0
    real_write = extract_cli.ResumableOutput.write

    def write(self: Any, row: dict[str, Any]) -> None:
        nonlocal writes
        writes += 1
        real_write(self, row)
        if writes == 2:  # arrives while a line is being written: held until it is counted
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(extract_cli.ResumableOutput, "write", write)
    before = signal.getsignal(signal.SIGTERM)
    assert run_main(_ns(tmp_path), fake) == 143
    assert signal.getsignal(signal.SIGTERM) == before  # restored
    err = capsys.readouterr().err
    assert "extract: 2 ok, 0 failed" in err and "terminated (SIGTERM); rerun the same command" in err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    assert run_extract(_ns(tmp_path), fake).skipped == 2  # and a rerun resumes
