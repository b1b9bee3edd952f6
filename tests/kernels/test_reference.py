"""The torch reference: the cascade and lse pieces agree with plain attention; CPU dispatch."""

from __future__ import annotations

import warnings

import llmir_lang.kernels as K
import pytest
import torch
from llmir_lang.kernels import reference as ref
from llmir_lang.kernels.testing import indptr, random_pool, rel_error, slot_layout


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """One request, one query: q [H, D], k/v [N, Hkv, D] -> out [H, D], lse [H] in float64."""
    group = q.shape[0] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)  # [N, H, D]
    vv = v.double().repeat_interleave(group, 1)
    s = torch.einsum("hd,nhd->hn", q.double(), kk) * scale
    return torch.einsum("hn,nhd->hd", torch.softmax(s, -1), vv), torch.logsumexp(s, -1)


@pytest.mark.parametrize("group", [1, 4])
def test_decode_with_lse_matches_dense_math(group: int) -> None:
    g = torch.Generator().manual_seed(1)
    lengths = [1, 7, 30]
    kb, vb = random_pool(64, 2, 16, torch.float32, g)
    idx = slot_layout(lengths, 64, "random", g)
    q = torch.randn(3, 2 * group, 16, generator=g)
    out, lse = ref.decode_attention_with_lse(q, kb, vb, indptr(lengths), idx, 0.25)
    plain = ref.decode_attention(q, kb, vb, indptr(lengths), idx, 0.25)
    ip = indptr(lengths)
    for b in range(3):
        sl = idx[ip[b] : ip[b + 1]]
        o_d, l_d = _dense_attention(q[b], kb[sl], vb[sl], 0.25)
        assert rel_error(out[b], o_d) < 1e-5
        assert torch.allclose(lse[b].double(), l_d, atol=1e-5)
    assert rel_error(out, plain) < 1e-6


def test_empty_kv_gives_zero_output_and_minus_inf_lse() -> None:
    kb, vb = random_pool(8, 1, 16, torch.float32, torch.Generator().manual_seed(0))
    q = torch.randn(2, 2, 16)
    out, lse = ref.decode_attention_with_lse(q, kb, vb, indptr([0, 3]), torch.tensor([1, 2, 3]), 1.0)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


def test_merge_attention_states_equals_attention_over_union() -> None:
    g = torch.Generator().manual_seed(2)
    kb, vb = random_pool(40, 2, 16, torch.float32, g)
    q = torch.randn(1, 4, 16, generator=g)
    a, b = torch.arange(0, 13), torch.arange(13, 40)
    oa, la = ref.decode_attention_with_lse(q, kb, vb, indptr([13]), a, 0.3)
    ob, lb = ref.decode_attention_with_lse(q, kb, vb, indptr([27]), b, 0.3)
    om, lm = ref.merge_attention_states(oa, la, ob, lb)
    ou, lu = ref.decode_attention_with_lse(q, kb, vb, indptr([40]), torch.cat([a, b]), 0.3)
    assert rel_error(om, ou) < 1e-5 and torch.allclose(lm, lu, atol=1e-5)
    # An empty side changes nothing; both empty gives zeros, not nan.
    empty_o, empty_l = torch.zeros_like(oa), torch.full_like(la, float("-inf"))
    o1, l1 = ref.merge_attention_states(oa, la, empty_o, empty_l)
    assert rel_error(o1, oa) < 1e-6 and torch.equal(l1, la)
    o2, l2 = ref.merge_attention_states(empty_o, empty_l, empty_o, empty_l)
    assert not torch.isnan(o2).any() and torch.isneginf(l2).all()


@pytest.mark.parametrize("group", [1, 4, 8])
def test_shared_prefix_reference_equals_decode_over_concatenation(group: int) -> None:
    g = torch.Generator().manual_seed(3 + group)
    num_kv = 8 // group if group < 8 else 1
    kb, vb = random_pool(256, num_kv, 16, torch.float32, g)
    suffix_lens = [1, 0, 9, 20]
    slots = slot_layout([33] + suffix_lens, 256, "paged", g)
    prefix, suffix = slots[:33], slots[33:]
    q = torch.randn(4, num_kv * group, 16, generator=g)
    sp = indptr(suffix_lens)
    out = ref.shared_prefix_decode(q, kb, vb, prefix, sp, suffix, 0.2)
    lists = [torch.cat([prefix, suffix[sp[b] : sp[b + 1]]]) for b in range(4)]
    full = ref.decode_attention(q, kb, vb, indptr([len(x) for x in lists]), torch.cat(lists), 0.2)
    assert rel_error(out, full) < 1e-5


def test_cost_rule() -> None:
    # Break-even at batch x prefix = 32k tokens of 4 KiB (Llama-3-8B KV), floors of 256 and 8.
    assert K.should_use_shared_prefix(4096, 8) and K.should_use_shared_prefix(512, 64)
    assert K.should_use_shared_prefix(16384, 128)
    assert not K.should_use_shared_prefix(2048, 15) and not K.should_use_shared_prefix(256, 64)
    assert not K.should_use_shared_prefix(255, 100_000) and not K.should_use_shared_prefix(65536, 1)
    assert not K.should_use_shared_prefix(16384, 4)  # measured 0.84x: too few requests
    assert not K.should_use_shared_prefix(4096, 8, kv_bytes_per_token=2048)
    assert K.should_use_shared_prefix(4096, 16, kv_bytes_per_token=2048)


def test_cpu_dispatch_without_interpreter_is_the_reference_and_silent(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(4)
    kb, vb = random_pool(32, 2, 24, torch.float32, g)  # fp32 and head dim 24: Triton would refuse both
    q = torch.randn(2, 4, 24, generator=g)
    ip, idx = indptr([5, 9]), slot_layout([5, 9], 32, "random", g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU is the reference's home: no fallback warning
        out = K.decode_attention(q, kb, vb, ip, idx, 0.5)
        logits = torch.randn(2, 40, generator=g)
        mask = torch.randint(-(2**31), 2**31 - 1, (2, 2), dtype=torch.int32, generator=g)
        expect = logits.clone()
        ref.apply_token_bitmask(expect, mask)
        K.apply_token_bitmask(logits, mask)
    assert torch.equal(out, ref.decode_attention(q, kb, vb, ip, idx, 0.5))
    assert torch.equal(logits, expect)
