"""ModelRunner host-side logic on the CPU: buckets, the slot table, CSR gathers, padded decode steps,
shared-prefix detection and the shared-prefix decode path (through the torch reference kernels).

The CUDA-graph replay itself needs a GPU (tests/executor/test_model_runner_gpu.py); everything that
feeds a graph (padding to a bucket, static buffers, the slot table) runs here on the CPU.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import pytest
import torch
from llmir_lang.kernels import policy

from llmir_lang.errors import InvalidRequestError
from llmir_lang.executor.attention import ForwardBatch, ForwardMode, TorchAttentionBackend
from llmir_lang.executor.cuda_graph import (
    DecodeBuffers,
    SlotTable,
    batch_buckets,
    bucket_for,
    gather_rows,
)
from llmir_lang.executor.kv_pool import KVPool
from llmir_lang.executor.model import CausalLM
from llmir_lang.executor.model_config import ModelConfig
from llmir_lang.executor.model_runner import ModelRunner
from llmir_lang.executor.radix_cache import RadixCache, common_cached_prefix
from llmir_lang.executor.request import Req
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.executor.scheduler import ScheduledBatch, Scheduler, SchedulerConfig

torch.set_num_threads(1)


# ---- buckets --------------------------------------------------------------------------------
def test_buckets_cover_every_batch_size_up_to_the_max() -> None:
    assert batch_buckets(256) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    assert batch_buckets(100) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100)
    assert batch_buckets(1) == (1,)
    assert batch_buckets(600)[-4:] == (256, 384, 512, 600)
    b = batch_buckets(200)
    for n in range(1, 201):
        k = bucket_for(n, b)
        assert k >= n and all(x < n for x in b if x < k)
    with pytest.raises(InvalidRequestError, match="no bucket"):
        bucket_for(201, b)
    with pytest.raises(InvalidRequestError):
        batch_buckets(0)


# ---- gathers ---------------------------------------------------------------------------------
def test_gather_rows_builds_the_csr_lists() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, 10_000, (6, 40), generator=g)
    rows = torch.tensor([4, 0, 2, 5, 1])
    lens = torch.tensor([3, 0, 17, 1, 9])
    for start in (0, 5):
        indptr = torch.full((8,), -1, dtype=torch.int64)
        out = torch.full((64,), -1, dtype=torch.int64)
        total = int(lens.sum())
        gather_rows(table, rows, lens, indptr, out, total, start)
        want = torch.cat([table[r, start : start + n] for r, n in zip(rows.tolist(), lens.tolist())])
        assert torch.equal(out[:total], want)
        assert indptr[:6].tolist() == [0, 3, 3, 20, 21, 30]
        assert (out[total:] == -1).all(), "nothing past the total is written"
    # a single request: one slice copy, the rest of the batch (padding) has length 0
    indptr = torch.zeros(4, dtype=torch.int64)
    out = torch.zeros(64, dtype=torch.int64)
    gather_rows(table, torch.tensor([3, 0, 0]), torch.tensor([7, 0, 0]), indptr, out, 7, 2, single_row=3)
    assert torch.equal(out[:7], table[3, 2:9]) and indptr.tolist() == [0, 7, 7, 7]


def test_decode_buffers_grow_and_say_so() -> None:
    buf = DecodeBuffers(torch.device("cpu"), 8, kv_capacity=16)
    assert not buf.ensure(8, 16, 0, 0)
    assert buf.ensure(8, 17, 0, 0) and buf.kv_indices.shape[0] >= 17
    assert buf.ensure(3, 10, 2000, 0) and buf.suffix_indices.shape[0] >= 2000
    assert buf.ensure(3, 10, 10, 5000) and buf.prefix_indices.shape[0] >= 5000
    assert buf.ensure(20, 10, 10, 10) and buf.max_batch >= 20 and buf.qo_indptr[20] == 20
    assert not buf.ensure(20, 10, 10, 10)


# ---- slot table ------------------------------------------------------------------------------
class _R:
    def __init__(self, rid: int, slots: list[int]):
        self.rid, self.kv_slots = rid, slots


def _step(table: SlotTable, reqs: list[_R]) -> list[int]:
    """What the runner does per decode step: rows, then the new slot, then mark synced."""
    lens = [len(r.kv_slots) for r in reqs]
    rows = table.rows_for(reqs, lens)
    for r, row, n in zip(reqs, rows, lens):
        table.table[row, n - 1] = r.kv_slots[n - 1]
    table.mark_synced(reqs, lens)
    for r, row, n in zip(reqs, rows, lens):
        assert table.table[row, :n].tolist() == r.kv_slots, r.rid
    return rows


def test_slot_table_uploads_a_row_only_when_its_list_changed() -> None:
    t = SlotTable(torch.device("cpu"), max_width=4096, rows=2, width=4)
    rng = random.Random(0)
    reqs = [_R(i, [rng.randrange(1000) for _ in range(3 + i)]) for i in range(3)]
    _step(t, reqs)  # 3 requests, 2 rows: the table grows
    assert t.num_rows >= 3 and t.num_row_uploads == 3
    for _ in range(10):  # steady decode: only the new slot moves
        for r in reqs:
            r.kv_slots.append(rng.randrange(1000))
        _step(t, reqs)
    assert t.num_row_uploads == 3 and t.table.shape[1] >= 13
    reqs[1].kv_slots = list(reqs[1].kv_slots[:5]) + [999]  # replaced (retraction / prefill)
    reqs[0].kv_slots.extend([1, 2, 3])  # grew by more than one (extend step)
    reqs[2].kv_slots.append(7)
    _step(t, reqs)
    assert t.num_row_uploads == 5
    t.forget(reqs[2])
    reqs[2].kv_slots[0] = 123  # an in-place edit is only seen after forget()
    for r in reqs:
        r.kv_slots.append(8)
    _step(t, reqs)
    assert t.num_row_uploads == 6


def test_slot_table_gives_a_request_with_several_rows_one_row_with_every_column() -> None:
    """A short extend run as decode rows lists a request once per new token (kv_len rising by one):
    one table row serves them all, and every column any of them reads is in the table before the
    list kernel runs (its programs write only their own row's last column)."""
    t = SlotTable(torch.device("cpu"), max_width=64, rows=4, width=8)
    a, b = _R(0, [5, 6, 7]), _R(1, [9, 10])
    _step(t, [a, b])
    a.kv_slots += [20, 21, 22]  # three new tokens
    b.kv_slots += [30]
    reqs, lens = [a, a, a, b], [4, 5, 6, 3]
    rows = t.rows_for(reqs, lens)
    assert rows[0] == rows[1] == rows[2] != rows[3]
    assert t.table[rows[0], :6].tolist() == [5, 6, 7, 20, 21, 22]  # before any row writes its slot
    for r, row, n in zip(reqs, rows, lens):
        t.table[row, n - 1] = r.kv_slots[n - 1]  # what the list kernel does
    t.mark_synced(reqs, lens)
    a.kv_slots.append(23)
    b.kv_slots.append(31)
    uploads = t.num_row_uploads
    _step(t, [a, b])  # plain decode afterwards: no re-upload
    assert t.num_row_uploads == uploads


def test_slot_table_reclaims_rows_of_requests_that_left() -> None:
    t = SlotTable(torch.device("cpu"), max_width=64, rows=4, width=8)
    for wave in range(5):
        reqs = [_R(10 * wave + i, [wave, i, 0]) for i in range(4)]
        _step(t, reqs)
    assert t.num_rows == 4, "finished requests' rows are reused, not grown"
    with pytest.raises(InvalidRequestError, match="context"):
        t.rows_for([_R(99, list(range(65)))], [65])


# ---- a tiny model through the runner -----------------------------------------------------------
def _model(
    dtype: torch.dtype = torch.float32, device: str = "cpu", hidden: int = 64, ctx: int = 256, **config: Any
) -> CausalLM:
    """A 2-layer random model (seeded); ``config`` entries override the config.json defaults
    (another architecture, rope scaling, biases, ...)."""
    cfg = ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": hidden,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            "max_position_embeddings": ctx,
            "rms_norm_eps": 1e-5,
            **config,
        }
    )
    torch.manual_seed(0)
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(device=device, dtype=dtype)


def _pool(model: CausalLM, capacity: int = 1024) -> KVPool:
    c = model.config
    w = model.output_weight()
    return KVPool(c.num_layers, c.num_kv_heads, c.head_dim, capacity, w.dtype, w.device)


def _req(rid: int, prompt: list[int]) -> Req:
    return Req(rid=rid, prompt_ids=prompt, params=SamplingParams(), future=None, decoder=None)  # type: ignore[arg-type]


def _prefill_greedy(runner: ModelRunner, pool: KVPool, reqs: list[Req]) -> None:
    """Give each request slots for its prompt, run one extend step over every prompt, and append
    each request's greedy token (the start of a decode test)."""
    for r in reqs:
        r.kv_slots = pool.alloc(len(r.prompt_ids)).tolist()
    n = len(reqs)
    step = runner.run(
        ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * n, [len(r.prompt_ids) for r in reqs], [True] * n)
    )
    for r, row in zip(reqs, step.sample_rows):
        r.output_ids.append(int(step.logits[row].argmax()))


def _reference_logits(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """Last-token logits of a plain prefill of ``ids`` in a fresh pool."""
    pool = _pool(model, 256)
    be = TorchAttentionBackend(pool.k_buffers, pool.v_buffers, model.config.head_dim**-0.5)
    n = len(ids)
    dev = pool.device
    slots = torch.arange(n, device=dev)
    fb = ForwardBatch(
        ForwardMode.EXTEND,
        torch.tensor(ids, device=dev),
        torch.arange(n, device=dev),
        slots,
        torch.tensor([0, n], device=dev),
        torch.tensor([0, n], device=dev),
        slots,
        1,
        torch.tensor([n - 1], device=dev),
    )
    return model(fb, be)[0]


@pytest.mark.parametrize("pad,lists", [(False, "torch"), (True, "torch"), (True, "triton")])
def test_decode_steps_match_a_plain_prefill(monkeypatch, pad: bool, lists: str) -> None:
    model = _model()
    pool = _pool(model)
    be = TorchAttentionBackend(pool.k_buffers, pool.v_buffers, model.config.head_dim**-0.5)
    runner = ModelRunner(model, be, torch.device("cpu"))
    runner.pad_to_bucket = pad
    if lists == "triton":  # the graph-safe list kernel, in the Triton interpreter
        pytest.importorskip("triton")
        from llmir_lang.executor import cuda_graph

        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(cuda_graph, "_decode_lists_jit", None)
        runner.use_triton_lists = True
    rng = random.Random(1)
    reqs = [_req(i, [rng.randrange(128) for _ in range(rng.randrange(3, 30))]) for i in range(5)]
    _prefill_greedy(runner, pool, reqs)
    pad_before = pool.k_buffers[0][pool.pad_slot].clone()
    for i in range(6):
        live = reqs[: 5 - i % 3]  # batch composition changes between steps
        for r in live:
            r.kv_slots.extend(pool.alloc(1).tolist())
        step = runner.run(
            ScheduledBatch(
                ForwardMode.DECODE, live, [r.kv_len - 1 for r in live], [1] * len(live), [True] * len(live)
            )
        )
        assert step.logits.shape[0] == len(live) and step.sample_rows == list(range(len(live)))
        for r, row in zip(live, step.sample_rows):
            want = _reference_logits(model, r.fill_ids)
            torch.testing.assert_close(step.logits[row], want, rtol=1e-4, atol=1e-4)
            r.output_ids.append(int(step.logits[row].argmax()))
    assert runner.table.num_row_uploads == 5, "one upload per request, then one slot per step"
    assert runner.use_triton_lists == (lists == "triton"), "the kernel passed its first-use check"
    moved = not torch.equal(pool.k_buffers[0][pool.pad_slot], pad_before)
    assert moved == pad, "padded rows write K/V to the pad slot, and only they do"


# ---- shared prefix ---------------------------------------------------------------------------
def test_short_extends_run_the_plain_elementwise_ops() -> None:
    """``plain_extend_tokens``: an extend of at most that many tokens takes ``PLAIN_OPS`` whatever
    ``ops`` is (host-bound on a GPU, where compiled calls cost more); longer extends and every
    decode step take ``ops``."""
    import dataclasses

    from llmir_lang.executor.model import PLAIN_OPS

    model = _model()
    calls: list[str] = []

    def spy(name, fn):
        def wrapper(*args, **kw):
            calls.append(name)
            return fn(*args, **kw)

        return wrapper

    model.ops = dataclasses.replace(
        PLAIN_OPS, **{f.name: spy(f.name, getattr(PLAIN_OPS, f.name)) for f in dataclasses.fields(PLAIN_OPS)}
    )
    model.plain_extend_tokens = 10
    ids = list(range(3, 23))
    short = _reference_logits(model, ids[:10])
    assert calls == []
    long = _reference_logits(model, ids)
    assert "act" in calls and "rope" in calls
    calls.clear()
    pool = _pool(model)
    be = TorchAttentionBackend(pool.k_buffers, pool.v_buffers, model.config.head_dim**-0.5)
    slot = torch.tensor([0])
    model(ForwardBatch(ForwardMode.DECODE, torch.tensor([5]), torch.tensor([0]), slot,
                       torch.tensor([0, 1]), torch.tensor([0, 1]), slot, 1, None), be)  # fmt: skip
    assert "act" in calls
    model.ops, model.plain_extend_tokens = PLAIN_OPS, 0
    assert torch.allclose(short, _reference_logits(model, ids[:10]), atol=1e-5)
    assert torch.allclose(long, _reference_logits(model, ids), atol=1e-5)


def test_common_cached_prefix_is_the_deepest_shared_radix_node() -> None:
    pool = KVPool(1, 1, 16, 512, torch.float32, "cpu")
    cache = RadixCache(pool)
    system = list(range(100, 140))  # 40 shared tokens
    a = system + [1, 2, 3, 4]
    b = system + [1, 2, 9]
    c = system + [7]
    for ids in (a, b, c):
        m = cache.match_prefix(ids)
        slots = torch.cat([m.slots, pool.alloc(len(ids) - m.length)])
        cache.insert(ids, slots)
    reqs = []
    for i, ids in enumerate((a, b, c)):
        r = _req(i, ids)
        r.last_node = cache.match_prefix(ids).node
        reqs.append(r)
    assert common_cached_prefix(reqs) == 40
    assert common_cached_prefix(reqs[:2]) == 42
    assert common_cached_prefix(reqs[:1]) == len(a)
    reqs[2].last_node = None
    assert common_cached_prefix(reqs) == 0


@pytest.fixture()
def interpreter_env(monkeypatch):
    """Import the Triton kernel modules (if nobody has yet) the way the kernel tests need them."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _generate(
    model: CausalLM, prompts: list[list[int]], new: int, shared: bool, graphs: bool = True
) -> tuple[list, list, ModelRunner]:
    """A minimal engine loop (scheduler + runner + greedy) over a Triton backend: output ids,
    decode-step logits per request, the runner."""
    from llmir_lang.executor.triton_backend import TritonAttentionBackend

    pool = _pool(model, 2048)
    cache = RadixCache(pool)
    sched = Scheduler(pool, cache, SchedulerConfig(max_running_requests=16, min_shared_prefix=8))
    be = TritonAttentionBackend(
        pool.k_buffers, pool.v_buffers, model.config.head_dim**-0.5, max_batch_size=16
    )
    runner = ModelRunner(model, be, pool.device, shared_prefix=shared, cuda_graphs=graphs)
    reqs = [_req(i, p) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    logits_seen: list[list[torch.Tensor]] = [[] for _ in reqs]
    while sched.has_work():
        batch = sched.schedule()
        assert batch is not None
        step = runner.run(batch)
        for r, row in zip(batch.reqs, step.sample_rows):
            if row >= 0:
                if batch.mode is ForwardMode.DECODE:
                    logits_seen[r.rid].append(step.logits[row].float().cpu())
                r.output_ids.append(int(step.logits[row].argmax()))
                if len(r.output_ids) >= new:
                    r.finish_reason = "length"  # type: ignore[assignment]
        sched.after_step(batch)
        for r in batch.reqs:
            if r.finished:
                sched.finish(r)
    return [r.output_ids for r in reqs], logits_seen, runner


def test_shared_prefix_decode_matches_plain_decode(monkeypatch, interpreter_env) -> None:
    # the cost rule is calibrated for real models; let it accept this tiny one
    monkeypatch.setattr(policy, "should_use_shared_prefix", lambda p, n, b=0: p >= 16 and n >= 8)
    model = _model()
    rng = random.Random(2)
    system = [rng.randrange(128) for _ in range(40)]
    prompts = [system + [rng.randrange(128) for _ in range(rng.randrange(1, 6))] for _ in range(9)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp32 pool: the Triton backend says it uses the reference
        on, _, r_on = _generate(model, prompts, 6, shared=True)
        off, _, r_off = _generate(model, prompts, 6, shared=False)
    assert on == off
    assert r_on.num_shared_prefix_steps >= 4 and r_off.num_shared_prefix_steps == 0


def test_decode_steps_run_the_rotary_inside_the_kv_store_kernel(monkeypatch, interpreter_env) -> None:
    """Through the runner (and its shared-prefix wrapper), a bf16 decode step on the Triton backend
    runs the rotary in the KV store's kernel (``rotary_forward``), and gives the tokens and logits
    the model's own rotary then ``store_kv`` give (``fuse_rotary`` off), bit for bit."""
    from llmir_lang.kernels import triton_misc

    from llmir_lang.executor.triton_backend import TritonAttentionBackend

    model = _model(torch.bfloat16)
    rng = random.Random(5)
    prompts = [[rng.randrange(128) for _ in range(n)] for n in (3, 9, 17)]
    calls: list[int] = []
    real = triton_misc.rope_store_kv

    def spy(*args: Any) -> torch.Tensor:
        calls.append(int(args[0].shape[0]))
        return real(*args)

    monkeypatch.setattr(triton_misc, "rope_store_kv", spy)
    fused, fused_logits, _ = _generate(model, prompts, 5, shared=False, graphs=False)
    assert len(calls) >= 4 * model.config.num_layers  # every decode step, every layer
    seen = len(calls)
    monkeypatch.setattr(TritonAttentionBackend, "fuse_rotary", False)
    plain, plain_logits, _ = _generate(model, prompts, 5, shared=False, graphs=False)
    assert len(calls) == seen
    assert fused == plain
    for a, b in zip(fused_logits, plain_logits, strict=True):
        assert len(a) == len(b) >= 4 and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("plen", [0, 6])
def test_triton_decode_lists_kernel_matches_the_torch_ops(monkeypatch, plen: int) -> None:
    """The one-launch list builder (graph-safe) against the torch ops, in the Triton interpreter."""
    pytest.importorskip("triton")
    from llmir_lang.executor import cuda_graph

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cuda_graph, "_decode_lists_jit", None)  # define it under the interpreter
    g = torch.Generator().manual_seed(3)
    lens = [9, 1300, 7, 20, 0, 0, 0, 0]  # 4 requests padded to a bucket of 8
    n, bsz = 4, 8
    rows = [5, 0, 2, 7] + [0] * 4
    results = []
    for build in ("torch", "triton"):
        table = torch.randint(0, 1 << 40, (8, 1400), generator=torch.Generator().manual_seed(4))
        buf = DecodeBuffers(torch.device("cpu"), bsz, kv_capacity=4096)
        buf.ensure(bsz, sum(lens), sum(lens), plen)
        for t in (buf.kv_indptr, buf.kv_indices, buf.suffix_indptr, buf.suffix_indices):
            t.fill_(-1)
        loc = torch.randint(0, 1 << 40, (bsz,), generator=g).tolist()
        g = torch.Generator().manual_seed(3)  # same new slots for both builds
        host = [
            [1] * bsz,
            [k - 1 if k else 0 for k in lens],
            loc,
            rows,
            lens,
            [k - plen if k else 0 for k in lens],
        ]
        buf.meta.copy_(torch.tensor(host))
        total = sum(lens)
        suffix_total = total - plen * n if plen else 0
        if build == "torch":
            cuda_graph.build_decode_lists_torch(buf, table, n, bsz, rows[0], total, plen, suffix_total)
        else:
            cuda_graph.build_decode_lists_triton(buf, table, bsz, plen)
        results.append((table, buf))
    (ta, a), (tb, b) = results
    assert torch.equal(ta, tb), "the new slots land in the same table cells"
    assert torch.equal(a.kv_indptr, b.kv_indptr) and a.kv_indptr[-1] == sum(lens)
    assert torch.equal(a.kv_indices, b.kv_indices)
    if plen:
        assert torch.equal(a.suffix_indptr, b.suffix_indptr)
        assert torch.equal(a.suffix_indices, b.suffix_indices)
