"""``Engine.stats()["requests"]``: every submitted request is counted once as finished (by finish
reason) or failed, or is in flight, under a mixed workload with aborts, cancels and failures; and
what the engine thread still holds when it stops fails at once with EngineClosedError."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import CancelledError, ThreadPoolExecutor

import pytest
from matcher_stubs import BrokenMatcher

from llmir_lang import errors
from llmir_lang.executor.constraints import spec_from_regex
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.request import FinishReason

LONG = {"max_new_tokens": 200, "ignore_eos": True}


@pytest.fixture(scope="module", params=[False, True], ids=["text_now", "text_deferred"])
def eng(request):
    """Also with text work deferred behind the next step (CUDA's default): a finished request's
    result, and so its count, comes a flush later."""
    e = Engine(device="cpu", kv_memory=4096 * 8192, speculative_draft_tokens=0)
    e.outputs.defer_text = request.param
    yield e
    e.shutdown()


def _counts(eng: Engine) -> dict:
    return eng.stats()["requests"]


def _consistent(c: dict) -> bool:
    return c["submitted"] == sum(c["finished"].values()) + c["failed"] + c["in_flight"]


def _delta(after: dict, before: dict) -> Counter:
    d = Counter({k: v - before["finished"][k] for k, v in after["finished"].items()})
    d["failed"] = after["failed"] - before["failed"]
    d["submitted"] = after["submitted"] - before["submitted"]
    return +d


def _settled(eng: Engine) -> dict:
    for _ in range(300):
        c = _counts(eng)
        if c["in_flight"] == 0:
            return c
        time.sleep(0.01)
    raise AssertionError(f"requests still in flight: {c}")


def test_each_kind_of_request_is_counted_once_with_its_ending(eng: Engine) -> None:
    before = _counts(eng)
    assert _consistent(before) and before["in_flight"] == 0
    first = eng.generate("Q: 1?\nA: ", {"max_new_tokens": 1}).token_ids[0]
    eng.generate("Q: 1?\nA: ", {"max_new_tokens": 4, "stop_token_ids": [first]})  # stop
    eng.generate("Q: 2?\nA: ", {"max_new_tokens": 3, "ignore_eos": True})  # length
    sp = {"max_new_tokens": 2, "ignore_eos": True}
    chain = eng.submit_chain("Q: 3?\nA: ", [("gen", sp, None), ("text", "\nQ: 4?\nA: "), ("gen", sp, None)])
    assert chain.result(timeout=60).finish_reason == "length"  # one request for both generations
    eng.score("Q: Is it?\nA: ", ["True", "False"])  # one-token continuations: one request
    eng.score("Q: Is it?\nA: ", ["no way", "yes it is", "x"])  # the head and one more request

    # aborted by abort() and by cancel(), both before their first step (on the engine thread)
    def abort_two() -> list:
        a, b = eng.submit("Q: 5?\nA: ", LONG), eng.submit("Q: 6?\nA: ", LONG)
        eng.abort(a.rid)
        b.cancel()
        return [a, b]

    a, b = eng.call_in_engine_thread(abort_two)
    assert a.result(timeout=60).finish_reason == "abort" and b.cancelled()
    with pytest.raises(errors.EngineError, match="matcher bug"):  # failed
        eng.submit(
            "Q: 7?\nA: ", {"max_new_tokens": 4}, matcher=BrokenMatcher(eng.config.vocab_size, "fill")
        ).result(timeout=60)
    with pytest.raises(errors.PromptTooLongError):  # refused at submission: not counted
        eng.submit([5] * eng.config.context_len, {"max_new_tokens": 1})
    after = _settled(eng)
    assert _consistent(after)
    assert _delta(after, before) == Counter(submitted=10, stop=1, length=6, abort=2, failed=1)


def test_stream_closed_early_and_constraint_dead_end(eng: Engine) -> None:
    before = _counts(eng)
    it = eng.generate("Q: 9?\nA: ", LONG, stream=True)
    next(it)
    it.close()  # aborts its request
    r = eng.generate("Q: 10?\nA: ", {"max_new_tokens": 8, "constraint": spec_from_regex("[0-9]")})
    after = _settled(eng)
    assert _delta(after, before) == Counter(submitted=2, abort=1, **{r.finish_reason: 1})


def test_counters_match_what_callers_saw_under_a_mixed_concurrent_workload(eng: Engine) -> None:
    """Four threads submit plain, streamed, chained, constrained, scoring and failing requests and
    abort or cancel some; every read of the counters on the way is consistent, and once idle the
    counters equal the outcomes the callers saw."""
    before = _counts(eng)
    seen: Counter = Counter()
    lock = threading.Lock()
    reads: list[dict] = []

    def outcome(fut) -> str:
        try:
            res = fut.result(timeout=120)
        except CancelledError:
            return "abort"
        except errors.LLMIRError:
            return "failed"
        return "failed" if res.finish_reason == "error" else res.finish_reason

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        for i in range(25):
            p = f"Q{seed}-{i}: {rnd.randint(0, 999)}\nA: "
            kind = rnd.choice(["plain", "long", "chain", "regex", "bad", "score", "stream"])
            if kind == "score":  # one-token continuations: one request each call
                eng.score(p, ["True", "False"])
                got = ["length"]
            elif kind == "stream":
                it = eng.generate(p, {"max_new_tokens": 6}, stream=True)
                chunks = list(it) if rnd.random() < 0.5 else [next(it)]
                if chunks[-1].finished:
                    got = [chunks[-1].finish_reason]
                else:
                    it.close()
                    got = None  # aborted, unless it finished first: read from the counters below
            else:
                if kind == "chain":
                    sp = {"max_new_tokens": 3}
                    fut = eng.submit_chain(p, [("gen", sp, None), ("text", "\nB: "), ("gen", sp, None)])
                elif kind == "regex":
                    fut = eng.submit(p, {"max_new_tokens": 6, "constraint": spec_from_regex("[0-9]{1,3}")})
                elif kind == "bad":
                    fut = eng.submit(
                        p, {"max_new_tokens": 4}, matcher=BrokenMatcher(eng.config.vocab_size, "fill")
                    )
                else:
                    fut = eng.submit(p, LONG if kind == "long" else {"max_new_tokens": rnd.randint(1, 6)})
                if kind == "long":
                    if rnd.random() < 0.5:
                        fut.cancel()
                    else:
                        eng.abort(fut.rid)
                got = [outcome(fut)]
            c = _counts(eng)
            with lock:
                reads.append(c)
                seen["submitted"] += 1
                if got is None:
                    seen["closed_streams"] += 1
                else:
                    seen.update(got)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
    after = _settled(eng)
    assert all(_consistent(c) for c in reads)
    delta = _delta(after, before)
    closed = seen.pop("closed_streams", 0)
    # a stream closed early ended as "abort", or as "stop" / "length" where it had just finished
    ended = {k: delta[k] - seen[k] for k in ("abort", "stop", "length")}
    assert all(v >= 0 for v in ended.values()) and sum(ended.values()) == closed, (delta, seen)
    for k in ("submitted", "failed", "constraint_error"):
        assert delta[k] == seen[k], (k, delta, seen)
    assert delta["submitted"] == sum(v for k, v in delta.items() if k != "submitted")


def test_shutdown_counts_what_it_fails_and_what_was_cancelled() -> None:
    e = Engine(device="cpu", kv_memory=4096 * 512, speculative_draft_tokens=0)
    hold = threading.Event()

    def blocked() -> None:
        hold.wait(10)

    running = e.submit("Q: 1?\nA: ", LONG)
    threading.Thread(target=e.call_in_engine_thread, args=(blocked,), daemon=True).start()
    time.sleep(0.05)
    queued = e.submit("Q: 2?\nA: ", LONG)
    cancelled = e.submit("Q: 3?\nA: ", LONG)
    with e._lock:  # shut down before the cancel's abort reaches the engine thread
        e._closed = True
        e._inbox.put(None)
    assert cancelled.cancel()
    hold.set()
    e.shutdown()
    for fut in (running, queued):
        with pytest.raises(errors.EngineClosedError):
            fut.result(timeout=10)
    c = e.stats()["requests"]
    assert c["submitted"] == 3 and c["in_flight"] == 0 and _consistent(c)
    assert c["failed"] == 2 and c["finished"][FinishReason.ABORT.value] == 1


def test_a_call_still_queued_when_the_loop_stops_fails_at_once() -> None:
    """``stats()`` / ``abort()`` / ``flush_cache()`` queued behind the stop were dropped: their
    caller waited for the dead-thread check and got a plain EngineError about a second later."""
    e = Engine(device="cpu", kv_memory=4096 * 512)
    hold = threading.Event()
    threading.Thread(target=e.call_in_engine_thread, args=(lambda: hold.wait(10),), daemon=True).start()
    time.sleep(0.05)
    got: dict = {}

    def read() -> None:
        t0 = time.monotonic()
        try:
            e.stats()
        except Exception as err:
            got["err"] = err
        got["s"] = time.monotonic() - t0

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(200):  # the stats call is queued
        if e._inbox.qsize():
            break
        time.sleep(0.005)
    with e._lock, e._inbox.mutex:  # the stop read first, as a shutdown that won the race
        e._closed = True
        e._inbox.queue.appendleft(None)
    hold.set()
    reader.join(10)
    e.shutdown()
    assert isinstance(got.get("err"), errors.EngineClosedError), got
    assert got["s"] < 0.5
    assert "llmir.Runtime()" in str(got["err"])
    with pytest.raises(errors.EngineClosedError, match=r"a new llmir\.Runtime\(\)"):
        e.submit("Q: ", {"max_new_tokens": 1})
    with pytest.raises(errors.EngineClosedError, match=r"a new llmir\.Runtime\(\)"):
        e.flush_cache()
    assert e.abort(0) is False
