"""Leaks an engine that serves for days would show: what stays alive after requests end.

Each test runs a few hundred requests on the bundled model and checks that what they leave behind
does not grow with their number (counts scaled down from probes of 10,000+ mixed requests)."""

from __future__ import annotations

import gc
import time
import weakref
from concurrent.futures import as_completed, wait

import pytest

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints import spec_from_json_schema, spec_from_regex
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.request import Req

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def eng():
    e = Engine(device="cpu", kv_memory=4096 * 8192, speculative_draft_tokens=0)
    yield e
    e.shutdown()


def _live_reqs() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Req)


def _settle(eng: Engine) -> None:
    """Wait until the engine thread has nothing queued or running."""
    sched = eng.scheduler
    for _ in range(200):
        if eng.call_in_engine_thread(lambda: not sched.has_work()) and eng._inbox.empty():
            return
        time.sleep(0.01)


def test_finished_requests_are_not_kept_alive(eng: Engine) -> None:
    """The decode slot table kept a record, with the request in it, for every row it ever handed
    out: after a batch of N requests, N finished requests stayed alive (their results, prompt ids,
    constraint matchers and stream callbacks) until rows ran short."""
    before = _live_reqs()
    futs = [eng.submit(f"Q: What is {i}?\nA: ", {"max_new_tokens": 3}) for i in range(120)]
    futs += [
        eng.submit(f"Q: {i}\nA: ", {"max_new_tokens": 6, "constraint": spec_from_json_schema(SCHEMA)})
        for i in range(20)
    ]
    for f in futs:
        f.result(timeout=60)
    del futs, f
    _settle(eng)
    assert _live_reqs() - before == 0


def test_a_bad_constraint_sent_again_and_again_keeps_no_caller_alive(eng: Engine) -> None:
    """The compiler caches a constraint's error and raised the same object each time: every raise
    chained its frames to the object's traceback, which kept each caller's frame (its locals: a
    request body, a connection) alive, and the chain grew by ~5 entries per call."""

    class Handler:  # stands in for what a request handler holds
        pass

    refs = []

    def handle() -> ConstraintError:
        local = Handler()
        refs.append(weakref.ref(local))
        try:
            eng.submit("Q: ", {"max_new_tokens": 2, "constraint": spec_from_regex("(")})
        except ConstraintError as e:
            return e
        raise AssertionError("a bad regex was accepted")

    errors = [handle() for _ in range(60)]
    depth = 0
    tb = errors[-1].__traceback__
    while tb is not None:
        depth, tb = depth + 1, tb.tb_next
    assert depth < 20, f"the error's traceback has {depth} entries after 60 calls"
    assert "(" in str(errors[-1]) and type(errors[-1]) is type(errors[0])
    del errors
    gc.collect()
    assert sum(r() is not None for r in refs) == 0, "callers' frames are kept alive by the cached error"


def test_cancelled_futures_count_as_done_for_wait_and_as_completed(eng: Engine) -> None:
    """``future.cancel()`` left the future CANCELLED, never CANCELLED_AND_NOTIFIED: the stdlib's
    ``wait`` and ``as_completed`` (what a batch job waits with) never saw it finish and hung."""
    futs = [eng.submit(f"Q: {i}?\nA: ", {"max_new_tokens": 16}) for i in range(6)]
    for f in futs[::2]:
        assert f.cancel()
    assert futs[0].cancel()  # a second cancel is harmless
    done, not_done = wait(futs, timeout=30)
    assert not not_done and len(done) == 6
    assert len(list(as_completed(futs, timeout=30))) == 6
    assert all(f.cancelled() for f in futs[::2])
    _settle(eng)
    assert eng.stats()["cache"]["protected_tokens"] == 0


def test_cancelled_score_async_and_backend_futures_count_as_done(eng: Engine) -> None:
    """The futures ``score_async`` and ``EngineBackend.submit`` return were plain Futures, whose
    ``cancel()`` ``wait`` never sees either; the backend's also left its request running."""
    from llmir_lang.executor.backend import ChainRequest, EngineBackend, GenStep
    from llmir_lang.executor.sampling_params import SamplingParams

    scored = eng.score_async("Q: Is the sky blue?\nA: ", ["True", "False thing"])
    chain = EngineBackend(eng).submit(
        ChainRequest("Q: 1?\nA: ", [GenStep("x", SamplingParams(max_new_tokens=64, ignore_eos=True), None)])
    )
    assert scored.cancel() and chain.cancel()
    done, not_done = wait([scored, chain], timeout=10)
    assert not not_done
    _settle(eng)
    s = eng.stats()
    assert s["cache"]["protected_tokens"] == 0
    assert s["pool"]["used"] == s["cache"]["cached_tokens"]
