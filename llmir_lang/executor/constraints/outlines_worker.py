"""Builds outlines-core indexes in a child process, under a deadline.

outlines-core compiles a regex to a DFA over the whole vocabulary up front. That is usually
milliseconds, but some innocent-looking regexes take minutes (a counted repetition of a Unicode
class: the JSON string of ``"maxLength": 20`` takes over four minutes). A Rust call cannot be
interrupted, so the build runs in a child process that is killed at the deadline; the caller
then falls back to llguidance. The child runs this file as a script (not through ``multiprocessing``,
which would re-import the user's ``__main__``, nor ``-m``, which would import torch), speaks length-prefixed pickles over its pipes,
keeps vocabularies by key, and is restarted on the next request after a kill or a crash.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any

_HEADER = struct.Struct("<Q")


class OutlinesBuildError(Exception):
    """outlines-core refused the regex (message from outlines-core)."""


class OutlinesTimeout(Exception):
    """The index build exceeded its deadline; the child process was killed."""


def _send(stream: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _recv_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OutlinesTimeout()
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise OutlinesTimeout()
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("the outlines worker exited")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class OutlinesWorker:
    """Client of one child process; thread-safe (one build at a time)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._vocabs: set[str] = set()
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            env = dict(os.environ, RAYON_NUM_THREADS="1")
            self._proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            self._vocabs = set()
        return self._proc

    def kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    stream.close()
            self._proc = None

    def build_index(self, regex: str, vocab_key: str, vocab: Any, timeout_s: float) -> Any:
        """An ``outlines_core.Index`` for ``regex`` over ``vocab`` (sent once per key), or raise."""
        import outlines_core

        with self._lock:
            proc = self._start()
            assert proc.stdin is not None and proc.stdout is not None
            deadline = time.monotonic() + timeout_s
            try:
                if vocab_key not in self._vocabs:
                    _send(proc.stdin, ("vocab", vocab_key, vocab))
                    self._vocabs.add(vocab_key)
                _send(proc.stdin, ("index", vocab_key, regex))
                fd = proc.stdout.fileno()
                (size,) = _HEADER.unpack(_recv_exact(fd, _HEADER.size, deadline))
                status, payload = pickle.loads(_recv_exact(fd, size, None))
            except OutlinesTimeout:
                self.kill()
                raise OutlinesTimeout(f"outlines-core index build exceeded {timeout_s:.1f} s") from None
            except (EOFError, BrokenPipeError, OSError) as e:
                self.kill()
                raise OutlinesBuildError(f"the outlines worker died: {e}") from None
        if status != "ok":
            raise OutlinesBuildError(payload)
        return outlines_core.Index.from_binary(payload) if isinstance(payload, bytes) else payload

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.kill()
        except Exception:
            pass


_shared: OutlinesWorker | None = None
_shared_lock = threading.Lock()


def shared_worker() -> OutlinesWorker:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = OutlinesWorker()
        return _shared


def _serve() -> None:  # pragma: no cover - runs in the child process
    import outlines_core

    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    vocabs: dict[str, Any] = {}
    while True:
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        (size,) = _HEADER.unpack(header)
        kind, key, payload = pickle.loads(stdin.read(size))
        if kind == "vocab":
            vocabs[key] = payload
            continue
        try:
            index = outlines_core.Index(payload, vocabs[key])
            _send(stdout, ("ok", index))
        except Exception as e:  # outlines-core raises ValueError / others with a message
            _send(stdout, ("error", f"{type(e).__name__}: {e}"))


if __name__ == "__main__":  # pragma: no cover
    _serve()
