"""The ``llmir extract`` job: the program, the chunks it runs, the lines it writes (with the
progress bar), the failures that stop it, and the signals held while a line is written."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import llmir_lang as llmir
from llmir_lang.cli.extract_setup import _auth_problem, _Item
from llmir_lang.cli.extract_summary import ExtractSummary
from llmir_lang.cli.inputs import Schema
from llmir_lang.cli.output import OutputWriteError, ResumableOutput
from llmir_lang.errors import LLMIRError


class ExtractAbortedError(LLMIRError):
    """The job stopped because the backend itself failed; the records not written yet are not
    marked done, so rerunning the same command retries them."""


@llmir.function(name="extract")
def extract_program(s: Any, prompt: str, schema: str, max_tokens: int) -> None:
    s += prompt + llmir.gen("record", json_schema=schema, max_tokens=max_tokens)


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
