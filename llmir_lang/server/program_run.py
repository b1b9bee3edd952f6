"""A ``/program`` run's engine requests, recorded so that the run can be aborted as a whole."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from llmir_lang.errors import EngineClosedError


class ProgramRun:
    """The engine requests of one ``/program`` run, so that the run can be aborted as a whole
    (its client left, the server is stopping). Once cancelled, the run's requests are aborted and
    it cannot submit new ones, so it ends at once with per-state failures. Thread-safe."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.rids: set[int] = set()
        self.cancelled = False
        self.reason = ""
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise if the run was cancelled (called before each new engine request)."""
        if self.cancelled:
            raise EngineClosedError(f"the program was aborted: {self.reason}")

    def track(self, fut: Future) -> Future:
        rid = fut.rid  # type: ignore[attr-defined]
        with self._lock:
            late = self.cancelled
            if not late:
                self.rids.add(rid)
        if late:  # cancelled while this request was being submitted
            self._abort(rid)
        else:
            fut.add_done_callback(lambda _: self._forget(rid))
        return fut

    def _forget(self, rid: int) -> None:
        with self._lock:
            self.rids.discard(rid)

    def cancel(self, reason: str) -> None:
        """Abort every request of the run (blocks until the engine did; call it off the loop)."""
        with self._lock:
            self.cancelled = True
            self.reason = self.reason or reason
            rids = list(self.rids)
        for rid in rids:
            self._abort(rid)

    def _abort(self, rid: int) -> None:
        try:
            self.engine.abort(rid)
        except EngineClosedError:
            pass  # the engine is gone, and every request with it


class ProgramEngine:
    """The served engine as one ``/program`` run sees it: every request it submits is recorded in
    the ``ProgramRun`` (see there); everything else is the engine's own."""

    def __init__(self, engine: Any, run: ProgramRun) -> None:
        self._engine = engine
        self._run = run

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def submit(self, *args: Any, **kwargs: Any) -> Future:
        self._run.check()
        return self._run.track(self._engine.submit(*args, **kwargs))

    def submit_chain(self, *args: Any, **kwargs: Any) -> Future:
        self._run.check()
        return self._run.track(self._engine.submit_chain(*args, **kwargs))

    def score(self, *args: Any, **kwargs: Any) -> list[list[float]]:
        self._run.check()  # a scoring call is prefill only: it is not aborted once it started
        return self._engine.score(*args, **kwargs)
