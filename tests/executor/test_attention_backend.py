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
def test_batched_extend_matches_reference(shared):
    # short extends, decode rows (one new token) and a long one (the per-request loop), mixed
    shapes = [(0, 3), (5, 1), (2, 7), (11, 4), (1, 70), (6, 1), (0, 66)]  # the last: a plain prefill
    kb, vb, batch, q, k_new, v_new = _extend_case(shapes, shared)
    be = TorchAttentionBackend([kb.clone()], [vb.clone()], q.shape[-1] ** -0.5)
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
def test_extend_groups_match_reference(shapes, shared):
    kb, vb, batch, q, k_new, v_new = _extend_case(shapes, shared, seed=7)
    be = TorchAttentionBackend([kb.clone()], [vb.clone()], q.shape[-1] ** -0.5)
    be.prepare(batch)
    assert be._long == []
    out = be.forward(q, k_new, v_new, 0)
    assert torch.allclose(out, _reference(kb, vb, batch, q, k_new, v_new), atol=1e-5)
