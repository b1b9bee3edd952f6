"""A request's future cancelled by another thread while the engine resolves it.

``Future.cancel()`` on a request's future succeeds (the future is never marked running), and any
thread may call it: ``asyncio.wrap_future``'s waiter does when its task is cancelled, as the
server's did before ``server/service._loop_waiter``. If it lands between the engine's
``if not req.future.done()`` and ``req.future.set_result(...)``, ``set_result`` raises
``InvalidStateError`` on the engine thread. On the CPU that request then "failed alone"; with
deferred text work (``OutputProcessor.defer_text``, the CUDA default) the error escaped the
step and every other request of the step failed with ``EngineError: engine step failed``
(fixed: ``engine._RequestFuture`` ignores it for a cancelled future).

The test makes the race deterministic: the target future's ``done()`` cancels it right after
answering False on the engine thread, as a cancel from another thread landing at that moment.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from llmir_lang.executor.engine import Engine


def _cancel_when_resolved(fut: Future, engine_thread: threading.Thread) -> None:
    plain_done = fut.done
    armed = [True]

    def done() -> bool:
        answer = plain_done()
        if not answer and armed[0] and threading.current_thread() is engine_thread:
            armed[0] = False
            Future.cancel(fut)  # another thread's cancel, landing right after the check
        return answer

    fut.done = done  # type: ignore[method-assign]


@pytest.mark.parametrize("defer_text", [False, True])
def test_a_future_cancelled_while_resolved_fails_no_other_request(checkpoints, defer_text):
    folder, _ = checkpoints("llama")
    with Engine(str(folder), device="cpu", kv_memory=4000 * 512, speculative_draft_tokens=0) as eng:
        eng.outputs.defer_text = defer_text
        long = {"max_new_tokens": 24, "ignore_eos": True}
        alone = [eng.generate([5 + i, 9, 11, 13], long).token_ids for i in range(3)]
        others = [eng.submit([5 + i, 9, 11, 13], long) for i in range(3)]
        target = eng.submit([7, 8, 9], {"max_new_tokens": 4, "ignore_eos": True})
        _cancel_when_resolved(target, eng._thread)
        got = [f.result(timeout=60).token_ids for f in others]
        assert got == alone
        assert target.cancelled()
        stats = eng.stats()
        assert stats["cache"]["protected_tokens"] == 0
        assert stats["pool"]["used"] == stats["cache"]["cached_tokens"]


def test_cancelling_a_request_future_aborts_the_request(checkpoints):
    folder, _ = checkpoints("llama")
    with Engine(str(folder), device="cpu", kv_memory=4000 * 512, speculative_draft_tokens=0) as eng:
        fut = eng.submit([5, 9, 11, 13], {"max_new_tokens": 3000, "ignore_eos": True})
        first = threading.Event()
        n = [0]

        def on_chunk(_chunk) -> None:
            n[0] += 1
            first.set()

        probe = eng.submit([5, 9, 11, 13], {"max_new_tokens": 3000, "ignore_eos": True}, stream=on_chunk)
        assert first.wait(60)
        assert fut.cancel() and probe.cancel()
        deadline = time.monotonic() + 30
        while eng.call_in_engine_thread(eng.scheduler.has_work) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not eng.call_in_engine_thread(eng.scheduler.has_work)
        stats = eng.stats()
        assert stats["cache"]["protected_tokens"] == 0
        # both stopped long before their end (max_new_tokens or the context: a step per token)
        full = min(3000, eng.config.context_len - 4)
        assert stats["forward_calls"] < full // 2, (stats["forward_calls"], full)
