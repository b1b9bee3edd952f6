"""The engine's background loop: admit, schedule, run, process outputs, recover from bugs.

``Engine`` inherits this; the loop runs on the engine thread only and owns the scheduler, the KV
pool and the radix cache (other threads reach them through ``call_in_engine_thread``).

Deferred text work (``OutputProcessor.defer_text``) of step N runs between step N+1's launch and its
sampling; whenever no next step follows (idle, a failed step, recovery, shutdown) it is flushed at
once, so every finished request's future resolves.

With ``run_ahead`` (on by default on CUDA, off on the CPU) a decode step whose
requests all qualify is launched and left in flight (``_ahead``); the next loop turn queues the
decode step after it first and only then reads and processes its tokens (``run_ahead.py``).

The thread runs ``run_engine_thread``, which reaches the engine through a weak reference, one loop
turn at a time, and waits for work without it: an engine dropped without ``shutdown()`` is collected
(``Engine.__del__`` then stops the thread and fails what was still queued).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from llmir_lang.errors import EngineClosedError, EngineError, OutOfKVMemoryError
from llmir_lang.executor import run_ahead
from llmir_lang.executor.attention import ForwardMode
from llmir_lang.executor.request import FinishReason, Req
from llmir_lang.executor.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from llmir_lang.executor.engine import Engine

log = logging.getLogger("llmir_lang.engine")

_NOTHING = object()  # the engine thread's idle wait received nothing
_IDLE_WAIT_S = 0.1  # how long an idle engine thread waits for the inbox before it looks again
# what to do next, said for both audiences: DSL users never made an Engine themselves
NEW_ENGINE = "create a new Engine (in the DSL, a new llmir.Runtime())"
CLOSED_MESSAGE = f"the engine was shut down; {NEW_ENGINE}"
STOPPED_MESSAGE = f"the engine thread has stopped; {NEW_ENGINE}"


def engine_thread_error(what: str) -> EngineError:
    """The error for a blocking wait on the engine thread (in a stream callback): the thread would
    wait for results that only it produces, and every request would hang with it."""
    return EngineError(
        f"{what} was called from the engine's own thread (a stream callback), where it would wait "
        "forever for results that only this thread produces; submit() without waiting, or wait "
        "outside the callback"
    )


def run_engine_thread(ref: weakref.ref[Engine], inbox: queue.Queue) -> None:
    """The engine thread's body: loop turns while the engine lives and is not shut down.

    It holds the engine only during a turn and waits for work on ``inbox`` without it. A thread
    whose target was the bound ``engine._loop`` kept every engine dropped without ``shutdown()``
    alive, model and KV pool included (4 dropped engines: 4 more threads, RSS +1 GB). Once the
    engine is collected, its ``__del__`` queues the stop, and the next look at ``ref`` ends the
    thread."""
    item: Any = _NOTHING
    while True:
        engine = ref()
        if engine is None:
            if item is not _NOTHING:
                inbox.put(item)  # a request taken in the idle wait: Engine.__del__ fails it from there
            return
        try:
            if not engine._loop_once(item):
                return
            idle = engine._ready_to_idle()
        except Exception as e:  # a bug must fail the requests in flight, not kill the engine
            engine._recover(e)
            idle = False
        item = _NOTHING
        del engine
        if idle:
            try:
                item = inbox.get(timeout=_IDLE_WAIT_S)
            except queue.Empty:
                pass


class EngineLoop:
    run_ahead = False  # the engine sets it (run_ahead.run_ahead_default)
    num_run_ahead_steps = 0  # decode steps launched before the host read the previous step's tokens
    num_step_retries = 0  # steps whose forward failed and ran again one request at a time
    _ahead: run_ahead.Ahead | None = None  # a decode step in flight whose tokens are not processed
    _batch: ScheduledBatch | None = None  # the step being run and processed (None between steps)

    # ---- the loop (engine thread) -------------------------------------------------------
    def _loop_once(self, item: Any = _NOTHING) -> bool:
        """One turn: admit everything in the inbox (``item`` first: what the idle wait received),
        then run one step if there is work. False once the engine is told to stop."""
        sched = self.scheduler
        try:
            if item is _NOTHING:
                item = self._inbox.get_nowait()
            while True:
                if item is None:
                    self._abort_all()
                    return False
                if isinstance(item, Req):
                    if not item.finished:  # else aborted while still in the inbox (Engine._abort_now)
                        sched.add(item)
                else:
                    item()
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        if sched.has_work() or self._ahead is not None:
            self._step()
        return True

    def _ready_to_idle(self) -> bool:
        """Whether the engine thread may wait for new work: no step to run. The last results go
        out first (no step follows to hide that text work behind)."""
        if self.scheduler.has_work() or self._ahead is not None:
            return False
        self.outputs.flush_deferred()
        return True

    def _recover(self, exc: Exception) -> None:
        """After an unexpected internal error: fail every request in flight and reset the queues and
        the cache, so the engine keeps serving new requests."""
        err = EngineError(
            f"internal engine error; the requests in flight were failed ({type(exc).__name__}: {exc})"
        )
        log.error("internal engine error; failing the requests in flight", exc_info=exc)
        self._flush_text(err)
        sched = self.scheduler
        in_flight = sched.all_requests()
        # the current batch's requests may sit in no queue (between admission and after_step)
        for batch in (self._batch, self._ahead and self._ahead.batch):
            if batch is not None:
                in_flight += [r for r in batch.reqs if r not in in_flight]
        self._batch = self._ahead = None
        for req in in_flight:
            if not req.finished:
                self.outputs.fail(req, err)
        for req in in_flight:
            try:
                sched.release(req, cache_kv=False)
            except Exception:
                pass
        sched.waiting.clear()
        sched.running.clear()
        sched.extending.clear()
        sched.chunked = sched.chunked_next = None
        try:
            self.cache.reset()
        except Exception:
            pass

    def _flush_text(self, err: Exception) -> None:
        """Flush deferred text work where a failure must not escape (recovery, shutdown): if the
        flush itself fails, the requests still queued fail with ``err`` instead of hanging."""
        try:
            self.outputs.flush_deferred()
        except Exception as e:
            log.error("deferred text work failed; failing the requests it held", exc_info=e)
            self.outputs.drop_deferred(err)

    def _wait(self, fut: Future) -> Any:
        """fut.result(), but never forever: a dead engine thread raises instead of hanging, and so
        does a wait on the engine thread itself (from a stream callback), the thread that would
        resolve ``fut``."""
        from concurrent.futures import TimeoutError as FutureTimeout

        if not fut.done():
            self._refuse_wait_on_engine_thread("a blocking wait on the engine")
        while True:
            try:
                return fut.result(timeout=1.0)
            except FutureTimeout:
                if not self._thread.is_alive():
                    raise EngineError(STOPPED_MESSAGE) from None

    def _step(self) -> None:
        if self._ahead is not None:
            self._step_ahead()
            return
        sched = self.scheduler
        batch = sched.schedule()
        if batch is None:
            self.outputs.flush_deferred()  # nothing to overlap with
            if sched.waiting and not (sched.running or sched.extending or sched.chunked):
                # nothing runs, so the whole pool is free or evictable: a request that still cannot
                # be admitted (a chain whose text outgrew the pool) never will be
                req = sched.waiting[0]
                if req.seq_len + self.pool.page_size > self.pool.capacity:
                    self.outputs.fail(
                        req,
                        OutOfKVMemoryError(
                            f"the request grew to {req.seq_len} tokens but the KV pool holds "
                            f"{self.pool.capacity}; raise kv_memory"
                        ),
                    )
                    sched.finish(req, cache_kv=False)
                    return
            time.sleep(0.001)
            return
        self._batch = batch
        try:
            ahead = self._may_run_ahead(batch)
            masks = None if ahead else self.outputs.start_masks(batch)  # computed while the model runs
            try:
                step = self.runner.run(batch)
            except Exception as e:
                if len(batch.reqs) < 2:
                    raise
                self._one_at_a_time(batch, e)
                self._after(batch)
                return
            if ahead:  # launched now, its tokens processed next turn
                self._ahead = run_ahead.launch(self.outputs, batch, step)
                self._batch = None
                self.outputs.flush_deferred()
                return
            # the previous step's text work, while the GPU computes this step (on CUDA the forward
            # is only launched; process() below is what waits for it)
            self.outputs.flush_deferred()
            self.outputs.process(batch, step, masks)
        except Exception as e:  # one failing batch must not stop the engine
            self._fail_batch(batch, e)
            return
        self._after(batch)

    def _one_at_a_time(self, batch: ScheduledBatch, exc: Exception) -> None:
        """The forward of a step of several requests raised (a CUDA out-of-memory on a long prompt,
        say): run the step again one request at a time, so that only a request that fails alone
        fails and its batch mates go on. Nothing of the failed forward was used: no token was
        sampled. The step's new slots go back first and each request gets its own again right
        before its rerun, so a request that finishes in between (a stream callback aborting it)
        leaves no uncomputed KV to the radix cache."""
        log.warning(
            "engine step of %d requests failed (%s: %s); running them one at a time",
            len(batch.reqs),
            type(exc).__name__,
            exc,
        )
        self.num_step_retries += 1
        sched = self.scheduler
        sched.undo_step_alloc(batch)
        for i, req in enumerate(batch.reqs):
            if req.finished:
                continue
            one = batch.only(i)
            try:
                if not sched.redo_step_alloc(batch, i):
                    raise OutOfKVMemoryError("no KV room to run this request's step again alone")
                masks = self.outputs.start_masks(one)
                step = self.runner.run(one)
                self.outputs.flush_deferred()
                self.outputs.process(one, step, masks)
            except Exception as e:
                log.warning("request %d failed alone too; failing it", req.rid, exc_info=e)
                if not req.finished:
                    self.outputs.fail(req, EngineError(f"engine step failed: {type(e).__name__}: {e}"))

    def _after(self, batch: ScheduledBatch) -> None:
        sched = self.scheduler
        sched.after_step(batch)
        for req in batch.reqs:
            if req.finished:  # a request that failed alone (fail_one) leaves no KV in the cache
                sched.finish(req, cache_kv=req.finish_reason is not FinishReason.ERROR)
        self._batch = None

    def _fail_batch(self, batch: ScheduledBatch, e: Exception) -> None:
        log.warning("engine step failed; failing its %d requests", len(batch.reqs), exc_info=e)
        err = EngineError(f"engine step failed: {type(e).__name__}: {e}")
        for req in batch.reqs:
            if not req.finished:
                self.outputs.fail(req, err)
        for req in batch.reqs:
            self.scheduler.finish(req, cache_kv=False)
        self._batch = self._ahead = None

    # ---- run-ahead decode (run_ahead.py) -----------------------------------------------
    def _may_run_ahead(self, batch: ScheduledBatch) -> bool:
        out = self.outputs
        return (
            self.run_ahead
            and batch.mode is ForwardMode.DECODE
            and not out.spec.enabled
            and all(run_ahead.eligible(out, r, 0) for r in batch.reqs)
        )

    def _step_ahead(self) -> None:
        """Queue the decode step after the one in flight (when it may run ahead), then read and
        process the tokens of the one in flight while the GPU computes the next."""
        prev = self._ahead
        assert prev is not None
        self._ahead = None
        self._batch = prev.batch
        try:
            self._ahead = self._launch_next(prev)
            self.outputs.flush_deferred()
            run_ahead.complete(self.outputs, prev)
        except Exception as e:  # the next step holds only requests of this one: both fail
            self._fail_batch(prev.batch, e)
            return
        self._after(prev.batch)

    def _launch_next(self, prev: run_ahead.Ahead) -> run_ahead.Ahead | None:
        sched = self.scheduler
        if sched.waiting or sched.extending or sched.chunked is not None or not self.run_ahead:
            return None  # admissions and extends go first: process this step, then schedule
        reqs = prev.batch.reqs
        live = [r for r in reqs if not r.finished]
        running = sched.running
        if len(live) != len(running) or any(a is not b for a, b in zip(live, running)):
            return None  # the ordinary schedule decides who decodes next
        ctx = self.config.context_len
        keep = [i for i, r in enumerate(reqs) if run_ahead.goes_on(r, ctx)]
        nxt = [reqs[i] for i in keep]
        if not nxt or self.outputs.spec.enabled:
            return None
        if not all(run_ahead.eligible(self.outputs, r, 1) for r in nxt):
            return None
        sb = sched.schedule_ahead(nxt)
        if sb is None:
            return None
        ids = prev.tokens
        if len(keep) != len(reqs):
            ids = ids.index_select(0, torch.tensor(keep).to(ids.device, non_blocking=True))
        # a row with no allowed token samples -1 (its request ends when the host reads it); the
        # row still computes, so keep its id inside the embedding table
        try:
            step = self.runner.run(sb, ahead_ids=ids.clamp(min=0))
        except Exception as e:
            # the step in flight is fine: finish it, and let the ordinary schedule run the next
            # step (where a failing forward is rerun one request at a time)
            log.warning(
                "a decode step launched ahead failed (%s: %s); running it again plainly", type(e).__name__, e
            )
            sched.undo_step_alloc(sb)
            return None
        self.num_run_ahead_steps += 1
        return run_ahead.launch(self.outputs, sb, step)

    def _refuse_wait_on_engine_thread(self, what: str) -> None:
        if threading.current_thread() is self._thread:
            raise engine_thread_error(what)

    def _abort_all(self) -> None:
        """Fail every request not finished yet with EngineClosedError: those the scheduler holds and
        those still in the inbox (an engine collected before its loop admitted them). Runs on the
        engine thread when it reads the stop, or in ``Engine.__del__`` once the thread is gone."""
        from llmir_lang.executor.engine_futures import EngineCall  # (it imports this module)

        msg = "the engine was shut down before this request finished"
        self._flush_text(EngineClosedError(msg))  # requests already finished resolve with their results
        reqs = self.scheduler.all_requests()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Req):
                reqs.append(item)
            elif isinstance(item, EngineCall):  # stats(), abort(), flush_cache() waiting on it
                item.fail(EngineClosedError(CLOSED_MESSAGE))
        for req in reqs:
            if not req.future.done():
                self.outputs.fail(req, EngineClosedError(msg))
            else:  # cancelled by its caller, its abort never run: it ends here all the same
                self.outputs.counts.end(req, FinishReason.ABORT)
        self.outputs.close()
