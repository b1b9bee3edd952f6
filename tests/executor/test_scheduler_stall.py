"""Admitted requests that must compute forced text (a fused chain's next text, jump-forward) and find
no KV room: the scheduler runs the others past them, and when none can run and nothing decodes, it
gives one up to the queue instead of waiting for ever (found by the random end-to-end programs: two
fused chains in a 62-token pool deadlocked)."""

from __future__ import annotations

import torch

from llmir_lang.executor.attention import ForwardMode
from llmir_lang.executor.kv_pool import KVPool
from llmir_lang.executor.radix_cache import RadixCache
from llmir_lang.executor.request import Req
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.executor.scheduler import ScheduledBatch, Scheduler, SchedulerConfig


def _req(rid: int, prompt: list[int]) -> Req:
    return Req(rid=rid, prompt_ids=prompt, params=SamplingParams(), future=None, decoder=None)  # type: ignore[arg-type]


def _prefilled(capacity: int, forced: list[int]) -> tuple[Scheduler, list[Req]]:
    """Requests of 10 prompt tokens each, prefilled (10 KV slots each, locked in the radix tree),
    one token sampled, then given ``forced[i]`` forced tokens to compute: all in ``extending``."""
    pool = KVPool(1, 1, 4, capacity, torch.float32, torch.device("cpu"))
    sched = Scheduler(pool, RadixCache(pool), SchedulerConfig())
    reqs = [_req(i, list(range(100 * i + 1, 100 * i + 11))) for i in range(len(forced))]
    for r in reqs:
        sched.add(r)
    b = sched.schedule()
    assert b is not None and b.reqs == reqs and b.mode is ForwardMode.EXTEND
    for r in reqs:
        r.output_ids.append(7)
    sched.after_step(b)
    for r, n in zip(reqs, forced):
        r.rebase_to = (r.prompt_ids, r.output_ids + list(range(1000 + 100 * r.rid, 1000 + 100 * r.rid + n)))
    sched.after_step(
        ScheduledBatch(ForwardMode.DECODE, reqs, [0] * len(reqs), [1] * len(reqs), [False] * len(reqs))
    )
    assert sched.extending == reqs and not sched.running
    return sched, reqs


def _run(sched: Scheduler, b: ScheduledBatch) -> None:
    for req, s in zip(b.reqs, b.sample):
        assert req.kv_len == req.seq_len if s else req.kv_len < req.seq_len
        if s:
            req.output_ids.append(9)
    sched.after_step(b)


def _finish(sched: Scheduler, req: Req) -> None:
    sched.finish(req)  # what output processing does at a stop: its KV goes to the radix cache


def test_a_request_that_fits_runs_past_one_that_waits_for_room():
    # 20 slots free, both prefixes locked: the first needs 26, the second 4
    sched, (a, b) = _prefilled(40, [25, 3])
    assert sched.pool.num_free == 20
    late = _req(5, list(range(500, 505)))  # a new request must not take the room ahead of ``a``
    sched.add(late)
    batch = sched.schedule()
    assert batch is not None and batch.reqs == [b] and batch.extend_lens == [4]
    assert sched.num_retractions == 0 and sched.extending == [a] and list(sched.waiting) == [late]
    _run(sched, batch)
    _finish(sched, b)  # its KV goes to the cache, evictable: now ``a`` fits
    batch = sched.schedule()
    assert batch is not None and batch.reqs[0] is a and batch.extend_lens[0] == 26
    assert sched.num_retractions == 0


def test_when_no_admitted_request_fits_one_goes_back_to_the_queue():
    # 20 slots free, the first needs 26 and the second 22: neither can ever run while both hold KV
    sched, (a, b) = _prefilled(40, [25, 21])
    batch = sched.schedule()
    assert batch is not None and batch.reqs == [a] and batch.extend_lens == [26]
    assert sched.num_retractions == 1 and b.retractions == 1 and list(sched.waiting) == [b]
    assert b.kv_slots == [] and b.last_node is None
    _run(sched, batch)
    _finish(sched, a)
    batch = sched.schedule()  # ``b`` again, from what the cache kept of its KV
    assert batch is not None and batch.reqs == [b] and b.kv_len == b.seq_len
    assert batch.prefix_lens[0] + batch.extend_lens[0] == 32
    _run(sched, batch)
    assert sched.running == [b]


def test_a_request_too_big_for_the_pool_alone_is_left_in_the_queue():
    # alone it can never fit: the scheduler hands it back to the queue (the engine loop then fails
    # it with OutOfKVMemoryError, as a new request of that size) instead of waiting for ever
    sched, (a,) = _prefilled(30, [25])
    assert sched.schedule() is None
    assert list(sched.waiting) == [a] and not sched.extending and a.retractions == 1
    assert a.seq_len + sched.pool.page_size > sched.pool.capacity
