"""A request whose own processing fails (its constraint raises while the engine fills its mask or
advances it) fails alone: the other requests of the same step finish with the tokens they get
alone, and the engine keeps serving."""

from __future__ import annotations

import pytest
from hf_fixtures import hf_greedy
from matcher_stubs import BrokenMatcher

from llmir_lang import errors
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.sampling_params import SamplingParams

IDS = [5, 17, 42, 99, 3, 7, 250, 11]
OTHER = [9, 8, 7, 6, 5, 4]


@pytest.fixture(scope="module")
def setup(checkpoints):
    folder, hf = checkpoints("llama")
    eng = Engine(str(folder), device="cpu", kv_memory="8MB")
    yield eng, hf
    eng.shutdown()


@pytest.mark.parametrize("where, after", [("fill", 0), ("fill", 3), ("advance", 0), ("advance", 4)])
def test_a_failing_constraint_fails_only_its_request(setup, where, after):
    eng, hf = setup
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    broken = BrokenMatcher(eng.config.vocab_size, where, after)
    # submitted together: all three run in the same steps
    futs = [
        eng.submit(IDS, params),
        eng.submit(OTHER, params, matcher=broken),
        eng.submit(OTHER + [1], params),
    ]
    first = futs[0].result(timeout=60)
    third = futs[2].result(timeout=60)
    assert first.token_ids == hf_greedy(hf, IDS, 8)[0]
    assert third.token_ids == hf_greedy(hf, OTHER + [1], 8)[0]
    with pytest.raises(errors.EngineError, match=f"matcher bug in {where}"):
        futs[1].result(timeout=60)
    # the engine goes on serving, and the failed request left no KV pinned
    assert eng.generate(IDS, params).token_ids == first.token_ids
    eng.flush_cache()
    pool = eng.stats()["pool"]
    assert pool["used"] == 0, pool


POISON = 77  # a prompt holding this id makes the model's forward raise (see _poisoned_forward)


def _poisoned_forward(eng, monkeypatch, when):
    """Make ``eng.runner.run`` raise for a step that ``when(batch)`` picks, as a CUDA
    out-of-memory on one long prompt would."""
    real = eng.runner.run

    def run(sb, *args, **kwargs):
        if when(sb):
            raise RuntimeError("forward failed: out of memory")
        return real(sb, *args, **kwargs)

    monkeypatch.setattr(eng.runner, "run", run)


def _submit_together(eng, prompts, params):
    # submitted from the engine thread: all of them are admitted before the next step
    return eng.call_in_engine_thread(lambda: [eng.submit(p, params) for p in prompts])


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_a_failing_forward_fails_only_the_request_that_fails_alone(setup, monkeypatch, mode):
    from llmir_lang.executor.attention import ForwardMode

    eng, hf = setup
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    want_mode = ForwardMode.EXTEND if mode == "prefill" else ForwardMode.DECODE
    _poisoned_forward(
        eng, monkeypatch, lambda sb: sb.mode is want_mode and any(POISON in r.prompt_ids for r in sb.reqs)
    )
    before = eng.stats()["step_retries"]
    futs = _submit_together(eng, [IDS, OTHER + [POISON], OTHER + [1]], params)
    assert futs[0].result(timeout=60).token_ids == hf_greedy(hf, IDS, 8)[0]
    assert futs[2].result(timeout=60).token_ids == hf_greedy(hf, OTHER + [1], 8)[0]
    with pytest.raises(errors.EngineError, match="forward failed: out of memory"):
        futs[1].result(timeout=60)
    assert eng.stats()["step_retries"] > before  # the three shared the failed step
    monkeypatch.undo()
    assert eng.generate(IDS, params).token_ids == futs[0].result().token_ids
    eng.flush_cache()
    assert eng.stats()["pool"]["used"] == 0


def test_a_forward_that_fails_once_for_a_batch_loses_no_request(setup, monkeypatch):
    eng, hf = setup
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    failed = []

    def once(sb):
        if len(sb.reqs) > 1 and not failed:
            failed.append(len(sb.reqs))
            return True
        return False

    _poisoned_forward(eng, monkeypatch, once)
    prompts = [IDS, OTHER, OTHER + [1], [4, 4, 4]]
    results = [f.result(timeout=60) for f in _submit_together(eng, prompts, params)]
    assert failed and failed[0] >= 2  # (a prompt sharing an uncached prefix may wait a step)
    for p, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(hf, p, 6)[0]


def test_a_request_aborted_before_its_rerun_caches_no_uncomputed_kv(setup, monkeypatch):
    """During the one-at-a-time rerun of a failed decode step, a stream callback of the first
    request aborts a later one before its rerun. That request's KV in the radix cache must be
    computed KV only: a prompt continuing its output is then answered as transformers does (the
    slot of the failed step, never written, was cached with its token)."""
    from llmir_lang.executor.attention import ForwardMode

    eng, hf = setup
    eng.flush_cache()
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    failed: list[int] = []
    holder: dict = {}

    def fail_first_decode(sb) -> bool:
        if sb.mode is ForwardMode.DECODE and len(sb.reqs) > 1 and not failed:
            failed.append(len(sb.reqs))
            return True
        return False

    def on_chunk(chunk) -> None:  # engine thread: the first request's stream
        if failed and not holder.get("aborted"):
            holder["aborted"] = eng.abort(holder["b"])

    _poisoned_forward(eng, monkeypatch, fail_first_decode)
    b_prompt = [21, 22, 23, 24, 25]

    def submit_all():
        a = eng.submit(IDS, params, stream=on_chunk)
        b = eng.submit(b_prompt, params)
        holder["b"] = b.rid
        return a, b, eng.submit(OTHER + [1], params)

    a, b, c = eng.call_in_engine_thread(submit_all)
    assert a.result(timeout=60).token_ids == hf_greedy(hf, IDS, 6)[0]
    assert c.result(timeout=60).token_ids == hf_greedy(hf, OTHER + [1], 6)[0]
    rb = b.result(timeout=60)
    assert failed and holder.get("aborted") and rb.finish_reason == "abort"
    monkeypatch.undo()
    cont = b_prompt + rb.token_ids + [7]
    assert (
        eng.generate(cont, SamplingParams(max_new_tokens=3, ignore_eos=True)).token_ids
        == hf_greedy(hf, cont, 3)[0]
    )
