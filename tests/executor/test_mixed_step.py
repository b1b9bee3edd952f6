"""Mixed steps: short extends of running requests (forced tokens) in the same forward as the decode
rows of the others. The scheduler's bookkeeping, and on the bundled model that a mixed step gives
the same tokens and logprobs as an extend step followed by a decode step."""

from __future__ import annotations

import pytest
import torch

from llmir_lang.executor.attention import ForwardMode
from llmir_lang.executor.backend import ChainRequest, EngineBackend, GenStep
from llmir_lang.executor.constraints import spec_from_json_schema
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.kv_pool import KVPool
from llmir_lang.executor.radix_cache import RadixCache
from llmir_lang.executor.request import Req
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.executor.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from llmir_lang.models.tiny_tasks import (
    SCHEMAS,
    extraction_items,
)

torch.set_num_threads(1)


# ---- scheduler ---------------------------------------------------------------------------------
def _req(rid: int, prompt: list[int]) -> Req:
    return Req(rid=rid, prompt_ids=prompt, params=SamplingParams(), future=None, decoder=None)  # type: ignore[arg-type]


def _sample(batch: ScheduledBatch, token: int) -> None:
    """What output processing does after a step: every sampling request gets a token."""
    for req, s in zip(batch.reqs, batch.sample):
        if s:
            req.output_ids.append(token)


def _running_scheduler(max_mixed: int = 8) -> tuple[Scheduler, list[Req]]:
    """Three requests of 10 prompt tokens, prefilled and one decode step done."""
    pool = KVPool(1, 1, 4, 256, torch.float32, torch.device("cpu"))
    sched = Scheduler(pool, RadixCache(pool), SchedulerConfig(max_mixed_extend=max_mixed))
    reqs = [_req(i, list(range(10 * i + 1, 10 * i + 11))) for i in range(3)]
    for r in reqs:
        sched.add(r)
    for mode, token in ((ForwardMode.EXTEND, 5), (ForwardMode.DECODE, 6)):
        b = sched.schedule()
        assert b is not None and b.mode is mode and b.reqs == reqs
        _sample(b, token)
        sched.after_step(b)
    return sched, reqs


def _check_slots(sched: Scheduler, batch: ScheduledBatch) -> None:
    for req, p, n in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
        assert req.kv_len == p + n <= req.seq_len


def test_forced_tokens_run_with_the_decode_rows_of_the_others():
    sched, reqs = _running_scheduler()
    forced = reqs[0]
    forced.rebase_to = (forced.prompt_ids, forced.output_ids + [7, 8, 9])  # jump-forward: 3 tokens
    sched.after_step(ScheduledBatch(ForwardMode.DECODE, [forced], [0], [1], [False]))
    assert sched.extending == [forced] and forced not in sched.running
    b = sched.schedule()
    assert b is not None and b.mode is ForwardMode.EXTEND
    assert b.reqs == [forced, reqs[1], reqs[2]] and b.num_decode == 2
    # the extend computes the last sampled token and the 3 forced ones; the others decode one
    assert b.prefix_lens == [11, 11, 11] and b.extend_lens == [4, 1, 1] and b.sample == [True] * 3
    _check_slots(sched, b)
    _sample(b, 4)
    sched.after_step(b)
    assert sorted(r.rid for r in sched.running) == [0, 1, 2] and len(sched.running) == 3
    assert not sched.extending
    # the decode rows' KV stays theirs (not published in the radix tree mid-decode)
    assert reqs[1].cache_len == 10 and reqs[1].kv_len == 12

    # a long extend is not mixed: it runs alone, and the others decode afterwards
    reqs[1].rebase_to = (reqs[1].prompt_ids, reqs[1].output_ids + list(range(40, 60)))
    sched.after_step(ScheduledBatch(ForwardMode.DECODE, [reqs[1]], [0], [1], [False]))
    b = sched.schedule()
    assert b is not None and b.mode is ForwardMode.EXTEND and b.reqs == [reqs[1]] and b.num_decode == 0
    assert b.extend_lens == [21]


def test_mixing_off_keeps_extend_steps_separate():
    sched, reqs = _running_scheduler(max_mixed=0)
    reqs[2].rebase_to = (reqs[2].prompt_ids, reqs[2].output_ids + [7])
    sched.after_step(ScheduledBatch(ForwardMode.DECODE, [reqs[2]], [0], [1], [False]))
    b = sched.schedule()
    assert b is not None and b.reqs == [reqs[2]] and b.num_decode == 0 and b.extend_lens == [2]


# ---- engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend():
    be = EngineBackend(Engine(device="cpu"))
    yield be
    be.engine.shutdown()


def _requests(n: int, seed: int) -> list[ChainRequest]:
    params = SamplingParams(max_new_tokens=96, return_logprob=True)
    return [
        ChainRequest(prompt, [GenStep("x", params, spec_from_json_schema(SCHEMAS[kind], whitespace=""))])
        for kind, prompt, _ in extraction_items(n, seed)
    ]


def test_mixed_steps_give_the_tokens_and_logprobs_of_separate_steps(backend):
    check_mixed_equals_separate(backend, atol=1e-4)


def check_mixed_equals_separate(backend: EngineBackend, atol: float) -> None:
    """Same tokens, and logprobs within ``atol``, with mixing on and off; fewer forwards with it."""
    eng = backend.engine
    orig_run = eng.runner.run
    seen: list[int] = []  # per step: rows decoded inside an extend step (-1: a decode step)

    def run(sb: ScheduledBatch):
        # a speculative verify step (draft_lens) decodes too, but mixes no extend in
        seen.append(sb.num_decode if sb.mode is ForwardMode.EXTEND and not sb.draft_lens else -1)
        return orig_run(sb)

    eng.runner.run = run  # type: ignore[method-assign]
    saved = eng.scheduler.cfg.max_mixed_extend
    out, steps = {}, {}
    try:
        for mix in (8, 0):
            eng.scheduler.cfg.max_mixed_extend = mix
            eng.flush_cache()
            seen.clear()
            out[mix] = [r.steps[0] for r in backend.run(_requests(8, seed=5))]
            steps[mix] = list(seen)
    finally:
        eng.scheduler.cfg.max_mixed_extend = saved
        del eng.runner.run
    assert [s.token_ids for s in out[8]] == [s.token_ids for s in out[0]]
    assert all(s.finish_reason == "stop" for s in out[8])
    for a, b in zip(out[8], out[0]):
        assert a.logprobs is not None and b.logprobs is not None
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=atol)
    assert sum(n > 0 for n in steps[8]) >= 5, steps[8]  # forced tokens rode along with decode rows
    assert all(n <= 0 for n in steps[0])
    assert len(steps[8]) < len(steps[0])  # fewer forwards: no step where the decoding requests wait


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
def test_engine_rejects_a_bad_max_mixed_extend(bad):
    from llmir_lang.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="max_mixed_extend"):
        Engine(device="cpu", max_mixed_extend=bad)
