"""The bookkeeping half of ``EngineService`` (``server/service.py``): the requests and
``/program`` runs in flight and their counters, aborts off the loop, stats, and shutdown."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from llmir_lang.executor.request import GenerateResult
from llmir_lang.server.config import ServerConfig
from llmir_lang.server.errors import shutting_down
from llmir_lang.server.program_run import ProgramRun


@dataclass(slots=True)
class ServiceCounters:
    requests: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    started_at: float = field(default_factory=time.time)


class ServiceLifecycle:
    """What ``EngineService`` runs on: the engine and its thread pools, the requests (``active``)
    and ``/program`` runs (``runs``) in flight, the counters. Loop-thread only, except where noted."""

    def __init__(self, engine: Any, config: ServerConfig, *, owns_engine: bool = True) -> None:
        from llmir_lang.executor.backend import EngineBackend

        self.engine = engine
        self.config = config
        self.owns_engine = owns_engine
        self.backend = EngineBackend(engine)  # chains for /program
        self.model_name = config.model_name(engine.model_path)
        self.counters = ServiceCounters()
        self.active: dict[int, float] = {}  # rid -> submit time
        self.runs: set[ProgramRun] = set()  # /program runs in flight
        self.closing = False  # refusing new requests (shutdown began)
        self.stopping = False  # the shutdown grace period is over: in-flight requests are aborted
        self._aborts_open = True
        self._compiler: Any = None
        # engine.abort blocks until the engine thread runs it; never block the loop on it
        self._aborts = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmir-abort")
        self._compile_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmir-compile")
        self.programs = ThreadPoolExecutor(
            max_workers=config.program_workers, thread_name_prefix="llmir-program"
        )

    def check_open(self) -> None:
        if self.closing:
            raise shutting_down()

    def _done(self, rid: int, result: GenerateResult | None, aborted: bool = False) -> None:
        """Count ``rid`` once, in one of ``finished``, ``aborted`` (its client left, the shutdown
        stopped it) or ``failed`` (no result: the engine failed it), so that once nothing runs
        ``requests == finished + aborted + failed``."""
        if aborted or (result is not None and result.finish_reason == "abort"):
            self._count(rid, "aborted")
        else:
            self._count(rid, "failed" if result is None else "finished")

    def _count(self, rid: int, outcome: str) -> None:
        self.active.pop(rid, None)
        setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)

    def abort(self, rid: int) -> None:
        """Abort ``rid`` without blocking the caller (loop thread). After ``close`` it does nothing:
        the engine's shutdown ends every request."""
        if rid in self.active:
            self._in_background(self.engine.abort, rid)

    def _in_background(self, fn: Any, *args: Any) -> None:
        if not self._aborts_open:
            return
        try:
            self._aborts.submit(fn, *args)
        except RuntimeError:  # the pool is shutting down (close): nothing left to abort
            pass

    # --- housekeeping ------------------------------------------------------------------------
    async def engine_stats(self) -> dict[str, Any]:
        """Engine counters plus what is running inside it (read on the engine thread)."""
        eng = self.engine

        def read() -> dict[str, Any]:
            stats = eng.stats()  # on the engine thread: a direct read
            stats["engine_requests"] = len(eng.scheduler.all_requests())
            return stats

        loop = asyncio.get_running_loop()
        stats = await loop.run_in_executor(None, eng.call_in_engine_thread, read)
        c = self.counters
        stats["server"] = {
            "active_requests": len(self.active) + len(self.runs),
            "requests": c.requests,
            "finished": c.finished,
            "aborted": c.aborted,
            "failed": c.failed,
            "uptime_s": round(time.time() - c.started_at, 3),
        }
        return stats

    # --- programs ----------------------------------------------------------------------------
    def start_program(self) -> ProgramRun:
        self.check_open()
        run = ProgramRun(self.engine)
        self.runs.add(run)
        self.counters.requests += 1
        return run

    def cancel_program(self, run: ProgramRun, reason: str) -> None:
        """Abort ``run``'s requests without blocking the loop."""
        run.cancelled = True  # new requests of the run fail from now on
        self._in_background(run.cancel, reason)

    def end_program(self, run: ProgramRun, outcome: str) -> None:
        """``outcome``: ``finished``, ``aborted`` or ``failed``."""
        self.runs.discard(run)
        c = self.counters
        if outcome == "finished":
            c.finished += 1
        elif outcome == "aborted":
            c.aborted += 1
        else:
            c.failed += 1

    # --- shutdown ----------------------------------------------------------------------------
    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new requests now; abort those still running ``grace_s`` seconds from now (loop
        thread)."""
        self.closing = True
        asyncio.get_running_loop().call_later(max(0.0, grace_s), self.abort_all)

    def abort_all(self) -> None:
        """Abort every request still running; they are answered as shut down (503 / a last
        ``abort`` event)."""
        self.closing = self.stopping = True
        for rid in list(self.active):
            self.abort(rid)
        for run in list(self.runs):
            self.cancel_program(run, "the server is shutting down")

    def close(self) -> None:
        """Stop taking requests, abort what still runs, shut the engine down if this service
        created it."""
        self.abort_all()
        self.programs.shutdown(wait=False, cancel_futures=True)
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self._aborts_open = False  # from now on abort() is a no-op: the engine's shutdown ends all
        self._aborts.shutdown(wait=True)
        if self.owns_engine:
            self.engine.shutdown()
