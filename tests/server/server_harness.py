"""Start and stop a real ``llmir serve`` process on 127.0.0.1 for the server tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from llmir_lang.executor.remote import Endpoint, OpenAI

ROOT = Path(__file__).resolve().parents[2]
_LAUNCH = "import sys; from llmir_lang.server.cli import serve_main; sys.exit(serve_main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server subprocess on a free loopback port, the bundled model, a small KV pool.

    ``start`` waits until ``/health`` answers (bounded); ``stop`` sends SIGTERM (graceful) and
    returns the exit code, killing the process if it does not exit in time.
    """

    def __init__(self, *args: str, ready_timeout: float = 90.0) -> None:
        self.args = list(args)
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="llmir-serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-c", _LAUNCH, "--port", str(self.port), "--kv-memory", "64MB"]
        cmd += ["--log-level", "warning", *self.args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(self.url + "/health", timeout=1.0)
                if r.status_code == 200:
                    # the port was free when we picked it; make sure our process is the one answering
                    if r.json().get("pid") != self.proc.pid:
                        raise RuntimeError(f"another process answers on port {self.port}: {r.text}")
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server did not become ready in {self.ready_timeout}s:\n{self.output()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def log_size(self) -> int:
        """A mark in the log, for ``log_since``."""
        return Path(self.log.name).stat().st_size

    def log_since(self, mark: int) -> str:
        """What the server logged after ``mark`` (``log_size()``)."""
        with open(self.log.name, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def served(*args: str) -> Iterator[ServerProcess]:
    """A ``ServerProcess`` started with ``args`` (``llmir serve`` options), stopped on exit; a
    server fixture is ``with served(...) as proc: yield proc``."""
    proc = ServerProcess(*args).start()
    try:
        yield proc
    finally:
        proc.stop()


def arithmetic_prompt(i: int) -> str:
    """Prompts the bundled model answers with distinct numbers (few-shot Q&A format)."""
    return f"Q: What is {i} + 7?\nA: "


def server_stats(url: str) -> dict:
    """The server's ``/stats``: engine counters, KV pool and cache, ``server`` request counters."""
    return httpx.get(url + "/stats", timeout=30).json()


def kv_is_free(stats: dict) -> bool:
    """No request holds KV: every used slot belongs to the radix cache, and none is locked."""
    return (
        stats["cache"]["protected_tokens"] == 0 and stats["pool"]["used"] == stats["cache"]["cached_tokens"]
    )


def wait_idle(url: str, timeout: float = 20.0) -> dict:
    """``/stats`` once nothing runs on the server (no request, no engine request), bounded."""
    deadline = time.monotonic() + timeout
    stats: dict = {}
    while time.monotonic() < deadline:
        stats = server_stats(url)
        if stats["server"]["active_requests"] == 0 and stats["engine_requests"] == 0:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"requests still running after {timeout}s: {stats}")


class InProcessServer:
    """An llmir server for ``engine`` in this process: uvicorn on a daemon thread, a free loopback
    port (``url``), started once ``/health`` answers (bounded). ``close`` stops it; the engine is
    shut down with it (``owns_engine``). ``config``: the server's settings (its port is replaced)."""

    def __init__(self, engine: object, ready_timeout: float = 60.0, config: object = None) -> None:
        import dataclasses
        import threading

        import uvicorn

        from llmir_lang.server.app import create_app
        from llmir_lang.server.config import ServerConfig

        port = free_port()
        config = dataclasses.replace(config, port=port) if config is not None else ServerConfig(port=port)
        app = create_app(config, engine=engine, owns_engine=True)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.close()
        raise RuntimeError(f"the in-process server at {self.url} did not answer /health in {ready_timeout} s")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def run_clients(client_loop: Callable[[int], None], n_clients: int, deadline_s: float, what: str) -> None:
    """Run ``client_loop(c)`` for every client ``c`` on its own thread, all within ``deadline_s``;
    a client still running then (a hang) or one that raised fails the calling test."""
    crashed: list[BaseException] = []

    def run(c: int) -> None:
        try:
            client_loop(c)
        except BaseException as e:  # reported by the test thread
            crashed.append(e)

    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in range(n_clients)]
    deadline = time.monotonic() + deadline_s
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"{what} did not finish in {deadline_s}s (a hang)"
    assert not crashed, crashed[:3]



class CallByCallEndpoint(Endpoint):
    """``Endpoint`` on an llmir server without ``/program``: one request per call."""

    run_program = None  # type: ignore[assignment]

def remote_backend(kind: str, url: str) -> Endpoint | OpenAI:
    """A backend on the llmir server at ``url``: ``program`` (``Endpoint``, whole programs through
    ``/program``), ``calls`` (``CallByCallEndpoint``) or ``openai`` (its OpenAI routes)."""
    if kind == "program":
        return Endpoint(url)
    if kind == "calls":
        return CallByCallEndpoint(url)
    if kind == "openai":
        return OpenAI(url + "/v1", "llmir-tiny")
    raise ValueError(f"unknown backend kind {kind!r}; use program, calls or openai")


@contextlib.contextmanager
def server_beside_runtime(kv_memory: str = "64MB") -> Iterator[tuple[InProcessServer, object]]:
    """An in-process llmir server and an embedded ``Runtime`` on the same (bundled) model, one
    torch thread: remote backends against the Runtime, side by side."""
    import torch

    import llmir_lang as llmir
    from llmir_lang.executor.engine import Engine

    torch.set_num_threads(1)
    server = InProcessServer(Engine(kv_memory=kv_memory))
    rt = llmir.Runtime(kv_memory=kv_memory)
    try:
        yield server, rt
    finally:
        rt.shutdown()
        server.close()


# a reasoning format whose end tag the bundled tiny model writes ("tiny,"), registered only while
# the servers of ``reasoning_servers`` run: the model never writes "</think>"
TEST_REASONING_FORMAT = "test-tiny"


@contextlib.contextmanager
def reasoning_servers(**config: object) -> Iterator[tuple[str, str]]:
    """Two in-process servers on the bundled model, one torch thread: one started with
    ``--reasoning-parser TEST_REASONING_FORMAT`` (and ``config``), one without; their URLs."""
    import pytest
    import torch

    from llmir_lang.executor.engine import Engine
    from llmir_lang.ir.reasoning import FORMATS, ReasoningFormat
    from llmir_lang.server.config import ServerConfig

    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setitem(FORMATS, TEST_REASONING_FORMAT, ReasoningFormat("<think>", "tiny,", forced=True))
    split = InProcessServer(
        Engine(kv_memory="64MB"), config=ServerConfig(reasoning_parser=TEST_REASONING_FORMAT, **config)
    )
    plain = InProcessServer(Engine(kv_memory="64MB"))
    try:
        yield split.url, plain.url
    finally:
        split.close()
        plain.close()
        mp.undo()
