"""Deferred text work (``OutputProcessor.defer_text``): the same results and stream chunks as the
immediate path, every future resolves (lone requests, aborts, failures, shutdown).

The deferred path is the CUDA default; here it is forced on the CPU, where the forward is
synchronous, so what is tested is the bookkeeping: order, flush points, semantics.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from llmir_lang import errors
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.engine_text import DEFER_ENV, DeferredText, defer_text_default
from llmir_lang.executor.request import FinishReason, GenerateResult, StreamChunk
from llmir_lang.executor.sampling_params import SamplingParams

torch.set_num_threads(1)

IDS = [5, 17, 42, 99, 3, 7, 250, 11]
RESULT_FIELDS = ("text", "token_ids", "finish_reason", "matched_stop", "logprobs", "top_logprobs", "error")


@pytest.fixture(scope="module")
def folder(checkpoints):
    return checkpoints("llama")[0]


@pytest.fixture(scope="module")
def eng(folder):
    e = Engine(str(folder), device="cpu", kv_memory="8MB")
    yield e
    e.shutdown()


class CountingQueue(DeferredText):
    """Counts the deferred items, so a test can tell the deferred path really ran."""

    def __init__(self, out: Any):
        super().__init__(out)
        self.pushed = 0

    def push(self, req: Any, reason: FinishReason | None, decode: bool) -> None:
        self.pushed += 1
        super().push(req, reason, decode)


def set_mode(eng: Engine, defer: bool) -> CountingQueue:
    def swap() -> CountingQueue:
        eng.outputs.flush_deferred()
        q = CountingQueue(eng.outputs)
        eng.outputs._deferred, eng.outputs.defer_text = q, defer
        return q

    return eng.call_in_engine_thread(swap)


Job = Callable[[Engine, Callable[[StreamChunk], None]], Future]


def run_batch(eng: Engine, jobs: list[Job]) -> tuple[list[GenerateResult], list[list[StreamChunk]]]:
    """Submit every job while the engine thread is held, so they are admitted in the same step
    (the same batches in every run, whatever the timing)."""
    gate = threading.Event()
    eng._inbox.put(gate.wait)  # runs on the engine thread; the submissions queue up behind it
    chunks: list[list[StreamChunk]] = [[] for _ in jobs]
    try:
        futs = [job(eng, log.append) for job, log in zip(jobs, chunks)]
    finally:
        gate.set()
    return [f.result(timeout=60) for f in futs], chunks


def fields(r: GenerateResult) -> tuple:
    out = tuple(getattr(r, f) for f in RESULT_FIELDS)
    steps = r.meta.get("steps")
    if steps is not None:
        out += (r.meta["chain_text"], [fields(s) for s in steps])
    return out


def chunk_fields(chunks: list[StreamChunk]) -> list[tuple]:
    return [(c.text, c.token_ids, c.finished, c.finish_reason, c.index) for c in chunks]


def meta(r: GenerateResult) -> dict:
    return {k: v for k, v in r.meta.items() if k != "steps"}  # steps: compared by fields()


def regex_matcher(eng: Engine, pattern: str) -> Any:
    from llmir_lang.executor.constraints import ConstraintCompiler, TokenizerInfo, spec_from_regex

    comp = getattr(eng, "_test_compiler", None)
    if comp is None:
        info = TokenizerInfo.from_hf(eng.tokenizer.hf, vocab_size=eng.config.vocab_size, eos_token_ids=[0])
        comp = eng._test_compiler = ConstraintCompiler(info, outlines_isolation="inline")  # type: ignore[attr-defined]
    return comp.compile(spec_from_regex(pattern)).new_matcher()


def plain(ids: list[int], stream: bool = False, **params: Any) -> Job:
    return lambda e, cb: e.submit(ids, SamplingParams(**params), stream=cb if stream else None)


def mixed_jobs(eng: Engine) -> list[Job]:
    """A batch of every kind of request; stop strings and stop tokens picked from a greedy run so
    they hit mid-output."""
    ref = eng.generate(IDS, {"max_new_tokens": 24, "ignore_eos": True})
    stop_str = ref.text[6:8]
    stop_tok = ref.token_ids[9]
    assert ref.text.find(stop_str) > 0
    chain = [
        ("gen", SamplingParams(max_new_tokens=6, ignore_eos=True), None),
        ("text", " name: Ada, age: "),
        ("gen", SamplingParams(max_new_tokens=5, ignore_eos=True, return_logprob=True), None),
        ("text", ", city"),
    ]
    jobs: list[Job] = [
        plain(IDS, stream=True, max_new_tokens=24, ignore_eos=True),
        plain(IDS[:5], max_new_tokens=7),
        plain(IDS, stream=True, max_new_tokens=24, ignore_eos=True, stop=[stop_str]),
        plain(IDS, max_new_tokens=24, ignore_eos=True, stop_token_ids=[stop_tok]),
        plain(IDS, max_new_tokens=24, stop_token_ids=[stop_tok], min_new_tokens=12, ignore_eos=True),
        plain(IDS[2:], max_new_tokens=12, return_logprob=True, top_logprobs_num=3),
        lambda e, cb: e.submit_chain("the quick brown fox", [tuple(s) for s in chain], stream=cb),
        lambda e, cb: e.submit(
            "name: ", {"max_new_tokens": 8}, stream=cb, matcher=regex_matcher(e, r"ab[0-9]+cd")
        ),
        lambda e, cb: e.submit(IDS[:3], {"max_new_tokens": 6}, matcher=regex_matcher(e, r"(yes|no|maybe)")),
        lambda e, cb: e.submit(IDS[:3], {"max_new_tokens": 0}),  # prefill only
    ]
    # seeded sampling, hot enough that some end on EOS (checked below)
    jobs += [
        plain([5, 17, 42, i], stream=i % 2 == 0, max_new_tokens=48, temperature=3.0, seed=i)
        for i in range(16)
    ]
    return jobs


@pytest.mark.parametrize("jump_forward", [True, False], ids=["jump_forward", "no_jump_forward"])
def test_mixed_batch_same_results_and_chunks(eng, jump_forward):
    eng.jump_forward = jump_forward
    try:
        jobs = mixed_jobs(eng)
        runs = {}
        for defer in (False, True, False, True):
            eng.flush_cache()  # the same cached prefixes (cached_tokens) in every run
            q = set_mode(eng, defer)
            runs.setdefault(defer, []).append(run_batch(eng, jobs))
            assert (q.pushed > 0) == defer
    finally:
        set_mode(eng, False)
        eng.jump_forward = True
    (imm, imm_chunks), (dfr, dfr_chunks) = runs[False][0], runs[True][0]
    reasons = {(r.finish_reason, r.matched_stop) for r in imm}
    assert ("stop", 0) in reasons  # EOS
    assert {"length", "stop"} <= {r.finish_reason for r in imm}
    assert any(isinstance(r.matched_stop, str) for r in imm)
    assert [fields(r) for r in dfr] == [fields(r) for r in imm]
    assert [meta(r) for r in dfr] == [meta(r) for r in imm]
    assert list(map(chunk_fields, dfr_chunks)) == list(map(chunk_fields, imm_chunks))
    for res, chunks in zip(dfr, dfr_chunks):
        if chunks and res.meta.get("steps") is None:
            assert "".join(c.text for c in chunks) == res.text
            assert sum((c.token_ids for c in chunks), []) == res.token_ids
            assert chunks[-1].finished and chunks[-1].finish_reason == res.finish_reason
            assert not any(c.finished for c in chunks[:-1])
    # a second run of each mode gives the same again (nothing left over from the first)
    assert [fields(r) for r in runs[True][1][0]] == [fields(r) for r in dfr]
    assert list(map(chunk_fields, runs[True][1][1])) == list(map(chunk_fields, dfr_chunks))
    assert list(map(chunk_fields, runs[False][1][1])) == list(map(chunk_fields, imm_chunks))


def test_chain_streams_every_generation_in_order(eng):
    steps = [
        ("gen", SamplingParams(max_new_tokens=5, ignore_eos=True), None),
        ("text", ", "),
        ("gen", SamplingParams(max_new_tokens=7, ignore_eos=True), None),
    ]
    got = {}
    for defer in (False, True):
        set_mode(eng, defer)
        (res,), (chunks,) = run_batch(
            eng, [lambda e, cb: e.submit_chain("the lazy dog", list(steps), stream=cb)]
        )
        got[defer] = (fields(res), chunk_fields(chunks))
        assert [c.index for c in chunks] == sorted(c.index for c in chunks)
        for k, step in enumerate(res.meta["steps"]):
            assert "".join(c.text for c in chunks if c.index == k) == step.text
    set_mode(eng, False)
    assert got[True] == got[False]


def test_lone_requests_resolve(eng):
    q = set_mode(eng, True)
    try:
        for n in (1, 5):
            fut = eng.submit(IDS, {"max_new_tokens": n, "ignore_eos": True})
            assert len(fut.result(timeout=30).token_ids) == n
        assert eng.score(IDS, [[3], [4, 5]])  # prefill-only requests (max_new_tokens=0)
        chunks = list(eng.generate(IDS, {"max_new_tokens": 6, "ignore_eos": True}, stream=True))
        assert chunks[-1].finished and sum(len(c.token_ids) for c in chunks) == 6
        assert q.pushed >= 6 + 3
    finally:
        set_mode(eng, False)


def test_abort_from_a_stream_callback(eng):
    """The callback aborts its own request after its 3rd chunk: deferred, that runs inside a flush
    (re-entrant), while the request is already part of the next batch."""
    got = {}
    for defer in (False, True):
        set_mode(eng, defer)
        box: list[Future] = []
        chunks: list[StreamChunk] = []

        def cb(chunk: StreamChunk, chunks: list = chunks, box: list = box) -> None:
            chunks.append(chunk)
            if len(chunks) == 3:
                assert eng.abort(box[0].rid)

        box.append(eng.submit(IDS, {"max_new_tokens": 40, "ignore_eos": True}, stream=cb))
        other = eng.submit(IDS[:4], {"max_new_tokens": 12, "ignore_eos": True})
        res = box[0].result(timeout=30)
        assert res.finish_reason == "abort" and len(res.token_ids) == 3
        assert "".join(c.text for c in chunks) == res.text and chunks[-1].finish_reason == "abort"
        got[defer] = (fields(res), fields(other.result(timeout=30)))
    set_mode(eng, False)
    assert got[True] == got[False]


def test_abort_from_another_thread(eng):
    set_mode(eng, True)
    try:
        started = threading.Event()
        chunks: list[StreamChunk] = []

        def cb(chunk: StreamChunk) -> None:
            chunks.append(chunk)
            if len(chunks) >= 4:
                started.set()

        fut = eng.submit(IDS, {"max_new_tokens": 400, "ignore_eos": True}, stream=cb)
        assert started.wait(30)
        assert eng.abort(fut.rid)
        res = fut.result(timeout=30)
        full = eng.generate(IDS, {"max_new_tokens": len(res.token_ids), "ignore_eos": True})
    finally:
        set_mode(eng, False)
    assert res.finish_reason == "abort" and res.token_ids == full.token_ids
    assert res.text == "".join(c.text for c in chunks) and chunks[-1].finished
    assert full.text.startswith(res.text)  # the aborted text is not flushed (held-back bytes)


@pytest.mark.parametrize("ok_calls", [0, 10])
def test_failing_text_work_fails_futures_and_the_engine_recovers(folder, ok_calls):
    """A detokenizer that raises inside a flush: the requests fail with EngineError instead of
    hanging, and the engine serves the next request. With ``ok_calls=0`` the first of three queued
    items fails, so the failing step's handler meets the second and the loop's recovery the third."""
    with Engine(str(folder), device="cpu", kv_memory="8MB") as e:
        e.outputs.defer_text = True
        real = e.tokenizer.decode
        calls = {"n": 0}

        def broken(ids: list[int], skip_special_tokens: bool = True) -> str:
            if threading.current_thread() is e._thread:
                calls["n"] += 1
                if calls["n"] > ok_calls:
                    raise RuntimeError("decoder broke")
            return real(ids, skip_special_tokens)

        e.tokenizer.decode = broken  # type: ignore[method-assign]
        gate = threading.Event()
        e._inbox.put(gate.wait)
        futs = [e.submit(IDS[:k], {"max_new_tokens": 30, "ignore_eos": True}) for k in (3, 5, 8)]
        gate.set()
        for f in futs:
            with pytest.raises(errors.EngineError):
                f.result(timeout=30)
        e.tokenizer.decode = real  # type: ignore[method-assign]
        assert len(e.generate(IDS, {"max_new_tokens": 4, "ignore_eos": True}).token_ids) == 4
        stats = e.stats()
        assert stats["cache"]["protected_tokens"] == 0


@pytest.mark.parametrize("defer", [False, True], ids=["immediate", "deferred"])
def test_shutdown_resolves_every_future(folder, defer):
    """Shutdown arrives right after the step in which a short request finished: deferred, its
    result is still queued then and must be delivered, not lost. (The long request's chunk of
    step k arrives during step k+1 when deferred, during step k when not.)"""
    trigger = 1 if defer else 2
    e = Engine(str(folder), device="cpu", kv_memory="8MB")
    e.outputs.defer_text = defer
    chunks: list[StreamChunk] = []

    def stop_engine_after_first_chunk(chunk: StreamChunk) -> None:
        chunks.append(chunk)
        if len(chunks) == trigger:
            e._inbox.put(None)  # what shutdown() queues; runs after the current step

    gate = threading.Event()
    e._inbox.put(gate.wait)  # both requests in the same first step
    long = e.submit(IDS, {"max_new_tokens": 400, "ignore_eos": True}, stream=stop_engine_after_first_chunk)
    short = e.submit(IDS[:4], {"max_new_tokens": 2, "ignore_eos": True})
    gate.set()
    e._thread.join(timeout=30)
    assert not e._thread.is_alive()
    e.shutdown()
    assert short.done() and long.done()
    assert len(short.result().token_ids) == 2
    assert isinstance(long.exception(), errors.EngineClosedError)
    assert chunks[-1].finished and chunks[-1].finish_reason == "abort"


def test_default_follows_the_device_and_the_env(monkeypatch):
    monkeypatch.delenv(DEFER_ENV, raising=False)
    assert defer_text_default("cuda") and not defer_text_default("cpu")
    monkeypatch.setenv(DEFER_ENV, "1")
    assert defer_text_default("cpu")
    monkeypatch.setenv(DEFER_ENV, "0")
    assert not defer_text_default("cuda")
