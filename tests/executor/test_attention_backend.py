"""The torch backend's batched decode equals the per-request reference kernel."""

from __future__ import annotations

import pytest
import torch
from llmir_lang.kernels import reference as ref

from llmir_lang.executor.attention import ForwardBatch, ForwardMode, TorchAttentionBackend


@pytest.mark.parametrize("shared", [0, 40])
def test_batched_decode_matches_reference(shared):
    g = torch.Generator().manual_seed(0)
    slots, hkv, h, d = 300, 2, 8, 16
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
    be.prepare(batch)
    assert (be._prefix_idx is not None) == bool(shared)
    out = be.forward(q, k_new, v_new, 0)
    kb2, vb2 = kb.clone(), vb.clone()
    ref.store_kv(kb2, vb2, batch.out_cache_loc, k_new, v_new)
    want = ref.decode_attention(q, kb2, vb2, batch.kv_indptr, batch.kv_indices, d**-0.5)
    assert torch.allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("shared", [0, 40])
def test_batched_extend_matches_reference(shared):
    g = torch.Generator().manual_seed(1)
    slots, hkv, h, d = 400, 2, 8, 16
    kb = torch.randn(slots, hkv, d, generator=g)
    vb = torch.randn(slots, hkv, d, generator=g)
    # (cached tokens beyond the shared prefix, new tokens) per request
    shapes = [(0, 3), (5, 1), (2, 7), (11, 4), (1, 70)]  # the last one takes the per-request loop
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
    be = TorchAttentionBackend([kb.clone()], [vb.clone()], d**-0.5)
    be.prepare(batch)
    assert be._ext is not None and be._ext["long"] == [4]
    assert (be._ext["prefix_idx"] is not None) == bool(shared)
    out = be.forward(q, k_new, v_new, 0)
    kb2, vb2 = kb.clone(), vb.clone()
    ref.store_kv(kb2, vb2, batch.out_cache_loc, k_new, v_new)
    want = ref.extend_attention(q, kb2, vb2, batch.qo_indptr, batch.kv_indptr, batch.kv_indices, d**-0.5)
    assert torch.allclose(out, want, atol=1e-5)
