"""``llmir extract``: batch structured extraction, resumable, one JSON line per input record.

    llmir extract --schema person|schema.json|module:Model|file.py:Model --input in.jsonl|in.csv
                  --output out.jsonl [--text-field text] [--id-field id] [--model PATH | --url URL
                  [--api-key K]] [--prompt-file F] [--max-tokens N] [--batch-size N] [--passes P]
                  [--retry-failed] [--no-progress] [--no-fsync]

Each record becomes ``{"id": ..., "record": {...}}`` or, when it fails (empty or missing text, a
malformed input line, a generation error, a value the schema rejects), ``{"id": ..., "error":
"..."}``: a failed record never stops the job. The program is a DSL function (prompt, then
``gen("record", json_schema=...)``) run with ``run_batch`` over chunks of ``--batch-size``
records; lines are written in input order, each as soon as its record and every record before it
have finished, and fsynced (``cli.output.ResumableOutput``), so a rerun after a crash, a Ctrl-C or
a SIGKILL skips every id already in the output and every input id ends up in it exactly once.

What is checked before the output file is touched, each a one-line error and exit 1: the schema
(loaded, and its constraint compiled with the model's tokenizer, so an unsupported keyword or a
dangling ``$ref`` is named now, not written 10 000 times), ``--prompt-file``, ``--passes``, the
output path (not a directory, not the input, not locked by another run), the whole input file
(UTF-8, ``--text-field`` present in some record, an explicit ``--id-field`` present in some
record), the model (``--model`` loads, or ``--url`` answers and takes ``--api-key``). A failure
that is not the record's fault (the server went away or refused the API key, the engine closed, the
disk is full) is not written as the record's error: the job stops there with exit 1 (the chunk
running next to it is stopped too) and a rerun carries on. Ctrl-C (exit 130) and SIGTERM (exit 143)
stop the job the same way, after the summary.

The default prompt is the bundled model's extraction format (``Text: <text>⏎<Kind> JSON:⏎``, the
kind being the schema's name); ``--prompt-file`` is a template where ``{text}`` is replaced by the
record's text (no other braces are interpreted, so templates may hold JSON examples).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llmir_lang as llmir
from llmir_lang.cli.inputs import (
    ExtractInputError,
    InputRecord,
    Schema,
    load_schema,
    read_records,
    where_in,
)
from llmir_lang.cli.output import OutputWriteError, ResumableOutput, check_output_path, id_key, scan_output
from llmir_lang.errors import LLMIRError
from llmir_lang.executor.tokenizer import lone_surrogate

DESCRIPTION = """\
Batch structured extraction: run a schema-constrained generation over every record of a JSON lines
or CSV file and write one JSON line per record, resumably (a rerun skips the ids already in
--output). The schema, prompt file, passes, input, output path and model are all checked before the
output is created or changed."""

EPILOG = """\
output: one line per input id, {"id": ..., "record": {...}} or {"id": ..., "error": "..."}; a run
  writes its lines in input order, each once its record and all records before it have finished.
  Records without an id get the id "line:N" (N: JSON-lines line, or CSV row with the header as row 1);
  ids compare by JSON value and type ("7" and 7 are two records); a repeated id is ignored (warned).
  A rerun skips every id already in --output; --retry-failed reruns those whose line is an error
  (their error lines are removed first, so the file keeps exactly one line per id).
exit status: 0 every record of this run succeeded (or there was nothing to do); 1 a record failed
  (its error line is written), a setup error (nothing written), or the backend failed or the output
  could not be written (a full disk) mid-job (the records not yet written are redone by a rerun);
  2 bad arguments; 130 interrupted (Ctrl-C: the summary is printed, a rerun resumes); 143 terminated
  (SIGTERM: the same).
"""


class ExtractAbortedError(LLMIRError):
    """The job stopped because the backend itself failed; the records not written yet are not
    marked done, so rerunning the same command retries them."""


@llmir.function(name="extract")
def extract_program(s: Any, prompt: str, schema: str, max_tokens: int) -> None:
    s += prompt + llmir.gen("record", json_schema=schema, max_tokens=max_tokens)


@dataclass(slots=True)
class ExtractSummary:
    """What one ``llmir extract`` run did (records already in the output are ``skipped``)."""

    total: int = 0
    skipped: int = 0  # ids already in the output (first occurrence in the input)
    skipped_failed: int = 0  # of ``skipped``, those whose line is an error
    retried: int = 0  # ids whose earlier error line --retry-failed removed, run again
    duplicates: int = 0  # input rows whose id appeared earlier in the input
    duplicate_lines: list[int] = field(default_factory=list)  # their line numbers
    malformed: int = 0  # input lines that are not JSON objects (written as errors)
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    stopped: str = ""  # why the run stopped early ("interrupted", ...), set by ``run_main``
    started: bool = False  # the output is open and the counts above are the job's (``run_extract``)

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def records_per_s(self) -> float:
        """Successful records per second: failures can be instant and would inflate a rate."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def line(self) -> str:
        return f"{self.records_per_s:.1f} ok rec/s, {self.tokens_per_s:.0f} tok/s, cache {self.cache_hit_rate:.0%}"

    def report(self) -> str:
        if self.stopped and not self.started:
            # stopped while loading the model, the schema or the input: no count is known yet but
            # the input's size (0 when it was not read yet), and this run wrote no line
            read = f" ({self.total} input records)" if self.total else ""
            return f"extract: {self.stopped} before the job started{read}: no record ran, no line was written"
        done = f"{self.skipped} already done"
        if self.skipped_failed:
            done += f" ({self.skipped_failed} of them errors: --retry-failed reruns them)"
        extra = ""
        if self.retried:
            extra += f", {self.retried} earlier errors retried"
        if self.duplicates:
            extra += f", {self.duplicates} duplicate ids ignored ({_lines(self.duplicate_lines)})"
        if self.malformed:
            extra += f", {self.malformed} malformed input lines (written as errors)"
        if self.ok:
            rates = (
                f"{self.records_per_s:.2f} ok records/s, {self.tokens_per_s:.0f} output tokens/s, "
                f"cache hit rate {self.cache_hit_rate:.1%} of prompt tokens"
            )
        elif self.failed:
            rates = "no record succeeded, so no rates"
        elif self.stopped:
            rates = f"{self.stopped} before any record of this run finished"
        else:
            rates = "nothing to run"
        return (
            f"extract: {self.ok} ok, {self.failed} failed, {done}{extra} (of {self.total} input records)\n"
            f"time {self.seconds:.1f} s, {rates}"
        )


def _lines(numbers: list[int], first: int = 5) -> str:
    shown = ", ".join(map(str, numbers[:first]))
    return f"line{'s' if len(numbers) > 1 else ''} {shown}" + (", ..." if len(numbers) > first else "")


@dataclass(slots=True)
class _Item:
    """One record to process: its id, its text, or the error it gets without running."""

    id: Any
    text: str | None = None
    error: str | None = None


def _prompt_maker(prompt_file: str | None, schema: Schema) -> Any:
    if prompt_file is None:
        from llmir_lang.models.tiny_tasks import extraction_prompt

        return lambda text: extraction_prompt(text, schema.name)
    if not Path(prompt_file).is_file():
        raise ExtractInputError(f"--prompt-file {prompt_file!r}: no such file")
    data = Path(prompt_file).read_bytes()
    try:
        template = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExtractInputError(
            f"--prompt-file {prompt_file!r} is not UTF-8 ({where_in(data, e.start)}); convert it to UTF-8"
        ) from None
    if "{text}" not in template:
        raise ExtractInputError(
            f"--prompt-file {prompt_file!r} has no {{text}} placeholder for the record text"
        )
    return lambda text: template.replace("{text}", text)


def _check_passes(passes: str | None) -> None:
    """A bad ``--passes`` is the same error for every record: refuse it before the job starts."""
    if passes is not None:
        from llmir_lang.optimizer import PassManager, PassPipelineError

        try:
            PassManager(passes)
        except PassPipelineError as e:  # names the unknown pass / option
            raise PassPipelineError(f"--passes: {e}") from None


def _read_input(ns: argparse.Namespace) -> list[InputRecord]:
    """Every input record, after the whole-file checks (see the module docstring)."""
    id_field = ns.id_field or "id"
    records = list(read_records(ns.input, id_field=id_field))
    rows = [r.row for r in records if r.row is not None]
    if records and not rows:
        # a plain text file, a JSON array or a pretty-printed JSON document (or a CSV file whose
        # every row is split by unquoted commas): every line would be written as an error line
        # (and skipped by every rerun), so refuse it before the job
        first = records[0]
        if _is_csv(ns.input):
            raise ExtractInputError(
                f"--input {ns.input!r}: no row matches the header (row {first.line} is {first.problem})"
            )
        raise ExtractInputError(
            f"--input {ns.input!r}: no line is a JSON object (line {first.line} is {first.problem}); "
            'the input is JSON lines, one object per line such as {"id": 1, "text": "..."} '
            "(or CSV with a header, for a name ending in .csv)"
        )
    if rows and not any(ns.text_field in row for row in rows):
        raise ExtractInputError(
            f"--text-field {ns.text_field!r}: no record of {ns.input} has this field "
            f"(the first record's fields: {', '.join(map(str, rows[0])) or 'none'})"
        )
    if rows and ns.id_field is not None and not any(r.row is not None and not r.auto_id for r in records):
        raise ExtractInputError(
            f"--id-field {ns.id_field!r}: no record of {ns.input} has this field "
            f"(the first record's fields: {', '.join(map(str, rows[0])) or 'none'})"
        )
    auto = {r.id: r.line for r in records if r.auto_id}
    for r in records:
        if not r.auto_id and isinstance(r.id, str) and r.id in auto:
            raise ExtractInputError(
                f"{ns.input}: the record at line {r.line} has the id {r.id!r}, which is the id given to "
                f"line {auto[r.id]} (it has no {id_field!r}); give that record an id, or rename this one"
            )
    return records


def _is_csv(path: str) -> bool:
    """``read_records``' rule: a ``.csv`` name is CSV, except standard input (always JSON lines)."""
    return str(path) != "-" and Path(path).suffix.lower() == ".csv"


def _text_problem(text: Any, text_field: str) -> str | None:
    if not isinstance(text, str) or not text.strip():
        what = "is missing" if text is None else "is empty" if isinstance(text, str) else "is not text"
        return f"the text field {text_field!r} {what}"
    bad = lone_surrogate(text)
    if bad is not None:  # valid in JSON text (\ud800), but no tokenizer can encode it
        return (
            f"the text has an invalid character (lone surrogate U+{ord(bad.group()):04X}) at "
            f"position {bad.start()}"
        )
    return None


def _plan(
    records: list[InputRecord],
    done: set[str],
    failed: set[str],
    ns: argparse.Namespace,
    retried: set[str] | frozenset[str] = frozenset(),
) -> tuple[list[_Item], ExtractSummary]:
    """The records this run processes (input order, first occurrence of each id), and the counts
    of the others. Ids in ``failed`` are redone with ``--retry-failed``, else skipped; ``retried``
    are ids whose error lines ``ResumableOutput.open`` already removed."""
    summary = ExtractSummary(total=len(records))
    pending: list[_Item] = []
    seen: set[str] = set()
    for rec in records:
        key = id_key(rec.id)
        if key in seen:
            summary.duplicates += 1
            summary.duplicate_lines.append(rec.line)
            continue
        seen.add(key)
        if key in done and not (ns.retry_failed and key in failed):
            summary.skipped += 1
            summary.skipped_failed += key in failed
            continue
        summary.retried += key in done or key in retried
        if rec.row is None:
            summary.malformed += 1
            unit = "row" if _is_csv(ns.input) else "line"
            pending.append(_Item(rec.id, error=f"input {unit} {rec.line} is {rec.problem}"))
        else:
            text = rec.row.get(ns.text_field)
            problem = _text_problem(text, ns.text_field)
            pending.append(_Item(rec.id, None if problem else text, problem))
    return pending, summary


def _make_backend(ns: argparse.Namespace) -> Any:
    if ns.url:
        from llmir_lang.executor.remote import Endpoint

        _check_server(ns.url, ns.api_key)
        return Endpoint(ns.url, ns.api_key)
    return llmir.Runtime(ns.model)


def _check_server(url: str, api_key: str | None = None) -> None:
    """Abort before the job if the server does not answer: one ``GET /health`` (an llmir and an
    SGLang server answer it; any answer below 500, even a 404, means something is listening); then,
    as ``/health`` needs no key, one ``GET /get_model_info`` with ``api_key``: a 401 / 403 there
    (llmir and SGLang check the key before the route) means the key is missing or wrong."""
    import httpx

    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(base + "/health", timeout=10.0)
        if r.status_code < 500:
            auth = httpx.get(base + "/get_model_info", headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        raise ExtractInputError(
            f"--url {url!r}: the server does not answer ({type(e).__name__}: {e}); start it, or check the URL"
        ) from None
    if r.status_code >= 500:
        raise ExtractInputError(
            f"--url {url!r}: the server is not healthy (GET /health: HTTP {r.status_code})"
        )
    if auth.status_code in (401, 403):
        raise ExtractInputError(f"--url {url!r}: {_auth_problem(api_key, auth.status_code)}")


def _auth_problem(api_key: str | None, status: int | None) -> str:
    what = "needs an API key: give it with --api-key" if not api_key else "refused --api-key (a wrong key?)"
    return f"the server {what} (HTTP {status})"


def _check_schema(backend: Any, schema: Schema) -> None:
    """Compile the schema's constraint now, as the engine will for every record, so that a schema
    no engine can enforce is one error before the job instead of one per record. A local model
    compiles it with the backend's own compiler (which caches it, so the records reuse it); for a
    server (whose tokenizer is not at hand) the bundled model's tokenizer is used: which keywords
    are supported does not depend on the tokenizer."""
    from llmir_lang.executor.constraints import ConstraintCompiler, TokenizerInfo, spec_from_json_schema

    spec = spec_from_json_schema(schema.json_schema)
    local = getattr(backend, "backend", backend)  # a Runtime wraps its EngineBackend
    if hasattr(local, "compile"):
        compile_spec = local.compile
    else:
        from llmir_lang.models import TINY_MODEL_DIR

        if not (TINY_MODEL_DIR / "tokenizer.json").is_file():
            return  # no tokenizer to compile with: the server checks it, per record
        from transformers import AutoTokenizer

        compile_spec = ConstraintCompiler(
            TokenizerInfo.from_hf(AutoTokenizer.from_pretrained(str(TINY_MODEL_DIR)))
        ).compile
    try:
        compile_spec(spec)
    except LLMIRError as e:
        raise ExtractInputError(f"--schema: the JSON schema cannot be used for generation: {e}") from None


def run_extract(
    ns: argparse.Namespace, backend: Any = None, summary: ExtractSummary | None = None
) -> ExtractSummary:
    """Run the job described by ``ns`` (see ``add_arguments``); ``backend`` overrides the model.

    ``summary`` (filled in place when given) lets a caller report what was done when the job is
    interrupted. Raises ``LLMIRError`` for setup errors (before the output file is created or
    changed) and ``ExtractAbortedError`` when the backend fails mid-job.
    """
    summary = summary if summary is not None else ExtractSummary()
    if ns.api_key is not None and not ns.url:
        raise ExtractInputError("--api-key is the key of a server: give it with --url")
    schema = load_schema(ns.schema)
    make_prompt = _prompt_maker(ns.prompt_file, schema)
    _check_passes(ns.passes)
    check_output_path(ns.output, ns.input)
    records = _read_input(ns)
    summary.total = len(records)  # what an interrupted setup reports; the rest is counted under the lock
    before = scan_output(ns.output)  # read-only: a file that is not ours fails here, untouched
    pending, planned = _plan(records, before.done_ids, before.failed_ids, ns)
    _warn_duplicates(planned)
    if not pending:
        _copy(planned, summary)
        return summary
    own_backend = backend is None
    backend = _make_backend(ns) if own_backend else backend
    bar = None
    try:
        _check_schema(backend, schema)
        out = ResumableOutput(ns.output, fsync=not ns.no_fsync)
        # under the file's lock, the authoritative state: another run may have written since the scan
        with out.open(retry={id_key(r.id) for r in records} if ns.retry_failed else ()):
            if out.truncated_bytes:
                print(
                    f"extract: removed the cut-off last line of --output ({out.truncated_bytes} bytes, "
                    "left by an interrupted write); its record runs again",
                    file=sys.stderr,
                )
            pending, planned = _plan(records, out.done_ids, out.failed_ids, ns, out.retried_ids)
            _copy(planned, summary)
            summary.started = True
            if not pending:
                return summary
            if not ns.no_progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(pending), unit="rec", desc="extract", file=sys.stderr)
            job = _Job(ns, backend, make_prompt, out, schema, summary, bar)
            try:
                # NOTE: the next chunk starts before this one is written, so the engine's batch
                # does not drain at every chunk boundary; lines are still written in input order
                chunks = [pending[i : i + ns.batch_size] for i in range(0, len(pending), ns.batch_size)]
                running = job.start(chunks[0])
                for nxt in chunks[1:]:
                    following = job.start(nxt)
                    job.finish(*running)
                    running = following
                job.finish(*running)
            finally:
                # an interrupt or a backend failure leaves the next chunk running: stop it now,
                # not when the backend shuts down under its threads (or never, on a caller's backend)
                job.stop()
                summary.seconds = time.perf_counter() - job.started
    finally:
        if bar is not None:
            bar.close()
        if own_backend:  # Runtime has shutdown(), the HTTP backends close()
            getattr(backend, "shutdown", getattr(backend, "close", lambda: None))()
    return summary


_PLANNED = ("total", "skipped", "skipped_failed", "retried", "duplicates", "duplicate_lines", "malformed")


def _copy(planned: ExtractSummary, summary: ExtractSummary) -> None:
    """The counts ``_plan`` made, into the summary the caller holds."""
    for name in _PLANNED:
        setattr(summary, name, getattr(planned, name))


def _warn_duplicates(planned: ExtractSummary) -> None:
    if planned.duplicates:
        print(
            f"warning: {planned.duplicates} input records repeat an earlier record's id and are ignored "
            f"({_lines(planned.duplicate_lines)})",
            file=sys.stderr,
        )


# A record's error that is the backend's, not the record's: the transport failed, the server
# answered 5xx / 429 / 404 (not the right URL) / 401 / 403 (the API key), or the engine was closed.
# Remote backends report failures as text ("ConnectError: ..."), so the cause's text is matched as
# well as its type.
_BACKEND_FAILURE = re.compile(
    r"failed: (?:(?:ConnectError|ConnectTimeout|ReadTimeout|WriteTimeout|PoolTimeout|ReadError|"
    r"WriteError|RemoteProtocolError|NetworkError|TransportError|ProxyError|EngineClosedError):"
    r"|RemoteBackendError: \S+: (?:HTTP (?:5\d\d|429|404)\b|no answer from the server))"
    r"|RemoteBackendError: \S+: HTTP 40[13]\b"
)
_AUTH_FAILURE = re.compile(r"RemoteBackendError: \S+: HTTP (40[13])\b")
_BACKEND_STATUSES = (401, 403, 404, 429)


def _is_backend_failure(error: BaseException, message: str) -> bool:
    import httpx

    from llmir_lang.errors import EngineClosedError
    from llmir_lang.executor.remote import RemoteBackendError

    cause: BaseException | None = error
    while cause is not None:  # the exception and what it was raised from
        if isinstance(cause, (EngineClosedError, httpx.TransportError)):
            return True
        if isinstance(cause, RemoteBackendError) and (
            cause.status is None or cause.status in _BACKEND_STATUSES or cause.status >= 500
        ):
            return True
        cause = cause.__cause__
    return _BACKEND_FAILURE.search(message) is not None


class ExtractTerminated(KeyboardInterrupt):
    """SIGTERM arrived while ``run_main`` ran: stopped like a Ctrl-C, exit 143."""


@contextlib.contextmanager
def _sigint_after() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) or a SIGTERM that arrives inside the block until its end, so that
    the block runs whole: the interrupted run's summary then counts exactly the lines it wrote.
    Only the main thread can set signal handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, Any]] = []
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:  # None: a handler not set from Python, left alone
            previous[sig] = signal.signal(sig, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signum, frame = held[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler is signal.SIG_DFL:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signum)  # the default action, now that the line is whole


def _on_sigterm(signum: int, frame: Any) -> None:
    raise ExtractTerminated


class _Job:
    """One run's context: starts chunks (``run_batch`` in the background), writes their lines."""

    def __init__(
        self,
        ns: argparse.Namespace,
        backend: Any,
        make_prompt: Any,
        out: ResumableOutput,
        schema: Schema,
        summary: ExtractSummary,
        bar: Any,
    ) -> None:
        self.ns, self.backend, self.schema, self.make_prompt = ns, backend, schema, make_prompt
        self.out, self.summary, self.bar = out, summary, bar
        self.schema_text = json.dumps(schema.json_schema)
        self.started = time.perf_counter()
        self._batches: list[Any] = []  # the run_batch iterators of the chunks that may still run

    def stop(self) -> None:
        """Stop every chunk still running (its records are not written: a rerun does them)."""
        for states in self._batches:
            states.close()
        self._batches.clear()

    def write(self, record_id: Any, row: dict[str, Any]) -> None:
        with _sigint_after():  # a Ctrl-C between the line and its count made the summary short
            try:
                self.out.write({"id": record_id, **row})
            except OutputWriteError as e:  # not the record's fault: stop the job, a rerun resumes
                raise ExtractAbortedError(str(e)) from e
            if "error" in row:
                self.summary.failed += 1
            else:
                self.summary.ok += 1
        if self.bar is not None:
            self.summary.seconds = time.perf_counter() - self.started
            self.bar.set_postfix_str(self.summary.line(), refresh=False)
            self.bar.update(1)

    def start(self, chunk: list[_Item]) -> tuple[list[_Item], Any]:
        """Start the chunk's runnable records; nothing is written here (``finish`` writes the whole
        chunk in order). Returns ``(chunk, states iterator or the exception run_batch raised)``."""
        kwargs = [
            {
                "prompt": self.make_prompt(it.text),
                "schema": self.schema_text,
                "max_tokens": self.ns.max_tokens,
            }
            for it in chunk
            if it.error is None
        ]
        if not kwargs:
            return chunk, iter(())
        try:
            states = extract_program.run_batch(
                kwargs, backend=self.backend, passes=self.ns.passes, generator_style=True
            )
        except Exception as e:  # not any record's fault: finish() stops the job with it
            return chunk, e
        # at most two chunks run at once (``run_extract``): the ones before them are finished
        self._batches = [*self._batches[-1:], states]
        return chunk, states

    def finish(self, chunk: list[_Item], states: Any) -> None:
        """Write the chunk's lines in input order, each as soon as its record has finished."""
        if isinstance(states, Exception):
            raise ExtractAbortedError(
                f"the batch could not start ({type(states).__name__}: {states}); nothing more was written"
            ) from states
        for it in chunk:
            if it.error is not None:
                self.write(it.id, {"error": it.error})
                continue
            try:
                st = next(states)
            except Exception as e:
                raise ExtractAbortedError(
                    f"the batch failed ({type(e).__name__}: {e}) at record {_show(it.id)}; nothing more "
                    "was written: rerun the same command to resume"
                ) from e
            self.write(it.id, self._outcome(it, st))

    def _outcome(self, item: _Item, state: Any) -> dict[str, Any]:
        error = state.error()
        if error is not None:
            # the extract program is the library's own: its source location would say nothing
            message = f"{type(error).__name__}: {getattr(error, 'cause_message', error)}"
            if _is_backend_failure(error, message):
                auth = _AUTH_FAILURE.search(message)
                if auth is not None:
                    raise ExtractAbortedError(
                        f"--url {self.ns.url!r}: {_auth_problem(self.ns.api_key, int(auth[1]))}; "
                        f"stopped at record {_show(item.id)}, nothing was written for it: rerun to resume"
                    )
                raise ExtractAbortedError(
                    f"the backend failed at record {_show(item.id)} ({message}); it and the records "
                    "after it were not written: rerun the same command to resume"
                )
            return {"error": message}
        value = state["record"]
        meta = state.get_meta_info("record")
        self.summary.prompt_tokens += int(meta.get("prompt_tokens") or 0)
        self.summary.cached_tokens += int(meta.get("cached_tokens") or 0)
        self.summary.completion_tokens += int(meta.get("completion_tokens") or 0)
        try:
            return {"record": self.schema.validate(value)}
        except ValueError as e:
            reason = meta.get("finish_reason")
            hint = " (generation hit --max-tokens)" if reason == "length" else ""
            return {"error": f"{e}{hint}", "output": value}


def _show(record_id: Any) -> str:
    """An id for a message: JSON with ASCII escapes, so that printing it cannot fail."""
    return json.dumps(record_id, ensure_ascii=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--schema",
        required=True,
        help="schema.json, module:Model (importable from the current folder), file.py:Model, "
        "or person|product|event",
    )
    p.add_argument("--input", required=True, help="input records: .csv, else JSON lines (UTF-8)")
    p.add_argument(
        "--output", required=True, help="output .jsonl (appended to; ids already there are skipped)"
    )
    p.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    p.add_argument(
        "--id-field",
        default=None,
        help='field holding the record id (default: id; a record without one gets "line:N"; '
        "given explicitly, some record must have it)",
    )
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    p.add_argument(
        "--url", default=None, help="run on an llmir/SGLang server at this URL instead of a local model"
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="the --url server's API key (sent as 'Authorization: Bearer KEY'; see llmir serve --api-key)",
    )
    p.add_argument(
        "--prompt-file",
        default=None,
        help="prompt template with {text} (default: the bundled model's format)",
    )
    p.add_argument("--max-tokens", type=int, default=256, help="token limit of one record (default: 256)")
    p.add_argument("--batch-size", type=int, default=64, help="records run together per round (default: 64)")
    p.add_argument("--passes", default=None, help="pass pipeline (default: the default pipeline)")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="run again the input records whose line in --output is an error (that line is removed)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-fsync", action="store_true", help="skip the fsync after each line (faster, less durable)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmir extract")
    add_arguments(p)
    try:
        return run_main(p.parse_args(argv))
    except LLMIRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run_main(ns: argparse.Namespace, backend: Any = None) -> int:
    """The command: runs the job, prints the summary; the exit status is in ``EPILOG``."""
    if ns.batch_size < 1 or ns.max_tokens < 1:
        print("error: --batch-size and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    summary = ExtractSummary()
    # SIGTERM (kill, systemd, a container's stop) stops the job as Ctrl-C does: summary, exit 143
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        run_extract(ns, backend, summary)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, ExtractTerminated)
        summary.stopped = "terminated (SIGTERM)" if terminated else "interrupted"
        print(summary.report(), file=sys.stderr)
        print(f"extract: {summary.stopped}; rerun the same command to resume", file=sys.stderr)
        return 143 if terminated else 130
    except ExtractAbortedError as e:
        summary.stopped = "stopped by a failure"
        print(summary.report(), file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    print(summary.report(), file=sys.stderr)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
