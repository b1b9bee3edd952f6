"""The torch backend's batched decode equals the per-request reference kernel."""

from __future__ import annotations

import pytest
import torch
from llmir_lang.kernels import reference as ref

from llmir_lang.executor.attention import ForwardBatch, ForwardMode, TorchAttentionBackend


@pytest.mark.parametrize("shared", [0, 40])
@pytest.mark.parametrize("flash", [True, False])  # the shared prefix through torch's CPU flash op, or matmuls
@pytest.mark.parametrize("h", [2, 8, 16])  # GQA ratios 1, 4, 8
def test_batched_decode_matches_reference(shared, flash, h):
    g = torch.Generator().manual_seed(0)
    slots, hkv, d = 300, 2, 16
    kb = torch.randn(slots, hkv, d, generator=g)
    vb = torch.randn(slots, hkv, d, generator=g)
    lens = [1, 7, 33, 2] if not shared else [3, 9, 1, 20]
    perm = torch.randperm(slots - 10, generator=g)
    prefix = perm[:shared].tolist()
    indices, indptr, loc = [], [0], []
    off = shared
    for n in lens:
        own = perm[off : off + n].tolist()
        off += n
        own = prefix + own
        indices += own
        indptr.append(len(indices))
        loc.append(own[-1])
    q = torch.randn(len(lens), h, d, generator=g)
    k_new = torch.randn(len(lens), hkv, d, generator=g)
    v_new = torch.randn(len(lens), hkv, d, generator=g)
    batch = ForwardBatch(
        mode=ForwardMode.DECODE,
        input_ids=torch.zeros(len(lens), dtype=torch.int64),
        positions=torch.tensor([shared + n - 1 for n in lens]),
        out_cache_loc=torch.tensor(loc),
        qo_indptr=torch.arange(len(lens) + 1),
        kv_indptr=torch.tensor(indptr),
        kv_indices=torch.tensor(indices),
        batch_size=len(lens),
    )
    be = TorchAttentionBackend([kb.clone()], [vb.clone()], d**-0.5)
    be.numpy_max_requests = 0  # the batched torch path (4 requests would attend in numpy)
    be.min_shared_keys = 0  # split even where it would not pay
    be._flash = flash and be._flash
    be.prepare(batch)
    assert be._dec is not None and (be._dec.prefix_idx is not None) == bool(shared)
    out = be.forward(q, k_new, v_new, 0)
    kb2, vb2 = kb.clone(), vb.clone()
    ref.store_kv(kb2, vb2, batch.out_cache_loc, k_new, v_new)
    want = ref.decode_attention(q, kb2, vb2, batch.kv_indptr, batch.kv_indices, d**-0.5)
    assert torch.allclose(out, want, atol=1e-5)


def _extend_case(shapes, shared, seed=1):
    """A pool, an extend batch of ``shapes`` ((cached tokens beyond the shared prefix, new tokens)
    per request) over a prefix of ``shared`` slots, and this step's q/k/v."""
    g = torch.Generator().manual_seed(seed)
    slots, hkv, h, d = 400, 2, 8, 16
    kb = torch.randn(slots, hkv, d, generator=g)
    vb = torch.randn(slots, hkv, d, generator=g)
    perm = torch.randperm(slots - 10, generator=g).tolist()
    prefix, off = perm[:shared], shared
    indices, kv_indptr, qo_indptr, loc = [], [0], [0], []
    for cached, new in shapes:
        own = perm[off : off + cached + new]
        off += cached + new
        indices += prefix + own
        kv_indptr.append(len(indices))
        qo_indptr.append(qo_indptr[-1] + new)
        loc += own[cached:]
    t = qo_indptr[-1]
    q = torch.randn(t, h, d, generator=g)
    k_new = torch.randn(t, hkv, d, generator=g)
    v_new = torch.randn(t, hkv, d, generator=g)
    batch = ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=torch.zeros(t, dtype=torch.int64),
        positions=torch.zeros(t, dtype=torch.int64),
        out_cache_loc=torch.tensor(loc),
        qo_indptr=torch.tensor(qo_indptr),
        kv_indptr=torch.tensor(kv_indptr),
        kv_indices=torch.tensor(indices),
        batch_size=len(shapes),
    )
    return kb, vb, batch, q, k_new, v_new


def _reference(kb, vb, batch, q, k_new, v_new):
    kb2, vb2 = kb.clone(), vb.clone()
    ref.store_kv(kb2, vb2, batch.out_cache_loc, k_new, v_new)
    d = q.shape[-1]
    return ref.extend_attention(q, kb2, vb2, batch.qo_indptr, batch.kv_indptr, batch.kv_indices, d**-0.5)


@pytest.mark.parametrize("shared", [0, 40])
@pytest.mark.parametrize("flash", [True, False])
def test_batched_extend_matches_reference(shared, flash):
    # short extends, decode rows (one new token) and a long one (the per-request loop), mixed
    shapes = [(0, 3), (5, 1), (2, 7), (11, 4), (1, 70), (6, 1), (0, 66)]  # the last: a plain prefill
    kb, vb, batch, q, k_new, v_new = _extend_case(shapes, shared)
    be = TorchAttentionBackend([kb.clone()], [vb.clone()], q.shape[-1] ** -0.5)
    be.min_shared_keys = 0
    be._flash = flash and be._flash
    be.prepare(batch)
    assert be._long == [4, 6]
    assert be._ext is not None and be._ext.q_rows.shape[0] == 3
    assert be._dec is not None and be._dec.q_rows is not None and be._dec.q_rows.tolist() == [3, 85]
    assert (be._ext.prefix_idx is not None) == bool(shared)
    assert (be._dec.prefix_idx is not None) == bool(shared)
    out = be.forward(q, k_new, v_new, 0)
    assert torch.allclose(out, _reference(kb, vb, batch, q, k_new, v_new), atol=1e-5)


@pytest.mark.parametrize(
    "shapes",
    [
        [(30, 3)],  # one request, a short extend on a cached prefix (jump-forward at batch 1)
        [(30, 1)],  # one request, one new token in an extend step
        [(10, 4), (20, 4)],  # equal lengths: no padding, the output used as it is
        [(9, 1), (3, 1), (14, 1)],  # only decode rows in an extend step
        [(0, 5)],  # a short prefill with nothing cached
    ],
)
@pytest.mark.parametrize("shared", [0, 40])
@pytest.mark.parametrize("numpy_max", [0, 4])
def test_extend_groups_match_reference(shapes, shared, numpy_max):
    kb, vb, batch, q, k_new, v_new = _extend_case(shapes, shared, seed=7)
    be = TorchAttentionBackend([kb.clone()], [vb.clone()], q.shape[-1] ** -0.5)
    be.numpy_max_requests = numpy_max  # 0: the torch groups; 4: every case here attends in numpy
    be.min_shared_keys = 0
    be.prepare(batch)
    assert (be.numpy_plan is not None) == bool(numpy_max)
    assert be._long == []
    out = be.forward(q, k_new, v_new, 0)
    assert torch.allclose(out, _reference(kb, vb, batch, q, k_new, v_new), atol=1e-5)


@pytest.mark.parametrize("saved", [159, 160])
def test_shared_prefix_split_only_where_it_saves_enough_reads(saved):
    # 4 requests over a 40-token prefix save 160 key reads: split from min_shared_keys 160 down
    shapes = [(2, 3), (5, 2), (0, 4), (3, 2)]
    kb, vb, batch, q, k_new, v_new = _extend_case(shapes, 40)
    be = TorchAttentionBackend([kb.clone()], [vb.clone()], q.shape[-1] ** -0.5)
    be.numpy_max_requests = 0
    be.min_shared_keys = 320 - saved  # 161: no split; 160: split
    be.prepare(batch)
    split = be.min_shared_keys <= 160
    assert be._ext is not None and (be._ext.prefix_idx is not None) == split
    out = be.forward(q, k_new, v_new, 0)
    assert torch.allclose(out, _reference(kb, vb, batch, q, k_new, v_new), atol=1e-5)
    assert TorchAttentionBackend.min_shared_keys > 160  # the default leaves a prefix this small whole


@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("consecutive", [True, False])
@pytest.mark.parametrize("new", [1, 3, 16])
def test_numpy_path_matches_reference(gqa, consecutive, new):
    # one request (the sequential case): keys as a slice of the pool, or gathered
    g = torch.Generator().manual_seed(gqa * 100 + new)
    slots, hkv, d, cached = 200, 2, 16, 37
    kb = torch.randn(slots, hkv, d, generator=g)
    vb = torch.randn(slots, hkv, d, generator=g)
    own = list(range(50, 50 + cached + new))
    if not consecutive:
        own = torch.randperm(slots, generator=g)[: cached + new].tolist()
    t = new
    batch = ForwardBatch(
        mode=ForwardMode.DECODE if new == 1 else ForwardMode.EXTEND,
        input_ids=torch.zeros(t, dtype=torch.int64),
        positions=torch.arange(cached, cached + new),
        out_cache_loc=torch.tensor(own[cached:]),
        qo_indptr=torch.tensor([0, t]),
        kv_indptr=torch.tensor([0, len(own)]),
        kv_indices=torch.tensor(own),
        batch_size=1,
    )
    q = torch.randn(t, hkv * gqa, d, generator=g)
    k_new = torch.randn(t, hkv, d, generator=g)
    v_new = torch.randn(t, hkv, d, generator=g)
    be = TorchAttentionBackend([kb.clone()], [vb.clone()], d**-0.5)
    be.prepare(batch)
    assert be.numpy_plan is not None and (be.numpy_plan.reqs[0].start >= 0) == consecutive
    out = be.forward(q, k_new, v_new, 0)
    want = _reference(kb, vb, batch, q, k_new, v_new)
    assert torch.allclose(out, want, atol=1e-5)
    # the arrays entry point (the CPU forward's) stores the same K/V and gives the same output
    be2 = TorchAttentionBackend([kb.clone()], [vb.clone()], d**-0.5)
    be2.prepare(batch)
    assert be2.numpy_plan is not None
    out2 = be2.numpy_plan.forward(q.numpy(), k_new.numpy(), v_new.numpy(), 0)
    assert torch.equal(torch.from_numpy(out2), out)
    assert torch.equal(be2.k_buffers[0], be.k_buffers[0]) and torch.equal(be2.v_buffers[0], be.v_buffers[0])


def test_numpy_path_applies_only_to_small_fp32_steps():
    shapes = [(3, 2), (4, 1), (0, 3), (2, 2), (1, 1)]
    kb, vb, batch, q, k_new, v_new = _extend_case(shapes, 0)
    be = TorchAttentionBackend([kb.clone()], [vb.clone()], q.shape[-1] ** -0.5)
    be.prepare(batch)  # five requests: more than the speculative batch
    assert be.numpy_plan is None
    kb, vb, batch, q, k_new, v_new = _extend_case([(3, 2), (0, 70)], 0)
    be = TorchAttentionBackend([kb.clone()], [vb.clone()], q.shape[-1] ** -0.5)
    be.prepare(batch)  # a prompt longer than max_padded_extend: the fused kernel
    assert be.numpy_plan is None and be._long == [1]
    kb, vb, batch, q, k_new, v_new = _extend_case([(3, 2)], 0)
    be = TorchAttentionBackend([kb.to(torch.bfloat16)], [vb.to(torch.bfloat16)], q.shape[-1] ** -0.5)
    be.prepare(batch)  # a bf16 pool
    assert be.numpy_plan is None
