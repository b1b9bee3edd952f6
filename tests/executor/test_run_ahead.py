"""Run-ahead decode (``run_ahead.py``): decode step N+1 queued before step N's tokens are read.

Meant for CUDA (off by default until measured there); here forced on the CPU, where the forward is synchronous, so what is tested is
the bookkeeping: the same results and stream chunks as without it, which requests run ahead, KV
accounting when a request stops one step before the step in flight, admissions and aborts while a
step is in flight.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from test_deferred_text import chunk_fields, fields, meta, mixed_jobs, plain, run_batch, set_mode

from llmir_lang import errors
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.run_ahead import RUN_AHEAD_ENV, run_ahead_default
from llmir_lang.executor.sampler import Sampler
from llmir_lang.executor.sampling_params import SamplingParams

torch.set_num_threads(1)

IDS = [5, 17, 42, 99, 3, 7, 250, 11]


@pytest.fixture(scope="module")
def eng(checkpoints):
    e = Engine(str(checkpoints("llama")[0]), device="cpu", kv_memory="8MB", speculative_draft_tokens=0)
    yield e
    e.shutdown()


def set_ahead(eng: Engine, on: bool) -> int:
    """Turn run-ahead on or off between steps; returns the run-ahead step count so far."""

    def apply() -> int:
        eng.run_ahead = on
        return eng.num_run_ahead_steps

    return eng.call_in_engine_thread(apply)


def run(eng: Engine, jobs: list, ahead: bool, defer: bool = False) -> tuple[list, list, int]:
    eng.flush_cache()  # the same cached prefixes (cached_tokens) in every run
    was_deferring, was_ahead = eng.outputs.defer_text, eng.run_ahead
    set_mode(eng, defer)
    before = set_ahead(eng, ahead)
    try:
        res, chunks = run_batch(eng, jobs)
    finally:
        after = set_ahead(eng, was_ahead)
        set_mode(eng, was_deferring)
    return res, chunks, after - before


def assert_pool_whole(eng: Engine) -> None:
    eng.flush_cache()
    pool = eng.stats()["pool"]
    assert pool["used"] == 0, pool


def test_default_and_override(monkeypatch):
    monkeypatch.delenv(RUN_AHEAD_ENV, raising=False)
    assert run_ahead_default("cuda") and not run_ahead_default("cpu")  # measured on an H100 (1.17x / 1.06x)
    monkeypatch.setenv(RUN_AHEAD_ENV, "1")
    assert run_ahead_default("cpu") and run_ahead_default("cuda")
    monkeypatch.setenv(RUN_AHEAD_ENV, "off")
    assert not run_ahead_default("cuda")


@pytest.mark.parametrize("defer", [False, True], ids=["immediate_text", "deferred_text"])
def test_mixed_batch_same_results_and_chunks(eng, defer):
    """Every kind of request in one batch (stops on EOS, stop tokens and strings, min_new_tokens,
    logprobs, a chain, constraints, seeded sampling): the same results and chunks with run-ahead.
    The ineligible requests end early; the seeded ones then run ahead, some ending on EOS."""
    jobs = mixed_jobs(eng)
    ref, ref_chunks, n_ref = run(eng, jobs, ahead=False)
    got, got_chunks, n_got = run(eng, jobs, ahead=True, defer=defer)
    assert n_ref == 0 and n_got > 0
    assert [fields(r) for r in got] == [fields(r) for r in ref]
    assert [meta(r) for r in got] == [meta(r) for r in ref]
    assert list(map(chunk_fields, got_chunks)) == list(map(chunk_fields, ref_chunks))
    assert ("stop", 0) in {(r.finish_reason, r.matched_stop) for r in got[10:]}  # EOS while ahead
    assert_pool_whole(eng)


def test_staggered_lengths_leave_finished_requests_out(eng):
    check_run_ahead_equals_plain(eng)


def check_run_ahead_equals_plain(eng: Engine, atol: float = 0.0) -> None:
    """Requests that reach max_new_tokens at different steps (EOS ignored, so every step holds
    the same requests with run-ahead on and off): each step in flight holds only those that can
    still be running, and the tokens are the plain ones (logprobs within ``atol``). Also run on
    CUDA by ``test_engine_paths_gpu.py``."""
    ids = list(range(5, 5 + 40))
    jobs = [plain(ids[: 3 + 7 * i], max_new_tokens=3 + 4 * i, ignore_eos=True) for i in range(6)]
    jobs += [plain(ids, max_new_tokens=20, return_logprob=True, temperature=0.7, seed=3, ignore_eos=True)]
    ref, _, _ = run(eng, jobs, ahead=False)
    seen: list[int] = []
    orig = eng.runner.run

    def spy(sb: Any, ahead_ids: torch.Tensor | None = None) -> Any:
        if ahead_ids is not None:
            seen.append(len(sb.reqs))
            assert all(len(r.output_ids) + 1 < r.params.max_new_tokens for r in sb.reqs)
        return orig(sb, ahead_ids)

    eng.runner.run = spy  # type: ignore[method-assign]
    try:
        got, _, n = run(eng, jobs, ahead=True)
    finally:
        del eng.runner.run
    assert n == len(seen) > 0 and len(set(seen)) > 2  # the batch in flight shrank along the way
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert [r.completion_tokens for r in got] == [3 + 4 * i for i in range(6)] + [20]
    assert got[-1].logprobs == pytest.approx(ref[-1].logprobs, abs=atol)
    assert [r.text for r in got] == [r.text for r in ref]
    assert_pool_whole(eng)


def test_ineligible_request_keeps_the_batch_on_the_plain_path(eng):
    jobs = [
        plain(IDS, max_new_tokens=16, ignore_eos=True),
        plain(IDS[:4], max_new_tokens=16, ignore_eos=True, frequency_penalty=0.5),
    ]
    ref, _, _ = run(eng, jobs, ahead=False)
    got, _, n = run(eng, jobs, ahead=True)
    assert n == 0
    assert [fields(r) for r in got] == [fields(r) for r in ref]
    # min_new_tokens bans EOS for a while: the request runs ahead only once no ban is left
    jobs = [plain(IDS, max_new_tokens=16, min_new_tokens=10)]
    ref, _, _ = run(eng, jobs, ahead=False)
    got, _, n = run(eng, jobs, ahead=True)
    assert 0 < n < 16 - 10
    assert [fields(r) for r in got] == [fields(r) for r in ref]


def test_admission_and_abort_while_a_step_is_in_flight(eng):
    """A request submitted and one aborted from a stream callback (on the engine thread, between
    steps, with a step in flight): the others' results do not change and the pool is whole."""
    long_ids = [7, 7, 1, 2, 9, 30, 31, 32]
    base = [
        plain(long_ids, max_new_tokens=30, ignore_eos=True),
        plain(IDS, max_new_tokens=30, ignore_eos=True),
    ]
    ref, _, _ = run(eng, base, ahead=False)
    late = eng.generate(IDS[:5], {"max_new_tokens": 9, "ignore_eos": True})

    extra: dict[str, Any] = {}

    def jobs() -> list:
        def first(e: Engine, cb: Any) -> Any:
            got = [0]

            def on_chunk(chunk: Any) -> None:
                cb(chunk)
                got[0] += len(chunk.token_ids)
                if got[0] >= 4 and "late" not in extra:
                    extra["late"] = e.submit(IDS[:5], {"max_new_tokens": 9, "ignore_eos": True})

            return e.submit(long_ids, {"max_new_tokens": 30, "ignore_eos": True}, stream=on_chunk)

        def doomed(e: Engine, cb: Any) -> Any:
            fut: Any = None
            got = [0]

            def on_chunk(chunk: Any) -> None:
                cb(chunk)
                got[0] += len(chunk.token_ids)
                if got[0] >= 6 and not chunk.finished:
                    e.abort(fut.rid)

            fut = e.submit([9, 8, 7, 6], {"max_new_tokens": 30, "ignore_eos": True}, stream=on_chunk)
            return fut

        return [first, base[1], doomed]

    set_ahead(eng, True)
    try:
        n0 = eng.num_run_ahead_steps
        res, _ = run_batch(eng, jobs())
        late_res = extra["late"].result(timeout=60)
        assert eng.num_run_ahead_steps > n0
    finally:
        set_ahead(eng, False)
    assert [r.token_ids for r in res[:2]] == [r.token_ids for r in ref]
    assert late_res.token_ids == late.token_ids
    assert res[2].finish_reason == "abort" and 6 <= res[2].completion_tokens < 30
    assert_pool_whole(eng)


def test_a_long_run_ahead_keeps_the_radix_cache_right(eng):
    """A request that ended one step before the step in flight caches its KV with its last token:
    a later request over the same text must read exactly the KV a plain run computes."""
    first = eng.generate(IDS, {"max_new_tokens": 12})  # ends on EOS or at 12
    text_ids = IDS + first.token_ids
    set_ahead(eng, True)
    try:
        eng.flush_cache()
        eng.generate(IDS, {"max_new_tokens": 12})
        warm = eng.generate(text_ids, {"max_new_tokens": 8, "ignore_eos": True, "return_logprob": True})
    finally:
        set_ahead(eng, False)
    eng.flush_cache()
    cold = eng.generate(text_ids, {"max_new_tokens": 8, "ignore_eos": True, "return_logprob": True})
    assert warm.cached_tokens >= len(IDS)
    assert warm.token_ids == cold.token_ids
    assert warm.logprobs == pytest.approx(cold.logprobs, abs=1e-4)


def test_sampler_on_device_keeps_tensors_and_refuses_top_logprobs():
    s = Sampler(16)
    logits = torch.randn(3, 16)
    params = [SamplingParams(), SamplingParams(temperature=0.5, return_logprob=True), SamplingParams()]
    gens = [None, Sampler.make_generator(1), None]
    out = s.sample(logits, params, [[1]] * 3, [[]] * 3, gens, on_device=True)
    host = s.sample(logits, params, [[1]] * 3, [[]] * 3, [None, Sampler.make_generator(1), None])
    assert out.token_ids.dtype == torch.int64 and out.token_ids.tolist() == host.token_ids.tolist()
    assert out.logprobs is not None and torch.allclose(out.logprobs, host.logprobs)
    with pytest.raises(errors.EngineError, match="top logprobs"):
        s.sample(logits[:1], [SamplingParams(top_logprobs_num=2)], [[1]], [[]], [None], on_device=True)


def test_generate_from_many_threads_with_run_ahead(eng):
    """Requests arriving from several threads at random times (admissions between steps in
    flight): every result equals its lone greedy run."""
    prompts = [IDS[: 2 + i % 6] + [i] for i in range(8)]
    alone = [eng.generate(p, {"max_new_tokens": 10, "ignore_eos": True}).token_ids for p in prompts]
    set_ahead(eng, True)
    out: dict[int, list[int]] = {}
    try:
        threads = [
            threading.Thread(
                target=lambda i=i: out.__setitem__(
                    i, eng.generate(prompts[i], {"max_new_tokens": 10, "ignore_eos": True}).token_ids
                )
            )
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        set_ahead(eng, False)
    assert [out[i] for i in range(8)] == alone
    assert_pool_whole(eng)


def _submit_three_together(eng: Engine) -> list:
    """Three requests of 3-5 prompt tokens, 12 new each, admitted in one step (the engine thread
    is held while they are queued)."""
    gate = threading.Event()
    eng._inbox.put(gate.wait)
    try:
        return [eng.submit(IDS[: 3 + i], {"max_new_tokens": 12, "ignore_eos": True}) for i in range(3)]
    finally:
        gate.set()


def test_a_failure_with_a_step_in_flight_fails_only_its_requests(eng, monkeypatch):
    """Reading a step's tokens fails while the next step is in flight: that step's requests (also
    the ones in flight) fail with an EngineError, the engine keeps serving, the pool is whole."""
    from llmir_lang.executor import run_ahead

    real = run_ahead.complete
    calls = [0]

    def flaky(out: Any, ahead: Any) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected")
        real(out, ahead)

    monkeypatch.setattr(run_ahead, "complete", flaky)
    set_ahead(eng, True)
    try:
        futs = _submit_three_together(eng)
        for f in futs:
            with pytest.raises(errors.EngineError, match="injected"):
                f.result(timeout=60)
        assert calls[0] >= 3
        monkeypatch.setattr(run_ahead, "complete", real)
        again = eng.generate(IDS, {"max_new_tokens": 12, "ignore_eos": True})
    finally:
        set_ahead(eng, False)
    assert again.token_ids == eng.generate(IDS, {"max_new_tokens": 12, "ignore_eos": True}).token_ids
    assert_pool_whole(eng)


def test_a_failing_launch_of_the_step_ahead_loses_no_request(eng, monkeypatch):
    """The forward of a decode step launched ahead raises (a CUDA out-of-memory, say): the step in
    flight completes, the next one runs on the ordinary path, and every request gets the tokens it
    gets without run-ahead; the pool is whole."""
    want = [eng.generate(IDS[: 3 + i], {"max_new_tokens": 12, "ignore_eos": True}).token_ids for i in range(3)]
    real = eng.runner.run
    failed: list[int] = []

    def run(sb, *args, **kwargs):
        if kwargs.get("ahead_ids") is not None and len(failed) < 2:
            failed.append(len(sb.reqs))
            raise RuntimeError("injected")
        return real(sb, *args, **kwargs)

    monkeypatch.setattr(eng.runner, "run", run)
    set_ahead(eng, True)
    try:
        futs = _submit_three_together(eng)
        got = [f.result(timeout=60).token_ids for f in futs]
    finally:
        set_ahead(eng, False)
        monkeypatch.undo()
    assert failed == [3, 3]
    assert got == want
    assert_pool_whole(eng)
