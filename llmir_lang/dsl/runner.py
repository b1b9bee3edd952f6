"""Segment runners: optimize recorded segments with the pass pipeline and run them.

- ``PipelineRunner`` runs one program's segment at a time, in the program's own thread (``run``).
- ``BatchRunner`` serves the programs of a ``run_batch``, each in a worker thread: a program that
  reaches a sync point hands its segment over and waits. As soon as no program is executing
  Python (every one is waiting for a segment, in flight, or done), the waiting segments are put in
  ONE module (one function per program), optimized together, so that prefix-share sees every
  program at once, and run with all their requests submitted together. Each program resumes as
  soon as its own function is complete, and its next segment can join the next round while the
  previous one is still running, which keeps the engine's batch full. A program that stays in
  Python long between two sync points (a tool call, a slow lookup) does not hold the others back:
  once no segment has arrived for ``ROUND_WAIT_S``, the round starts with the segments waiting,
  and the slow program's segment joins a later round.

``cancel(reason)`` stops a run from another thread (a KeyboardInterrupt in ``run_batch``, a
cancelled ``arun``): the segments running now end at once with their requests aborted, and any
later segment raises ``ProgramInterruptedError`` instead of running.

On an llmir server (a backend with ``run_program`` whose ``protocol`` is ``"llmir"``), a module
that nothing streams goes to the server whole, as IR text (``/program``): the server optimizes and
runs it next to its engine, one round trip per segment module instead of one per call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmir_lang.dsl.errors import ProgramInterruptedError
from llmir_lang.dsl.evaluator import SegmentEvaluator
from llmir_lang.dsl.prefill import PrefillMemory
from llmir_lang.dsl.results import Failure, FunctionResult, StateResult, VarResult
from llmir_lang.dsl.workers import Task, spawn
from llmir_lang.executor.backend import Backend
from llmir_lang.ir import Function, Module, print_ir
from llmir_lang.optimizer import PassManager

if TYPE_CHECKING:
    from llmir_lang.dsl.recorder import ProgramRun
    from llmir_lang.dsl.state import ProgramState


@dataclass(slots=True)
class RunnerStats:
    """What the runner sent: segments run, rounds, gen/chain requests, prefills, score calls."""

    segments: int = 0
    rounds: int = 0
    requests: int = 0
    prefills: int = 0
    score_calls: int = 0
    modules: list[Module] = field(default_factory=list)  # optimized modules, if keep_ir

    def add(self, ev: SegmentEvaluator) -> None:
        self.requests += ev.requests
        self.prefills += ev.prefills
        self.score_calls += ev.score_calls


class PipelineRunner:
    """Optimizes a module with ``passes`` and runs it on ``backend``."""

    def __init__(self, backend: Backend, passes: str, *, keep_ir: bool = False) -> None:
        self.backend = backend
        self.passes = passes
        self.manager = PassManager(passes)  # raises PassPipelineError now on a bad pipeline
        self.keep_ir = keep_ir
        self.stats = RunnerStats()
        self.prefilled = PrefillMemory()
        self._lock = threading.Lock()
        self.cancelled: str | None = None  # the reason given to ``cancel``
        self._evaluators: set[SegmentEvaluator] = set()
        self._stop = threading.Event()  # set by ``cancel``: ends a whole-module call to a server

    def cancel(self, reason: str) -> None:
        """Stop the run (see the module docstring); thread-safe, the first reason is kept."""
        with self._lock:
            if self.cancelled is None:
                self.cancelled = reason
            running = list(self._evaluators)
        self._stop.set()
        for ev in running:
            ev.cancel(self.cancelled)

    def check_cancelled(self) -> None:
        """Raise ``ProgramInterruptedError`` if the run was cancelled."""
        if self.cancelled is not None:
            raise ProgramInterruptedError(self.cancelled)

    def optimize(self, module: Module, roles: Any) -> Module:
        if not self.passes.strip():
            return module
        # the final module is verified (and a failure traced to its pass), not every step
        return PassManager(self.passes, {"canonicalize": {"template": roles}}, verify_each=False).run(module)

    def evaluate(
        self,
        module: Module,
        roles: Any,
        live: list[list[ProgramState]],
        on_function_done: Callable[[int, FunctionResult], None] | None = None,
    ) -> list[FunctionResult]:
        """Optimize and run ``module``; ``live[i]`` are function i's states (for streaming)."""
        streaming = any(st._log is not None for states in live for st in states)
        if not streaming and self._runs_programs():
            return self._evaluate_remote(module, on_function_done)
        optimized = self.optimize(module, roles)

        def on_chunk(fi: int, owners: frozenset[int], name: str, text: str) -> None:
            for r in owners:
                live[fi][r]._on_chunk(name, text)

        ev = SegmentEvaluator(
            self.backend,
            roles,
            on_chunk=on_chunk if streaming else None,
            on_function_done=on_function_done,
            prefilled=self.prefilled,
        )
        with self._lock:
            self.check_cancelled()
            self._evaluators.add(ev)
        try:
            results = ev.run(optimized)
        finally:
            with self._lock:
                self._evaluators.discard(ev)
        with self._lock:
            self.stats.add(ev)
            self.stats.segments += len(module.functions)
            self.stats.rounds += 1
            if self.keep_ir:
                self.stats.modules.append(optimized)
        return results

    def execute(self, run: ProgramRun, fn: Function, live: list[ProgramState]) -> FunctionResult:
        self.check_cancelled()
        return self.evaluate(Module((fn,)), run.roles, [live])[0]

    def _runs_programs(self) -> bool:
        """Whether the backend runs whole modules itself (an llmir server: ``/program``)."""
        if not callable(getattr(self.backend, "run_program", None)):
            return False
        # NOTE: an Endpoint learns its protocol from /health once and then remembers it
        return getattr(self.backend, "protocol", None) == "llmir"

    def _evaluate_remote(
        self, module: Module, on_function_done: Callable[[int, FunctionResult], None] | None
    ) -> list[FunctionResult]:
        """Send ``module`` (unoptimized: the server runs ``self.passes`` with its model's chat
        template) and turn the reply's states into the runner's results."""
        self.check_cancelled()
        try:
            reply = self.backend.run_program(print_ir(module), None, self.passes, stop=self._stop)  # type: ignore[attr-defined]
        except Exception:
            if self._stop.is_set():  # the call was ended by ``cancel`` (ChainAborted)
                raise ProgramInterruptedError(self.cancelled or "the run was stopped") from None
            raise
        if len(reply.functions) != len(module.functions):
            raise RuntimeError(
                f"the server returned {len(reply.functions)} functions for a module of "
                f"{len(module.functions)}; is it the same llmir version as this client?"
            )
        results = []
        for fi, (_, states) in enumerate(reply.functions):
            result = FunctionResult(
                [
                    StateResult(
                        st.text,
                        {k: VarResult(v, dict(st.meta.get(k) or {})) for k, v in st.vars.items()},
                        None if st.error is None else Failure(st.error_var, st.error),
                    )
                    for st in states
                ]
            )
            results.append(result)
            if on_function_done is not None:
                on_function_done(fi, result)
        with self._lock:
            self.stats.requests += int(reply.stats.get("requests", 0))
            self.stats.prefills += int(reply.stats.get("prefills", 0))
            self.stats.score_calls += int(reply.stats.get("score_calls", 0))
            self.stats.segments += len(module.functions)
            self.stats.rounds += 1
            if self.keep_ir:
                self.stats.modules.append(module)
        return results


# How long the waiting segments wait for programs still executing Python, counted from the last
# segment that arrived: long enough for a batch's programs to reach their sync points together
# (recording takes microseconds to milliseconds), short next to a slow program's Python.
ROUND_WAIT_S = 0.1


@dataclass(slots=True)
class _Waiting:
    run: ProgramRun
    fn: Function
    live: list[ProgramState]
    future: Future = field(default_factory=Future)


class BatchRunner(PipelineRunner):
    """Runs the segments of many programs in rounds (see the module docstring).

    Protocol: ``n_workers`` threads call ``execute`` from program bodies and ``worker_exit`` once
    each when they have no program left; ``serve`` (one coordinator thread) forms the rounds.
    """

    def __init__(self, backend: Backend, passes: str, n_workers: int, *, keep_ir: bool = False) -> None:
        super().__init__(backend, passes, keep_ir=keep_ir)
        self._cv = threading.Condition()
        self._running = n_workers  # worker threads executing Python right now
        self._workers = n_workers
        self._waiting: list[_Waiting] = []
        self._last_arrival = 0.0  # time.monotonic() of the newest waiting segment
        self._rounds: list[Task] = []
        # programs begun and not ended: at most n_workers (run_batch's concurrency), as when each
        # worker waited for its program's last segment (it no longer does: execute_async)
        self._live = 0
        self._max_live = n_workers

    def execute(self, run: ProgramRun, fn: Function, live: list[ProgramState]) -> FunctionResult:
        item = _Waiting(run, fn, live)
        with self._cv:
            self.check_cancelled()
            self._waiting.append(item)
            self._last_arrival = time.monotonic()
            self._running -= 1
            self._cv.notify_all()
        try:
            return item.future.result()
        finally:
            with self._cv:
                self._running += 1

    def begin_program(self) -> None:
        """(A worker, before it starts a program) wait until fewer than ``n_workers`` programs are
        live, or the batch is cancelled. Without it the workers, which do not wait for a body's
        last segment, would trace every program of the batch before the first round."""
        with self._cv:
            if self._live >= self._max_live and self.cancelled is None:
                self._running -= 1  # waiting, as in execute: a round may start without us
                self._cv.notify_all()
                while self._live >= self._max_live and self.cancelled is None:
                    self._cv.wait()
                self._running += 1
            self._live += 1

    def end_program(self) -> None:
        with self._cv:
            self._live -= 1
            self._cv.notify_all()

    def execute_async(self, run: ProgramRun, fn: Function, live: list[ProgramState]) -> Future:
        """``execute`` without waiting (a body's last segment, ``ProgramRun.flush_then``): the
        caller stays counted as running, and goes on to its next program or ``worker_exit``."""
        item = _Waiting(run, fn, live)
        with self._cv:
            self.check_cancelled()
            self._waiting.append(item)
            self._last_arrival = time.monotonic()
            self._cv.notify_all()
        return item.future

    def cancel(self, reason: str) -> None:
        super().cancel(reason)
        with self._cv:  # segments waiting for the next round never get one
            waiting, self._waiting = self._waiting, []
            self._cv.notify_all()
        for item in waiting:
            item.future.set_exception(ProgramInterruptedError(reason))

    def worker_exit(self) -> None:
        with self._cv:
            self._running -= 1
            self._workers -= 1
            self._cv.notify_all()

    def serve(self) -> None:
        """Form and start rounds until every worker has exited."""
        while True:
            with self._cv:
                while not self._round_ready():
                    quiet = time.monotonic() - self._last_arrival
                    self._cv.wait(ROUND_WAIT_S - quiet if self._waiting else None)
                if not self._waiting and self._workers == 0:
                    break
                batch, self._waiting = self._waiting, []
            self._rounds.append(spawn(self._round, batch, name="llmir-round"))
        for t in self._rounds:
            t.join()

    def _round_ready(self) -> bool:
        """(Under ``_cv``) whether to start a round now, or stop serving: see the module docstring."""
        if not self._waiting:
            return self._workers == 0
        return self._running == 0 or time.monotonic() - self._last_arrival >= ROUND_WAIT_S

    def _round(self, batch: list[_Waiting]) -> None:
        module = Module(tuple(item.fn for item in batch))

        def done(fi: int, result: FunctionResult) -> None:
            batch[fi].future.set_result(result)

        try:
            self.evaluate(module, batch[0].run.roles, [item.live for item in batch], done)
        except BaseException as e:  # an optimizer or evaluator bug: fail the round's programs
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
