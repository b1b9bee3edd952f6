"""The engine's background loop: admit, schedule, run, process outputs, recover from bugs.

``Engine`` inherits this; the loop runs on the engine thread only and owns the scheduler, the KV
pool and the radix cache (other threads reach them through ``call_in_engine_thread``).

Deferred text work (``OutputProcessor.defer_text``) of step N runs between step N+1's launch and its
sampling; whenever no next step follows (idle, a failed step, recovery, shutdown) it is flushed at
once, so every finished request's future resolves.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import Future
from typing import Any

from llmir_lang.errors import EngineClosedError, EngineError, OutOfKVMemoryError
from llmir_lang.executor.request import Req

log = logging.getLogger("llmir_lang.engine")


class EngineLoop:
    # ---- the loop (engine thread) -------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                if not self._loop_once():
                    return
            except Exception as e:  # a bug must fail the requests in flight, not kill the engine
                self._recover(e)

    def _loop_once(self) -> bool:
        sched = self.scheduler
        block = not sched.has_work()
        if block:  # no step will follow to hide it behind: the last results go out now
            self.outputs.flush_deferred()
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                if item is None:
                    self._abort_all()
                    return False
                if isinstance(item, Req):
                    sched.add(item)
                else:
                    item()
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        if sched.has_work():
            self._step()
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
        batch = getattr(self, "_batch", None)
        if batch is not None:
            in_flight += [r for r in batch.reqs if r not in in_flight]
        self._batch = None
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
        """fut.result(), but never forever: a dead engine thread raises instead of hanging."""
        from concurrent.futures import TimeoutError as FutureTimeout

        while True:
            try:
                return fut.result(timeout=1.0)
            except FutureTimeout:
                if not self._thread.is_alive():
                    raise EngineError("the engine thread has stopped; create a new Engine") from None

    def _step(self) -> None:
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
            masks = self.outputs.start_masks(batch)  # computed while the model runs
            step = self.runner.run(batch)
            # the previous step's text work, while the GPU computes this step (on CUDA the forward
            # is only launched; process() below is what waits for it)
            self.outputs.flush_deferred()
            self.outputs.process(batch, step, masks)
        except Exception as e:  # one failing batch must not stop the engine
            log.warning("engine step failed; failing its %d requests", len(batch.reqs), exc_info=e)
            err = EngineError(f"engine step failed: {type(e).__name__}: {e}")
            for req in batch.reqs:
                if not req.finished:
                    self.outputs.fail(req, err)
            for req in batch.reqs:
                sched.finish(req, cache_kv=False)
            self._batch = None
            return
        sched.after_step(batch)
        for req in batch.reqs:
            if req.finished:
                sched.finish(req)
        self._batch = None

    def _abort_all(self) -> None:
        msg = "the engine was shut down before this request finished"
        self._flush_text(EngineClosedError(msg))  # requests already finished resolve with their results
        for req in self.scheduler.all_requests():
            self.outputs.fail(req, EngineClosedError(msg))
