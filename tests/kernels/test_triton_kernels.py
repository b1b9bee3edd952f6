"""Every Triton kernel against its torch reference, on the CPU under ``TRITON_INTERPRET=1``.

Tiny shapes (head dims 16/32, lengths <= 40, tiles of 16) so that the interpreter stays fast while
the inputs still cover ragged batches, length 1, lengths that cross tiles and 16-slot pages, and
GQA ratios 1, 4 and 8. The same checks at real shapes run on a GPU in test_triton_kernels_gpu.py.
"""

from __future__ import annotations

import dataclasses
import warnings

import llmir_lang.kernels as K
import pytest
import torch
from llmir_lang.kernels import reference as ref
from llmir_lang.kernels import support
from llmir_lang.kernels.testing import indptr, random_pool, rel_error, slot_layout

pytestmark = pytest.mark.usefixtures("triton_interpreter")

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _batch(lengths, num_kv, group, head_dim, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    num_slots = 16 * (sum((n + 15) // 16 for n in lengths) + 4)
    kb, vb = random_pool(num_slots, num_kv, head_dim, dtype, g)
    idx = slot_layout(lengths, num_slots, layout, g)
    q = torch.randn(len(lengths), num_kv * group, head_dim, generator=g).to(dtype)
    return q, kb, vb, indptr(lengths), idx


# Every GQA ratio with both dtypes; the two slot layouts alternate so each dtype sees both.
CASES = [
    (1, torch.float16, "paged"),
    (1, torch.bfloat16, "random"),
    (4, torch.float16, "random"),
    (4, torch.bfloat16, "paged"),
    (8, torch.float16, "paged"),
    (8, torch.bfloat16, "random"),
]


@pytest.mark.parametrize(("group", "dtype", "layout"), CASES)
def test_decode_attention(group: int, dtype: torch.dtype, layout: str) -> None:
    lengths = [1, 17, 40, 16, 33]  # 1 token, one past a page, several tiles, exactly one page
    num_kv = 1 if group == 8 else 2
    head_dim = 32 if group == 4 else 16
    q, kb, vb, ip, idx = _batch(lengths, num_kv, group, head_dim, dtype, layout, seed=10 + group)
    out, lse = K.decode_attention_with_lse(q, kb, vb, ip, idx, head_dim**-0.5)
    expect, expect_lse = ref.decode_attention_with_lse(q, kb, vb, ip, idx, head_dim**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_error(out, expect) < TOL[dtype]
    assert torch.allclose(lse, expect_lse, atol=1e-3)
    assert rel_error(K.decode_attention(q, kb, vb, ip, idx, head_dim**-0.5), expect) < TOL[dtype]


def test_decode_large_batch_takes_the_direct_path() -> None:
    # 17 requests x 2 KV heads fill the (CPU stand-in) grid: one split each, no merge launch.
    from llmir_lang.kernels import triton_decode

    lengths = [1 + (7 * i) % 20 for i in range(17)]
    q, kb, vb, ip, idx = _batch(lengths, 2, 2, 16, torch.float16, "paged", seed=50)
    assert triton_decode.split_cap(17, 2, triton_decode.default_decode_config(16, q.device), q.device) == 1
    out, lse = K.decode_attention_with_lse(q, kb, vb, ip, idx, 0.25)
    expect, expect_lse = ref.decode_attention_with_lse(q, kb, vb, ip, idx, 0.25)
    assert rel_error(out, expect) < TOL[torch.float16]
    assert torch.allclose(lse, expect_lse, atol=1e-3)


def _split_config(one_launch: bool, block_n: int = 16):
    from llmir_lang.kernels import triton_decode as td

    # programs_per_sm is raised so that these small batches still get the full 4 splits; the
    # one-launch merge takes its splits 1 (group 8), 2 (group 4) or 4 (group 1) at a time.
    return td.DecodeConfig(
        block_n=block_n,
        num_warps=1,
        num_stages=1,
        max_splits=4,
        min_chunk=16,
        programs_per_sm=64,
        one_launch=one_launch,
        merge_tile=128,
    )


def _poisoned_workspace(bsz: int, num_heads: int, head_dim: int):
    """A workspace whose partials read as nan (+inf lse): a merge that reads a slot no split wrote
    returns nan instead of a plausible number."""
    from llmir_lang.kernels import triton_decode as td

    ws = td.alloc_partials(bsz, num_heads, 4, head_dim, torch.device("cpu"))
    ws.part_o.fill_(float("nan"))
    ws.part_lse.fill_(float("inf"))
    return ws


# 0 keys, 1 key, one past a page, exactly one page, 2-4 splits, a length that hits the split cap.
MERGE_LENGTHS = [0, 1, 17, 40, 16, 33, 64, 3]


@pytest.mark.parametrize("one_launch", [True, False], ids=["one_launch", "two_launch"])
@pytest.mark.parametrize(
    ("group", "dtype", "layout"),
    [(1, torch.float16, "paged"), (4, torch.bfloat16, "random"), (8, torch.float16, "paged")],
)
def test_decode_split_merge_variants(group: int, dtype: torch.dtype, layout: str, one_launch: bool) -> None:
    from llmir_lang.kernels import triton_decode as td

    num_kv = 1 if group == 8 else 2
    q, kb, vb, ip, idx = _batch(MERGE_LENGTHS, num_kv, group, 16, dtype, layout, seed=90 + group)
    bsz, num_heads, head_dim = q.shape
    cfg = _split_config(one_launch)
    assert td.split_cap(bsz, num_kv, cfg, q.device) == 4
    ws = _poisoned_workspace(bsz, num_heads, head_dim)
    out = torch.full_like(q, float("nan"))  # every element must be written
    _, lse = td.decode_attention(q, kb, vb, ip, idx, 0.25, return_lse=True, workspace=ws, out=out, config=cfg)
    expect, expect_lse = ref.decode_attention_with_lse(q, kb, vb, ip, idx, 0.25)
    assert rel_error(out, expect) < TOL[dtype]
    assert torch.allclose(lse, expect_lse, atol=1e-3)  # -inf for the empty request
    assert not out[0].any()  # no keys: output 0, never nan
    if one_launch:
        assert not ws.counters.any()  # the launch leaves its counters at 0 for the next one
    # The same workspace again, without lse: same numbers bit for bit.
    again = td.decode_attention(q, kb, vb, ip, idx, 0.25, workspace=ws, config=cfg)
    assert torch.equal(again, out)


@pytest.mark.parametrize("one_launch", [True, False], ids=["one_launch", "two_launch"])
def test_decode_split_left_empty_by_tile_rounding(one_launch: bool) -> None:
    # 32-key tiles, 16-key chunks: 40 keys take 3 splits of 32, 32 and 0 keys; the empty split
    # inside the request's split count must count as arrived and weigh nothing.
    from llmir_lang.kernels import triton_decode as td

    lengths = [40, 70, 5, 96]
    q, kb, vb, ip, idx = _batch(lengths, 2, 4, 16, torch.bfloat16, "paged", seed=95)
    ws = _poisoned_workspace(len(lengths), 8, 16)
    cfg = _split_config(one_launch, block_n=32)
    out, lse = td.decode_attention(q, kb, vb, ip, idx, 0.3, return_lse=True, workspace=ws, config=cfg)
    expect, expect_lse = ref.decode_attention_with_lse(q, kb, vb, ip, idx, 0.3)
    assert rel_error(out, expect) < TOL[torch.bfloat16]
    assert torch.allclose(lse, expect_lse, atol=1e-3)
    if one_launch:
        assert not ws.counters.any()


def test_decode_one_launch_needs_counters_in_the_workspace() -> None:
    from llmir_lang.kernels import triton_decode as td

    q, kb, vb, ip, idx = _batch([20, 33], 2, 2, 16, torch.float16, "paged", seed=96)
    expect = ref.decode_attention(q, kb, vb, ip, idx, 0.25)
    pair = td.alloc_partials(2, 4, 4, 16, q.device, with_counters=False)
    assert pair.counters is None
    with pytest.raises(ValueError, match="with_counters=True"):
        td.decode_attention(q, kb, vb, ip, idx, 0.25, workspace=pair, config=_split_config(True))
    # Forced two launches, or the default rule without counters: the plain pair is enough.
    plain = (pair.part_o, pair.part_lse)
    for cfg in (_split_config(False), td.DecodeConfig(block_n=16, num_warps=1, num_stages=1, max_splits=4)):
        out = td.decode_attention(q, kb, vb, ip, idx, 0.25, workspace=plain, config=cfg)
        assert rel_error(out, expect) < TOL[torch.float16]


def test_merge_in_split_kernel_rule() -> None:
    from llmir_lang.kernels import triton_decode as td

    auto = td.DecodeConfig()
    assert auto.one_launch is None and auto.one_launch_min_splits == 3
    # The H100 numbers: one launch from 3 splits up, two launches at 2 (1: no merge at all).
    assert [td.merge_in_split_kernel(auto, s) for s in (2, 3, 5, 32)] == [False, True, True, True]
    assert not td.merge_in_split_kernel(auto, 8, has_counters=False)
    forced = td.DecodeConfig(one_launch=True)
    assert td.merge_in_split_kernel(forced, 2) and td.merge_in_split_kernel(forced, 2, has_counters=False)
    assert not td.merge_in_split_kernel(td.DecodeConfig(one_launch=False), 32)


def test_small_batches_split_into_shorter_slices() -> None:
    """Batches of at most ``small_batch`` requests split at ``small_batch_min_chunk`` tokens (more
    programs on a latency-bound call), larger ones at ``min_chunk``; both give the reference's
    numbers (tiny shapes: a 64-token request takes 4 splits at batch 1 and 1 at batch 5)."""
    from llmir_lang.kernels import triton_decode as td

    auto = td.DecodeConfig()
    assert [auto.min_chunk_for(b) for b in (1, 4, 5, 64)] == [128, 128, 256, 256]
    cfg = td.DecodeConfig(block_n=16, num_warps=1, num_stages=1, max_splits=4, min_chunk=64, small_batch_min_chunk=16)
    assert cfg.min_chunk_for(1) == 16 and cfg.min_chunk_for(5) == 64
    g = torch.Generator().manual_seed(11)
    kb, vb = random_pool(400, 2, 16, torch.float16, g)
    for bsz in (1, 5):
        lens = [64] * bsz
        idx = slot_layout(lens, 400, "random", g)
        q = torch.randn(bsz, 4, 16, generator=g).to(torch.float16)
        out = td.decode_attention(q, kb, vb, indptr(lens), idx, 0.25, config=cfg)
        assert rel_error(out, ref.decode_attention(q, kb, vb, indptr(lens), idx, 0.25)) < TOL[torch.float16]


@pytest.mark.parametrize(("group", "dtype", "layout"), CASES)
def test_extend_attention(group: int, dtype: torch.dtype, layout: str) -> None:
    # (new tokens, cached prefix): plain prefill, one token over a prefix, ragged, page crossings.
    shapes = [(1, 0), (17, 9), (40, 0), (5, 35), (16, 16)]
    qo_lens = [a for a, _ in shapes]
    kv_lens = [a + p for a, p in shapes]
    num_kv = 1 if group != 1 else 2
    q, kb, vb, kv_ip, idx = _batch(kv_lens, num_kv, group, 16, dtype, layout, seed=20 + group)
    g = torch.Generator().manual_seed(30 + group)
    q = torch.randn(sum(qo_lens), num_kv * group, 16, generator=g).to(dtype)
    qo_ip = indptr(qo_lens)
    out = K.extend_attention(q, kb, vb, qo_ip, kv_ip, idx, 0.25)
    expect = ref.extend_attention(q, kb, vb, qo_ip, kv_ip, idx, 0.25)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_error(out, expect) < TOL[dtype]


def _new_kv_case(shapes, num_kv, group, head_dim, dtype, layout, seed, fused):
    """An extend batch whose new tokens' K/V come as ``k_new``/``v_new``: strided views into one
    fused ``[T, (H + 2 Hkv) * D]`` tensor (the model's layout) if ``fused``, else contiguous.

    Returns (q, pool for the kernel, pool for the reference, k_new, v_new, qo_ip, kv_ip, slots).
    The kernel's pool holds nan at the new tokens' slots and the reference's pool holds k_new /
    v_new there: the k_new path must read the new keys from k_new and only the prefix from the pool.
    """
    qo_lens, kv_lens = [a for a, _ in shapes], [a + p for a, p in shapes]
    q, kb, vb, kv_ip, idx = _batch(kv_lens, num_kv, group, head_dim, dtype, layout, seed)
    g = torch.Generator().manual_seed(seed + 1)
    t, h = sum(qo_lens), num_kv * group
    q = torch.randn(t, h, head_dim, generator=g).to(dtype)
    if fused:
        qkv = torch.randn(t, (h + 2 * num_kv) * head_dim, generator=g).to(dtype)
        k_new = qkv[:, h * head_dim : (h + num_kv) * head_dim].view(t, num_kv, head_dim)
        v_new = qkv[:, (h + num_kv) * head_dim :].view(t, num_kv, head_dim)
    else:
        k_new = torch.randn(t, num_kv, head_dim, generator=g).to(dtype)
        v_new = torch.randn(t, num_kv, head_dim, generator=g).to(dtype)
    new_slots = torch.cat([idx[kv_ip[b + 1] - n : kv_ip[b + 1]] for b, n in enumerate(qo_lens)])
    kr, vr = kb.clone(), vb.clone()
    ref.store_kv(kr, vr, new_slots, k_new, v_new)
    kb[new_slots] = float("nan")
    vb[new_slots] = float("nan")
    return q, (kb, vb), (kr, vr), k_new, v_new, indptr(qo_lens), kv_ip, idx


# (new tokens, cached prefix): prefix 0, 1 token, prefixes ending mid-tile and mid-page (9, 35),
# on a page (16), blocks of new tokens crossing tile borders (40, 33, 17).
NEW_KV_SHAPES = [(1, 0), (17, 9), (40, 0), (5, 35), (16, 16), (33, 7), (1, 20)]
# GQA ratio -> (dtype, layout, fused qkv views, (block_m, block_n)): 32x16 puts two diagonal
# tiles in a block; 16x32 has block_m not a multiple of block_n (unmasked new tiles end before m0).
NEW_KV_CASES = {
    1: (torch.float16, "paged", False, (16, 16)),
    4: (torch.bfloat16, "random", True, (32, 16)),
    8: (torch.float16, "paged", True, (16, 32)),
}


@pytest.mark.parametrize("loads", ["pointer", "descriptor"])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_extend_new_kv(group: int, loads: str) -> None:
    from llmir_lang.kernels import triton_extend as te

    dtype, layout, fused, (bm, bn) = NEW_KV_CASES[group]
    num_kv = 1 if group == 8 else 2
    head_dim = 32 if group == 4 else 16
    q, (kb, vb), (kr, vr), k_new, v_new, qo_ip, kv_ip, idx = _new_kv_case(
        NEW_KV_SHAPES, num_kv, group, head_dim, dtype, layout, seed=60 + group, fused=fused
    )
    assert te._loads_for(k_new, loads) == loads  # the variant under test really runs
    cfg = te.ExtendConfig(block_m=bm, block_n=bn, num_warps=1, num_stages=1, new_kv_loads=loads)
    out = te.extend_attention(q, kb, vb, qo_ip, kv_ip, idx, 0.25, config=cfg, k_new=k_new, v_new=v_new)
    expect = ref.extend_attention(q, kr, vr, qo_ip, kv_ip, idx, 0.25)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_error(out, expect) < TOL[dtype]


def test_extend_new_kv_heads_apart_falls_back_to_pointer_loads() -> None:
    # Keys of a [T, Hkv, 2, D] tensor, one head every 2 * D: no [T, Hkv * D] view for the
    # descriptor, so the launch takes pointer loads; so it does for a misaligned base. Also: the
    # k_new path's own tile shape (new_kv_block_n / warps) differs from the gathered one here.
    from llmir_lang.kernels import triton_extend as te

    q, (kb, vb), (kr, vr), k_new, v_new, qo_ip, kv_ip, idx = _new_kv_case(
        [(20, 5), (3, 0)], 2, 2, 16, torch.float16, "paged", seed=70, fused=False
    )
    wide_k = torch.zeros(k_new.shape[0], 2, 2, 16, dtype=k_new.dtype)
    wide_k[:, :, 1] = k_new
    k_apart = wide_k[:, :, 1]
    assert te._loads_for(k_apart, "descriptor") == "pointer"
    misaligned = torch.zeros(k_new.numel() + 1, dtype=k_new.dtype)[1:].view(k_new.shape)  # 2-byte offset
    assert te._loads_for(misaligned, "descriptor") == "pointer"
    assert te._loads_for(k_new, "descriptor") == "descriptor"
    expect = ref.extend_attention(q, kr, vr, qo_ip, kv_ip, idx, 0.3)
    cfg = te.ExtendConfig(
        block_m=32, block_n=16, num_warps=1, num_stages=1, new_kv_loads="descriptor", new_kv_block_n=32
    )
    out = te.extend_attention(q, kb, vb, qo_ip, kv_ip, idx, 0.3, config=cfg, k_new=k_apart, v_new=v_new)
    assert rel_error(out, expect) < TOL[torch.float16]


def test_extend_new_kv_dispatch_and_checks() -> None:
    from llmir_lang.kernels import triton_extend as te

    q, (kb, vb), (kr, vr), k_new, v_new, qo_ip, kv_ip, idx = _new_kv_case(
        [(9, 4), (12, 0)], 2, 2, 16, torch.float16, "random", seed=80, fused=True
    )
    expect = ref.extend_attention(q, kr, vr, qo_ip, kv_ip, idx, 0.25)
    # The package-level wrapper forwards k_new/v_new to the kernel (the pool holds nan there).
    assert rel_error(K.extend_attention(q, kb, vb, qo_ip, kv_ip, idx, 0.25, k_new, v_new), expect) < 2e-3
    # In another dtype they cannot equal the pool's values: the wrapper reads the pool instead.
    out = K.extend_attention(q, kr, vr, qo_ip, kv_ip, idx, 0.25, k_new.float(), v_new.float())
    assert rel_error(out, expect) < 2e-3
    with pytest.raises(ValueError, match="together"):
        te.extend_attention(q, kb, vb, qo_ip, kv_ip, idx, 0.25, k_new=k_new)
    with pytest.raises(ValueError, match="k_new must be"):
        te.extend_attention(q, kb, vb, qo_ip, kv_ip, idx, 0.25, k_new=k_new[:-1], v_new=v_new[:-1])
    with pytest.raises(ValueError, match="new_kv_loads"):
        te.ExtendConfig(new_kv_loads="block_ptr")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_shared_prefix_decode(group: int, dtype: torch.dtype) -> None:
    suffix_lens = [1, 0, 9, 20, 3]
    num_kv = 1 if group == 8 else 2
    layout = "paged" if dtype == torch.float16 else "random"
    q, kb, vb, _, slots = _batch([37] + suffix_lens, num_kv, group, 16, dtype, layout, seed=40 + group)
    q = q[1:]
    prefix, suffix = slots[:37], slots[37:]
    sp = indptr(suffix_lens)
    out = K.shared_prefix_decode(q, kb, vb, prefix, sp, suffix, 0.25)
    lists = [torch.cat([prefix, suffix[sp[b] : sp[b + 1]]]) for b in range(len(suffix_lens))]
    plain = ref.decode_attention(q, kb, vb, indptr([len(x) for x in lists]), torch.cat(lists), 0.25)
    assert out.dtype == dtype
    assert rel_error(out, plain) < TOL[dtype]
    assert rel_error(out, ref.shared_prefix_decode(q, kb, vb, prefix, sp, suffix, 0.25)) < TOL[dtype]


def test_shared_prefix_decode_merges_many_prefix_splits_in_rounds() -> None:
    """19 prefix partials at head dim 64: the suffix kernel folds them in three rounds of 8."""
    from llmir_lang.kernels import triton_decode, triton_shared_prefix

    suffix_lens = [2, 0, 11, 5]
    q, kb, vb, _, slots = _batch([300] + suffix_lens, 2, 4, 64, torch.bfloat16, "paged", seed=77)
    q = q[1:]
    prefix, suffix = slots[:300], slots[300:]
    sp = indptr(suffix_lens)
    base = triton_shared_prefix.default_shared_prefix_config(64, q.device)
    cfg = dataclasses.replace(base, max_prefix_splits=32, min_chunk=16, programs_per_sm=64)
    assert triton_shared_prefix.prefix_splits(300, 16, 2, cfg, q.device) == 19
    assert triton_decode.pre_chunk(19, 16, 64) == 8
    out = triton_shared_prefix.shared_prefix_decode(q, kb, vb, prefix, sp, suffix, 0.125, config=cfg)
    expect = ref.shared_prefix_decode(q, kb, vb, prefix, sp, suffix, 0.125)
    assert rel_error(out, expect) < TOL[torch.bfloat16]


@pytest.mark.parametrize(
    ("src_dtype", "pool_dtype"),
    [(torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
def test_store_kv_from_a_strided_view(src_dtype: torch.dtype, pool_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(7, 3, 2, 16, generator=g).to(src_dtype)  # k, v: strided views of a fused qkv
    k, v = qkv[:, 1], qkv[:, 2]
    kb = torch.zeros(40, 2, 16, dtype=pool_dtype)
    vb = torch.zeros(40, 2, 16, dtype=pool_dtype)
    kr, vr = kb.clone(), vb.clone()
    loc = torch.randperm(40, generator=g)[:7]
    K.store_kv(kb, vb, loc, k, v)
    ref.store_kv(kr, vr, loc, k, v)
    if (src_dtype, pool_dtype) == (torch.float32, torch.bfloat16):
        # The CPU interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: allow 1 ulp.
        assert torch.allclose(kb.float(), kr.float(), rtol=2**-7, atol=0)
        assert torch.allclose(vb.float(), vr.float(), rtol=2**-7, atol=0)
        untouched = torch.ones(40, dtype=torch.bool)
        untouched[loc] = False
        assert not kb[untouched].any() and not vb[untouched].any()
    else:
        assert torch.equal(kb, kr) and torch.equal(vb, vr)


def _rope_inputs(t: int, h: int, hkv: int, d: int, dtype: torch.dtype, seed: int):
    """A fused qkv row per token and the rotary tables ``Rotary.tables`` makes (``[T, 1, D]``,
    sign-folded sine) for random positions."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 5000, (t,), generator=g).float()
    freqs = pos[:, None] * 10000.0 ** (-torch.arange(0, d, 2).float() / d)[None, :]
    c, s_ = freqs.cos(), freqs.sin()
    cos = torch.cat((c, c), -1).to(dtype).unsqueeze(1)
    sin = torch.cat((-s_, s_), -1).to(dtype).unsqueeze(1)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g).to(dtype)
    return qkv, cos, sin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("h", "hkv", "d", "t"), [(4, 4, 16, 3), (8, 2, 32, 1), (8, 1, 64, 5), (16, 2, 16, 2)])
def test_rope_store_kv_gives_the_models_rotary_and_store_bits(dtype, h, hkv, d, t) -> None:
    """The decode step's fused rotary + KV store equals the model's ``rope_qkv`` (each product and
    the sum rounded to the dtype, as torch and Hugging Face round) then ``store_kv``, bit for bit;
    GQA ratios 1, 4, 8; slots nowhere near the tokens' order; other slots untouched."""
    from llmir_lang.kernels import triton_misc

    from llmir_lang.executor.model import rope_qkv

    qkv, cos, sin = _rope_inputs(t, h, hkv, d, dtype, seed=h * d + t)
    loc = torch.randperm(64, generator=torch.Generator().manual_seed(t))[:t]
    kb, vb = torch.zeros(64, hkv, d, dtype=dtype), torch.zeros(64, hkv, d, dtype=dtype)
    kr, vr = kb.clone(), vb.clone()
    q = triton_misc.rope_store_kv(qkv, cos, sin, h, kb, vb, loc)
    q_m, k_m, v_m = rope_qkv(qkv, cos, sin, h, hkv, None, None, 1e-6)
    ref.store_kv(kr, vr, loc, k_m, v_m)
    assert q.shape == (t, h, d) and torch.equal(q, q_m)
    assert torch.equal(kb, kr) and torch.equal(vb, vr)
    assert torch.equal(ref.rope_store_kv(qkv, cos, sin, h, kr.clone(), vr.clone(), loc), q)
    assert triton_misc.rope_store_kv(qkv[:0], cos[:0], sin[:0], h, kb, vb, loc[:0]).shape == (0, h, d)


def test_apply_token_bitmask() -> None:
    g = torch.Generator().manual_seed(6)
    vocab = 100  # not a multiple of 32: the last word is partly unused
    logits = torch.randn(3, vocab, generator=g)
    mask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=g)
    mask[1] = -1  # all allowed
    mask[2] = 0  # none allowed
    expect = logits.clone()
    ref.apply_token_bitmask(expect, mask)
    K.apply_token_bitmask(logits, mask)
    assert torch.equal(logits, expect)
    assert torch.isfinite(logits[1]).all() and torch.isneginf(logits[2]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("bsz", "vocab", "width"), [(1, 1000, 1000), (3, 517, 600), (5, 33, 40), (2, 16, 16)]
)
def test_greedy_tokens(dtype, bsz, vocab, width) -> None:
    g = torch.Generator().manual_seed(bsz * 31 + vocab)
    logits = torch.randn(bsz, width, generator=g)
    logits[0, 5] = logits[0, vocab - 1] = 50.0  # a tie across chunks: the first index wins
    if bsz > 1:
        logits[1] = float("-inf")  # every token masked: -1
    if bsz > 2:
        logits[2, vocab:] = 1e9  # columns past the vocabulary (padding) are never picked
        logits[2, 7] = logits[2, 9] = 40.0  # a tie inside one tile
    if bsz > 3:
        logits[3, vocab // 2] = logits[3, vocab - 2] = float("nan")  # the first NaN, as torch.argmax
    logits = logits.to(dtype)
    got = K.greedy_tokens(logits, vocab)
    assert got.dtype == torch.int64
    assert torch.equal(got, ref.greedy_tokens(logits, vocab))
    assert got[0].item() == 5 and (bsz < 2 or got[1].item() == -1) and (bsz < 3 or got[2].item() == 7)
    assert bsz < 4 or got[3].item() == vocab // 2


def test_unsupported_head_dim_and_dtype_fall_back_once_with_correct_numbers() -> None:
    support._warned.clear()
    g = torch.Generator().manual_seed(7)
    for head_dim, dtype, needle in [(24, torch.float16, "head dim 24"), (16, torch.float32, "float32")]:
        kb, vb = random_pool(32, 2, head_dim, dtype, g)
        q = torch.randn(2, 4, head_dim, generator=g).to(dtype)
        ip, idx = indptr([3, 11]), slot_layout([3, 11], 32, "random", g)
        with pytest.warns(K.KernelFallbackWarning, match=needle):
            out = K.decode_attention(q, kb, vb, ip, idx, 0.3)
        assert torch.equal(out, ref.decode_attention(q, kb, vb, ip, idx, 0.3))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call is silent
            K.decode_attention(q, kb, vb, ip, idx, 0.3)


def test_extend_config_for_picks_small_tiles_only_for_short_mostly_new_batches_on_cuda() -> None:
    from llmir_lang.kernels import triton_extend as te

    base = te.ExtendConfig()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert te.extend_config_for(base, cuda, 4096, 0) is te.SMALL_EXTEND_CONFIG
    assert te.extend_config_for(base, cuda, te.SMALL_EXTEND_TOKENS + 1, 0) is base
    assert te.extend_config_for(base, cuda, 1024, 4096) is base  # mostly cached prefix
    assert te.extend_config_for(base, cpu, 4096, 0) is base  # the interpreter keeps tiny tiles


# ---- projections (triton_gemv) ---------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("n", [64, 100])  # 100: the last program's rows are masked
def test_gemv_matches_linear(rows: int, n: int) -> None:
    from llmir_lang.kernels import triton_gemv as tg

    g = torch.Generator().manual_seed(rows * 1000 + n)
    k = 512
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), w.float())
    for cfg in (tg.GemvConfig(1, 256, 4, 3), tg.GemvConfig(4, 512, 4, 1), tg.GemvConfig(8, 256, 4, 1)):
        out = torch.full((rows, n), float("nan"), dtype=torch.bfloat16)
        tg.gemv(x, w, out, cfg)
        assert rel_error(out, want) < 1e-2, cfg


@pytest.mark.parametrize("rows", [5, 16, 40])
def test_skinny_matches_linear(rows: int) -> None:
    # fp16: the interpreter's bf16 dot is wrong (numpy has no bf16); bf16 is checked on the GPU
    from llmir_lang.kernels import triton_gemv as tg

    g = torch.Generator().manual_seed(rows)
    n, k = 100, 256
    x = torch.randn(rows, k, generator=g).to(torch.float16)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.float16)
    want = torch.nn.functional.linear(x.float(), w.float())
    for cfg in (tg.SkinnyConfig(16, 32, 64, 4, 3), tg.SkinnyConfig(32, 64, 128, 4, 2)):
        out = torch.full((rows, n), float("nan"), dtype=torch.float16)
        tg.skinny(x, w, out, cfg)
        assert rel_error(out, want) < 2e-3, cfg


def test_linear_plan_and_cpu_dispatch() -> None:
    from llmir_lang.kernels import triton_gemv as tg

    w_layer = torch.empty(4096, 4096, dtype=torch.bfloat16)
    w_head = torch.empty(128256, 4096, dtype=torch.bfloat16)
    one, some, many = (torch.empty(m, 4096, dtype=torch.bfloat16) for m in (1, 4, 64))
    assert tg.plan(one, w_layer) == tg.GemvConfig(1, 1024, 4, 3)
    assert tg.plan(one, w_head) == tg.GemvConfig(4, 1024, 4, 3)
    assert tg.plan(some, w_head) is None  # 2-8 rows: cuBLAS
    assert tg.plan(many, w_layer) is None  # a layer's projection at 64 rows: cuBLAS
    assert isinstance(tg.plan(many, w_head), tg.SkinnyConfig)
    assert (
        tg.plan(torch.empty(1, 100, dtype=torch.bfloat16), torch.empty(8, 100, dtype=torch.bfloat16)) is None
    )
    # CPU tensors (and a bias) go to F.linear
    x = torch.randn(1, 64)
    w, b = torch.randn(32, 64), torch.randn(32)
    assert torch.equal(K.linear(x, w, b), torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("n", [64, 100])
def test_norm_gemv_matches_add_rms_norm_then_linear(with_residual: bool, n: int) -> None:
    from llmir_lang.kernels import triton_gemv as tg

    from llmir_lang.executor.model import add_rms_norm, rms_norm

    g = torch.Generator().manual_seed(n + with_residual)
    k, dt = 512, torch.bfloat16
    x = torch.randn(1, k, generator=g).to(dt)
    res = torch.randn(1, k, generator=g).to(dt) if with_residual else None
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(dt)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dt)
    h, want_res = add_rms_norm(x, res, nw, 1e-5) if res is not None else (rms_norm(x, nw, 1e-5), x)
    out, got_res = tg.norm_gemv(x, res, nw, 1e-5, w, tg.GemvConfig(4, 256, 4, 1))
    # the interpreter rounds bf16 its own way (numpy has none): within one bf16 step here, exact on
    # the GPU (test_triton_kernels_gpu.py)
    assert torch.allclose(got_res.float(), want_res.float(), rtol=8e-3, atol=0)
    # 2e-2: the interpreter's bf16 casts of the normalized row truncate (1.5e-2 on the GPU)
    assert rel_error(out, torch.nn.functional.linear(h.float(), w.float())) < 2e-2


def test_silu_gemv_matches_silu_mul_then_linear() -> None:
    from llmir_lang.kernels import triton_gemv as tg

    from llmir_lang.executor.model import silu_mul

    g = torch.Generator().manual_seed(3)
    k, n, dt = 512, 100, torch.bfloat16
    gate_up = torch.randn(1, 2 * k, generator=g).to(dt)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dt)
    out = tg.silu_gemv(gate_up, w, tg.GemvConfig(4, 256, 4, 1))
    assert rel_error(out, torch.nn.functional.linear(silu_mul(gate_up).float(), w.float())) < 1e-2


@pytest.mark.parametrize("n", [64, 100])
def test_pdl_paths_compute_what_the_plain_paths_do(monkeypatch, n: int) -> None:
    """The one-row kernels' PDL variant (first weight slice loaded before the wait, then the rest)
    gives the same bits as the plain one (the wait itself is a no-op in the interpreter; that it
    orders the kernels on a Hopper GPU is checked there, test_triton_kernels_gpu.py)."""
    from llmir_lang.kernels import triton_gemv as tg

    g = torch.Generator().manual_seed(n)
    k, dt = 768, torch.bfloat16  # three 256-wide slices: the peeled one and two in the loop
    x = torch.randn(1, k, generator=g).to(dt)
    res = torch.randn(1, k, generator=g).to(dt)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(dt)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dt)
    gate_up = torch.randn(1, 2 * k, generator=g).to(dt)
    cfg = tg.GemvConfig(8, 256, 4, 1)

    def run_all() -> list[torch.Tensor]:
        out = torch.empty(1, n, dtype=dt)
        return [
            tg.gemv(x, w, out, cfg).clone(),
            *tg.norm_gemv(x, res, nw, 1e-5, w, cfg),
            tg.norm_gemv(x, None, nw, 1e-5, w, cfg)[0],
            tg.silu_gemv(gate_up, w, cfg),
        ]

    plain = run_all()
    _pdl_in_the_interpreter(monkeypatch)
    for a, b in zip(plain, run_all(), strict=True):
        assert torch.equal(a, b)


def _pdl_in_the_interpreter(monkeypatch) -> None:
    """Kernels take their ``USE_PDL`` variant (without ``launch_pdl``: the CPU has no such launch)."""
    from llmir_lang.kernels import triton_common

    monkeypatch.setattr(triton_common, "pdl_launch", lambda t, on=True: dict(USE_PDL=on))


@pytest.mark.parametrize("one_launch", [True, False])
def test_pdl_attention_side_kernels_compute_what_the_plain_ones_do(monkeypatch, one_launch: bool) -> None:
    """The decode attention kernel (one-launch and two-launch merges, the direct path) and the
    fused rotary + KV store give the same bits with their PDL wait as without."""
    from llmir_lang.kernels import triton_decode, triton_misc

    h, hkv, d, dt = 8, 2, 16, torch.bfloat16
    qkv, cos, sin = _rope_inputs(3, h, hkv, d, dt, seed=7)
    lens = [70, 1, 33]
    g = torch.Generator().manual_seed(8)
    kb, vb = random_pool(200, hkv, d, dt, g)
    kv_lists = list(slot_layout(lens, 200, "random", g).split(lens))
    loc = torch.stack([kv[-1] for kv in kv_lists])
    cfg = dataclasses.replace(triton_decode.default_decode_config(d, kb.device), one_launch=one_launch)

    def run_all() -> list[torch.Tensor]:
        k2, v2 = kb.clone(), vb.clone()
        q = triton_misc.rope_store_kv(qkv, cos, sin, h, k2, v2, loc)
        out = [q, k2, v2]
        for bsz in (3, 1):
            args = (q[:bsz], k2, v2, indptr(lens[:bsz]), torch.cat(kv_lists[:bsz]), d**-0.5)
            out.append(triton_decode.decode_attention(*args, config=cfg))
        return out

    plain = run_all()
    _pdl_in_the_interpreter(monkeypatch)
    for a, b in zip(plain, run_all(), strict=True):
        assert torch.equal(a, b)
