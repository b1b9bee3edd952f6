"""The worker process of ``bench_structured_peers.py`` (``python structured_peers_worker.py
ENGINE OPTIONS``) and the parent's handle on it.

The worker loads the tokenizer, builds its engine (``structured_peers_engines``), compiles and
walks the warm-up schemas, then sends ``("ready", info)``. For each ``("schema", schema,
walks)`` it sends ``("compiled", ok, route or error, seconds)`` as soon as the compile ends (the
parent bounds that wait), then ``("walked", verdicts, mask seconds, mask CPU seconds)``. Messages
are length-prefixed pickles on stdin / stdout; fd 1 itself is sent to stderr (a log file), so a
native library's print cannot break the stream. Each worker leads a process group of its own:
on a timeout the parent ends it, and anything it started (llmir's outlines-core build process),
by that group's id, and starts a fresh one for the next schema.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured_peers_engines import ENGINES, VOCAB, WARMUP  # noqa: E402

HEADER = struct.Struct("<Q")


def send(stream: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def recv(stream: Any) -> Any:
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        raise EOFError
    (size,) = HEADER.unpack(head)
    return pickle.loads(stream.read(size))


# --- the worker side ------------------------------------------------------------------------
def _walk_all(engine: Any, compiled: Any, walks: list[tuple[list[int], bool]]) -> tuple[list, bytes, bytes]:
    """Each walk -> (accepted: bool | None, steps, reason); None where the engine contradicted
    itself (a mask bit ``advance`` refused, an EOS bit ``is_accepting`` denied) or raised."""
    from llmir_lang.executor.constraints.testing import walk_tokens

    verdicts: list[tuple[bool | None, int, str]] = []
    masks, cpu = array("d"), array("d")
    for ids, timed in walks:
        matcher = engine.new_matcher(compiled)
        try:
            walk = walk_tokens(matcher, ids, VOCAB)
        except Exception as e:  # AssertionError from walk_tokens, or the engine's own
            why = engine.refused_why(matcher)
            if why is not None:  # the engine stopped the request on purpose: a rejection
                verdicts.append((False, -1, f"constraint error: {why.strip().splitlines()[0][:200]}"))
            else:
                verdicts.append((None, -1, f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        verdicts.append((walk.accepted, walk.steps, walk.reason))
        if timed:
            masks.extend(walk.mask_seconds)
            cpu.extend(walk.mask_cpu_seconds or [])
    return verdicts, masks.tobytes(), cpu.tobytes()


def serve(name: str, opts: dict[str, Any]) -> None:
    import torch

    from llmir_lang.executor.constraints.testing import instance_texts, train_test_tokenizer

    torch.set_num_threads(1)
    stdin = sys.stdin.buffer
    # the protocol gets its own copy of fd 1; fd 1 itself (print, native libraries) goes to stderr
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t0 = time.perf_counter()
    hf = train_test_tokenizer("byte_level_bpe", VOCAB)
    engine = ENGINES[name](hf, opts)
    for schema, instance in WARMUP:
        compiled = engine.compile(schema)
        walks = [(list(hf.encode(t, add_special_tokens=False)), True) for t in instance_texts(instance)]
        verdicts, _, _ = _walk_all(engine, compiled, walks)
        if not all(v[0] for v in verdicts):
            print(f"{name}: warm-up instance refused: {verdicts}", file=sys.stderr, flush=True)
    send(stdout, ("ready", {"setup_seconds": time.perf_counter() - t0, "settings": engine.settings()}))
    while True:
        try:
            msg = recv(stdin)
        except EOFError:
            return
        _, schema, walks = msg
        start = time.perf_counter()
        try:
            compiled = engine.compile(schema)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            send(stdout, ("compiled", False, f"{type(e).__name__}: {first}", time.perf_counter() - start))
            continue
        send(stdout, ("compiled", True, engine.route(compiled), time.perf_counter() - start))
        send(stdout, ("walked", *_walk_all(engine, compiled, walks)))


# --- the parent side -----------------------------------------------------------------------
class WorkerGone(Exception):
    pass


class EngineWorker:
    """One engine's worker process (see ``structured_peers_engines``), restarted after a kill."""

    def __init__(self, name: str, opts: dict[str, Any], log_dir: Path) -> None:
        self.name, self.opts, self.log = name, opts, log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.restarts = 0

    def start(self) -> None:
        env = dict(os.environ, RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), self.name, json.dumps(self.opts)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,  # its own process group: killed with what it started
            )

    def ready(self, timeout: float = 900.0) -> None:
        msg = self._recv(timeout)
        if msg[0] != "ready":
            raise WorkerGone(f"{self.name}: unexpected first message {msg[0]!r}")
        self.info = msg[1]

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this worker leads
            except ProcessLookupError:
                pass
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                stream.close()
            self.proc = None

    def _recv(self, timeout: float) -> Any:
        assert self.proc is not None and self.proc.stdout is not None
        fd, deadline = self.proc.stdout.fileno(), time.monotonic() + timeout

        def read(n: int) -> bytes:
            out = b""
            while len(out) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
                chunk = os.read(fd, n - len(out))
                if not chunk:
                    raise WorkerGone(self._log_tail())
                out += chunk
            return out

        (size,) = HEADER.unpack(read(HEADER.size))
        return pickle.loads(read(size))

    def _log_tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return " | ".join(lines[-3:])[-300:] or "worker exited"

    def run(
        self, schema: Any, walks: list[tuple[list[int], bool]], compile_to: float, walk_to: float
    ) -> dict:
        if self.proc is None:
            self.restarts += 1
            self.start()
            self.ready()
        try:
            send(self.proc.stdin, ("schema", schema, walks))
            _, ok, detail, seconds = self._recv(compile_to)
        except TimeoutError:
            self.kill()
            return {"status": "timeout", "error": f"compile past {compile_to:g} s", "compile_s": compile_to}
        except (WorkerGone, BrokenPipeError, OSError) as e:
            self.kill()
            return {
                "status": "crash",
                "error": f"worker died compiling: {e}"[:300],
                "compile_s": float("nan"),
            }
        if not ok:
            return {"status": "error", "error": detail, "compile_s": seconds}
        try:
            _, verdicts, masks, cpu = self._recv(walk_to)
        except TimeoutError:
            self.kill()
            return {
                "status": "walk_timeout",
                "error": f"walks past {walk_to:g} s",
                "compile_s": seconds,
                "route": detail,
            }
        except (WorkerGone, OSError) as e:
            self.kill()
            return {
                "status": "crash",
                "error": f"worker died walking: {e}"[:300],
                "compile_s": seconds,
                "route": detail,
            }
        return {
            "status": "ok",
            "route": detail,
            "compile_s": seconds,
            "verdicts": verdicts,
            "mask_s": array("d", masks).tolist(),
            "mask_cpu_s": array("d", cpu).tolist(),
        }


if __name__ == "__main__":
    serve(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
