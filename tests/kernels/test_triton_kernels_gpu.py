"""The kernel checks at real shapes on a CUDA GPU (skipped without one).

Run them in a process where ``TRITON_INTERPRET`` is unset (not together with the interpreter
tests): ``python -m pytest -m gpu tests/kernels/test_triton_kernels_gpu.py``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import llmir_lang.kernels as K
import pytest
import torch
from llmir_lang.kernels import reference as ref
from llmir_lang.kernels.testing import indptr, rel_error, slot_layout

from llmir_lang.executor.attention import ForwardBatch, ForwardMode

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="runs compiled kernels only"),
]

DEV = "cuda"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
CASES = [(g, dt, hd) for g in (1, 4, 8) for dt in (torch.float16, torch.bfloat16) for hd in (64, 128)]


def _pool(num_slots: int, num_kv: int, head_dim: int, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    return (
        torch.randn(num_slots, num_kv, head_dim, device=DEV, dtype=dtype),
        torch.randn(num_slots, num_kv, head_dim, device=DEV, dtype=dtype),
    )


def _slots(lengths: list[int], num_slots: int, layout: str, seed: int) -> torch.Tensor:
    return slot_layout(lengths, num_slots, layout, torch.Generator().manual_seed(seed), device=DEV)


def _merge_config(head_dim: int, one_launch: bool):
    from llmir_lang.kernels import triton_decode

    base = triton_decode.default_decode_config(head_dim, torch.device(DEV))
    return dataclasses.replace(base, one_launch=one_launch)


@pytest.mark.parametrize("one_launch", [True, False], ids=["one_launch", "two_launch"])
@pytest.mark.parametrize(("group", "dtype", "head_dim"), CASES)
def test_decode_real_shapes(group: int, dtype: torch.dtype, head_dim: int, one_launch: bool) -> None:
    from llmir_lang.kernels import triton_decode

    num_kv = 32 // group
    lengths = [1, 17, 4097, 333, 64, 1000, 2, 2500, 0]
    kb, vb = _pool(20000, num_kv, head_dim, dtype, seed=group)
    idx = _slots(lengths, 20000, "paged" if head_dim == 128 else "random", seed=group)
    q = torch.randn(len(lengths), 32, head_dim, device=DEV, dtype=dtype)
    ip = indptr(lengths, DEV)
    cfg = _merge_config(head_dim, one_launch)
    out, lse = triton_decode.decode_attention(q, kb, vb, ip, idx, head_dim**-0.5, return_lse=True, config=cfg)
    expect, expect_lse = ref.decode_attention_with_lse(q, kb, vb, ip, idx, head_dim**-0.5)
    assert rel_error(out, expect) < TOL[dtype]
    assert torch.allclose(lse, expect_lse, atol=2e-3)


@pytest.mark.parametrize("one_launch", [True, False], ids=["one_launch", "two_launch"])
@pytest.mark.parametrize(("batch", "length"), [(1, 20000), (200, 300)])
def test_decode_split_extremes_and_every_output_written(batch: int, length: int, one_launch: bool) -> None:
    from llmir_lang.kernels import triton_decode

    kb, vb = _pool(70000, 8, 128, torch.bfloat16, seed=3)
    lengths = [length + (i % 7) for i in range(batch)]
    idx = _slots(lengths, 70000, "paged", seed=3)
    q = torch.randn(batch, 32, 128, device=DEV, dtype=torch.bfloat16)
    ip = indptr(lengths, DEV)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    cfg = _merge_config(128, one_launch)
    _, lse = triton_decode.decode_attention(q, kb, vb, ip, idx, 0.088, out=out, return_lse=True, config=cfg)
    expect, expect_lse = ref.decode_attention_with_lse(q, kb, vb, ip, idx, 0.088)
    assert rel_error(out, expect) < TOL[torch.bfloat16]
    assert torch.allclose(lse, expect_lse, atol=2e-3)


@pytest.mark.parametrize(("batch", "length"), [(1, 20000), (16, 1000), (64, 4000)])
def test_one_launch_merge_is_race_free_over_repeated_launches(batch: int, length: int) -> None:
    # The merging program reads partials other programs wrote in the same launch. Before each
    # launch the partials are poisoned (nan output, +inf lse): a partial read before its write is
    # visible turns into nan or a different number. The merge order is fixed (slot order), so
    # every launch must give the same bits, equal to the first (checked against the reference).
    from llmir_lang.kernels import triton_decode

    kb, vb = _pool(300000, 8, 128, torch.bfloat16, seed=4)
    lengths = [length + (37 * i) % 500 for i in range(batch)]
    if batch > 2:
        lengths[1], lengths[2] = 0, 1  # requests of one split and none take the direct branch
    idx = _slots(lengths, 300000, "paged", seed=4)
    q = torch.randn(batch, 32, 128, device=DEV, dtype=torch.bfloat16)
    ip = indptr(lengths, DEV)
    cfg = _merge_config(128, one_launch=True)
    splits = triton_decode.split_cap(batch, 8, cfg, q.device)
    assert splits > 1
    ws = triton_decode.alloc_partials(batch, 32, splits, 128, q.device)
    out = torch.empty_like(q)
    lse = torch.empty(batch, 32, device=DEV)
    first: tuple[torch.Tensor, torch.Tensor] | None = None
    mismatches = torch.zeros((), dtype=torch.int64, device=DEV)
    for _ in range(200):
        ws.part_o.fill_(float("nan"))
        ws.part_lse.fill_(float("inf"))
        out.fill_(float("nan"))
        o, l_ = triton_decode.decode_attention(
            q, kb, vb, ip, idx, 0.088, return_lse=True, workspace=ws, config=cfg, out=out
        )
        lse.copy_(l_)
        if first is None:
            first = (out.clone(), lse.clone())
        else:  # counted on the device: no host sync between launches
            mismatches += (out.view(torch.int16) != first[0].view(torch.int16)).sum()
            mismatches += (lse.view(torch.int32) != first[1].view(torch.int32)).sum()
    assert first is not None
    expect, expect_lse = ref.decode_attention_with_lse(q, kb, vb, ip, idx, 0.088)
    assert rel_error(first[0], expect) < TOL[torch.bfloat16]
    assert torch.allclose(first[1], expect_lse, atol=2e-3)
    assert int(mismatches) == 0
    assert not ws.counters.any()
    two = triton_decode.decode_attention(q, kb, vb, ip, idx, 0.088, config=_merge_config(128, False))
    assert rel_error(first[0], two) < 1e-2


@pytest.mark.parametrize(("group", "dtype", "head_dim"), CASES)
def test_extend_real_shapes(group: int, dtype: torch.dtype, head_dim: int) -> None:
    num_kv = 32 // group
    shapes = [(1, 0), (300, 0), (129, 1000), (1000, 37), (2048, 0), (1, 5000)]
    qo_lens, kv_lens = [a for a, _ in shapes], [a + p for a, p in shapes]
    kb, vb = _pool(20000, num_kv, head_dim, dtype, seed=10 + group)
    idx = _slots(kv_lens, 20000, "paged" if dtype == torch.float16 else "random", seed=group)
    q = torch.randn(sum(qo_lens), 32, head_dim, device=DEV, dtype=dtype)
    qo_ip, kv_ip = indptr(qo_lens, DEV), indptr(kv_lens, DEV)
    out = K.extend_attention(q, kb, vb, qo_ip, kv_ip, idx, head_dim**-0.5)
    assert rel_error(out, ref.extend_attention(q, kb, vb, qo_ip, kv_ip, idx, head_dim**-0.5)) < TOL[dtype]


# GQA ratio, dtype, head dim, fused-qkv views for k_new (else contiguous), k_new-path tiles
# (None: the default config).
NEW_KV_CASES = [
    (1, torch.float16, 128, False, None),
    (4, torch.bfloat16, 128, True, None),
    (8, torch.bfloat16, 64, True, None),
    (4, torch.float16, 64, False, (64, 128)),  # block_m not a multiple of block_n
    (4, torch.bfloat16, 128, True, (64, 64)),  # the shape of SMALL_EXTEND_CONFIG
]


@pytest.mark.parametrize("loads", ["pointer", "descriptor"])
@pytest.mark.parametrize(("group", "dtype", "head_dim", "fused", "tiles"), NEW_KV_CASES)
def test_extend_new_kv_real_shapes(group, dtype, head_dim, fused, tiles, loads) -> None:
    import dataclasses

    from llmir_lang.kernels import triton_extend as te

    num_kv = 32 // group
    # Prefix 0, 1 token, prefixes ending mid-tile and mid-page (1000, 37, 129, 5000), long blocks.
    shapes = [(1, 0), (300, 0), (129, 1000), (1000, 37), (2048, 0), (1, 5000), (77, 129)]
    qo_lens, kv_lens = [a for a, _ in shapes], [a + p for a, p in shapes]
    kr, vr = _pool(20000, num_kv, head_dim, dtype, seed=20 + group)
    idx = _slots(kv_lens, 20000, "paged" if group != 4 else "random", seed=group)
    t = sum(qo_lens)
    q = torch.randn(t, 32, head_dim, device=DEV, dtype=dtype)
    if fused:  # the model's layout: strided views into one projection output
        qkv = torch.randn(t, (32 + 2 * num_kv) * head_dim, device=DEV, dtype=dtype)
        k_new = qkv[:, 32 * head_dim : (32 + num_kv) * head_dim].view(t, num_kv, head_dim)
        v_new = qkv[:, (32 + num_kv) * head_dim :].view(t, num_kv, head_dim)
    else:
        k_new = torch.randn(t, num_kv, head_dim, device=DEV, dtype=dtype)
        v_new = torch.randn_like(k_new)
    qo_ip, kv_ip = indptr(qo_lens, DEV), indptr(kv_lens, DEV)
    new_slots = torch.cat([idx[int(kv_ip[b + 1]) - n : int(kv_ip[b + 1])] for b, n in enumerate(qo_lens)])
    ref.store_kv(kr, vr, new_slots, k_new, v_new)
    kb, vb = kr.clone(), vr.clone()
    kb[new_slots] = float("nan")  # the new keys must come from k_new / v_new, not the pool
    vb[new_slots] = float("nan")
    cfg = dataclasses.replace(te.default_extend_config(head_dim, q.device), new_kv_loads=loads)
    if tiles is not None:
        cfg = dataclasses.replace(cfg, block_m=tiles[0], new_kv_block_n=tiles[1], new_kv_num_warps=4)
    assert te._loads_for(k_new, loads) == loads
    out = te.extend_attention(
        q, kb, vb, qo_ip, kv_ip, idx, head_dim**-0.5, config=cfg, k_new=k_new, v_new=v_new
    )
    expect = ref.extend_attention(q, kr, vr, qo_ip, kv_ip, idx, head_dim**-0.5)
    assert rel_error(out, expect) < TOL[dtype]


@pytest.mark.parametrize(("group", "batch", "prefix_len"), [(4, 64, 4096), (8, 9, 300), (1, 16, 1000)])
def test_shared_prefix_real_shapes(group: int, batch: int, prefix_len: int) -> None:
    num_kv = 32 // group
    torch.manual_seed(group)
    suffix_lens = torch.randint(1, 300, (batch,)).tolist()
    num_slots = prefix_len + sum(suffix_lens) + 16 * (batch + 2)  # room for page rounding
    kb, vb = _pool(num_slots, num_kv, 128, torch.bfloat16, seed=group)
    slots = _slots([prefix_len, *suffix_lens], kb.shape[0], "paged", seed=group)
    prefix, suffix = slots[:prefix_len], slots[prefix_len:]
    q = torch.randn(batch, 32, 128, device=DEV, dtype=torch.bfloat16)
    sp = indptr(suffix_lens, DEV)
    out = K.shared_prefix_decode(q, kb, vb, prefix, sp, suffix, 0.088)
    lists = [torch.cat([prefix, suffix[sp[b] : sp[b + 1]]]) for b in range(batch)]
    plain = ref.decode_attention(q, kb, vb, indptr([len(x) for x in lists], DEV), torch.cat(lists), 0.088)
    assert rel_error(out, plain) < TOL[torch.bfloat16]


def test_store_kv_and_bitmask_are_exact() -> None:
    kb = torch.zeros(5000, 8, 128, device=DEV, dtype=torch.bfloat16)
    vb = torch.zeros_like(kb)
    kr, vr = kb.clone(), vb.clone()
    qkv = torch.randn(300, 48, 128, device=DEV)
    k, v = qkv[:, 32:40], qkv[:, 40:48]
    loc = torch.randperm(5000, device=DEV)[:300]
    K.store_kv(kb, vb, loc, k, v)
    ref.store_kv(kr, vr, loc, k, v)
    assert torch.equal(kb, kr) and torch.equal(vb, vr)
    logits = torch.randn(64, 128256, device=DEV, dtype=torch.bfloat16)
    mask = torch.randint(-(2**31), 2**31 - 1, (64, 4008), dtype=torch.int32, device=DEV)
    expect = logits.clone()
    ref.apply_token_bitmask(expect, mask)
    K.apply_token_bitmask(logits, mask)
    assert torch.equal(logits, expect)


@pytest.mark.parametrize("bsz", [1, 7, 64, 256])
def test_greedy_tokens_at_a_llama3_vocabulary(bsz) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(bsz, 128320, device=DEV).to(dtype)  # padded past the 128,256 tokens
        logits[:, 128256:] = 1e4
        logits[0, 3] = logits[0, 128255] = 60.0
        if bsz > 1:
            logits[1] = float("-inf")
        got = K.greedy_tokens(logits, 128256)
        assert torch.equal(got, ref.greedy_tokens(logits, 128256))
        assert got[0].item() == 3 and (bsz < 2 or got[1].item() == -1)


def test_unsupported_head_dim_falls_back_on_the_gpu() -> None:
    kb, vb = _pool(100, 2, 96, torch.float16, seed=0)
    q = torch.randn(2, 8, 96, device=DEV, dtype=torch.float16)
    ip, idx = indptr([10, 50], DEV), torch.arange(60, device=DEV)
    with pytest.warns(K.KernelFallbackWarning, match="head dim 96"):
        out = K.decode_attention(q, kb, vb, ip, idx, 0.1)
    assert torch.equal(out, ref.decode_attention(q, kb, vb, ip, idx, 0.1))


def test_backend_decode_has_no_host_sync_and_replays_in_a_cuda_graph() -> None:
    from llmir_lang.executor.triton_backend import TritonAttentionBackend

    layers, bsz, max_kv = 2, 8, 3000
    kbs = [torch.randn(40000, 8, 128, device=DEV, dtype=torch.bfloat16) for _ in range(layers)]
    vbs = [torch.randn_like(kbs[0]) for _ in range(layers)]
    be = TritonAttentionBackend(kbs, vbs, 0.088, max_batch_size=16, num_q_heads=32)
    # Static batch tensors, sized for the longest replay and refilled in place.
    st = ForwardBatch(
        mode=ForwardMode.DECODE,
        input_ids=torch.zeros(bsz, dtype=torch.int64, device=DEV),
        positions=torch.zeros(bsz, dtype=torch.int64, device=DEV),
        out_cache_loc=torch.zeros(bsz, dtype=torch.int64, device=DEV),
        qo_indptr=torch.arange(bsz + 1, dtype=torch.int64, device=DEV),
        kv_indptr=torch.zeros(bsz + 1, dtype=torch.int64, device=DEV),
        kv_indices=torch.zeros(bsz * max_kv, dtype=torch.int64, device=DEV),
        batch_size=bsz,
    )
    q = torch.randn(bsz, 32, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(bsz, 8, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def fill(lengths: list[int], seed: int) -> torch.Tensor:
        idx = _slots(lengths, 40000, "paged", seed)
        st.kv_indptr.copy_(indptr(lengths, DEV))
        st.kv_indices[: idx.shape[0]].copy_(idx)
        st.out_cache_loc.copy_(idx[st.kv_indptr[1:] - 1])
        return idx

    def step() -> list[torch.Tensor]:
        be.prepare(st)
        return [be.forward(q, k, v, layer) for layer in range(layers)]

    fill([100] * bsz, 0)
    step()  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()  # raises if prepare or forward syncs with the host
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed, lengths in enumerate([[1, 2999, 17, 500, 64, 3000, 2, 1000], [2000] * bsz]):
        idx = fill(lengths, seed + 1)
        graph.replay()
        ip = indptr(lengths, DEV)
        for layer in range(layers):
            expect = ref.decode_attention(q, kbs[layer], vbs[layer], ip, idx, 0.088)
            assert rel_error(outs[layer], expect) < TOL[torch.bfloat16]


def test_backend_extend_then_decode_matches_reference_on_gpu() -> None:
    from llmir_lang.executor.triton_backend import TritonAttentionBackend

    kb = torch.randn(10000, 8, 64, device=DEV, dtype=torch.float16)
    vb = torch.randn_like(kb)
    be = TritonAttentionBackend([kb], [vb], 0.125)
    lens = [700, 1, 2049]
    idx = _slots(lens, 10000, "random", 5)
    ip = indptr(lens, DEV)
    batch = ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=torch.zeros(sum(lens), dtype=torch.int64, device=DEV),
        positions=torch.zeros(sum(lens), dtype=torch.int64, device=DEV),
        out_cache_loc=idx,
        qo_indptr=ip,
        kv_indptr=ip,
        kv_indices=idx,
        batch_size=3,
    )
    q = torch.randn(sum(lens), 32, 64, device=DEV, dtype=torch.float16)
    k = torch.randn(sum(lens), 8, 64, device=DEV, dtype=torch.float16)
    v = torch.randn_like(k)
    kr, vr = kb.clone(), vb.clone()
    be.prepare(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = be.forward(q, k, v, 0)
    ref.store_kv(kr, vr, idx, k, v)
    assert torch.equal(kb, kr) and torch.equal(vb, vr)
    assert rel_error(out, ref.extend_attention(q, kr, vr, ip, ip, idx, 0.125)) < TOL[torch.float16]


# Llama-3-8B / Llama-3.2-1B projection shapes (N, K): fused q/k/v, o, fused gate/up, down, output
GEMV_SHAPES = [
    (6144, 4096),
    (4096, 4096),
    (28672, 4096),
    (4096, 14336),
    (128256, 4096),
    (3072, 2048),
    (2048, 8192),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), GEMV_SHAPES)
def test_linear_one_row_real_shapes(n: int, k: int, dtype: torch.dtype) -> None:
    from llmir_lang.kernels import triton_gemv as tg

    torch.manual_seed(n + k)
    x = torch.randn(1, k, device=DEV, dtype=dtype)
    w = torch.randn(n, k, device=DEV, dtype=dtype) * k**-0.5
    assert isinstance(tg.plan(x, w), tg.GemvConfig)
    got = K.linear(x, w)
    assert got.shape == (1, n) and got.dtype == dtype
    assert rel_error(got, torch.nn.functional.linear(x.float(), w.float())) < TOL[dtype]


@pytest.mark.parametrize("rows", [9, 16, 33, 64, 128])
@pytest.mark.parametrize("k", [2048, 4096])
def test_linear_output_layer_rows_real_shapes(rows: int, k: int) -> None:
    from llmir_lang.kernels import triton_gemv as tg

    torch.manual_seed(rows + k)
    x = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(128256, k, device=DEV, dtype=torch.bfloat16) * k**-0.5
    assert isinstance(tg.plan(x, w), tg.SkinnyConfig)
    got = K.linear(x, w)
    assert rel_error(got, torch.nn.functional.linear(x.float(), w.float())) < TOL[torch.bfloat16]


def test_linear_replays_in_a_cuda_graph() -> None:
    x = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(6144, 4096, device=DEV, dtype=torch.bfloat16) * 4096**-0.5
    K.linear(x, w)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = K.linear(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(y, torch.nn.functional.linear(x.float(), w.float())) < TOL[torch.bfloat16]


def _layer_chain(x: torch.Tensor, layers: list, attention: tuple | None = None, eps: float = 1e-5) -> torch.Tensor:
    """A decode step's one-row projections, layer after layer, each reading what the one before
    wrote. Between the q/k/v and the output projections: a torch elementwise kernel (``attention``
    None), or a decode step's rotary + KV store and decode attention over that layer's pool
    (``attention = (pools, cos, sin, kv_indptr, kv_indices, loc, heads)``)."""
    from llmir_lang.kernels import triton_misc

    residual = None
    for li, (norm1, qkv_w, o_w, norm2, gu_w, down_w) in enumerate(layers):
        qkv, residual = K.add_norm_linear(x, residual, norm1, eps, qkv_w)
        if attention is None:
            o = (qkv[:, : o_w.shape[1]] * 1.5).contiguous()
        else:
            pools, cos, sin, kv_indptr, kv_indices, loc, heads = attention
            kb, vb = pools[li]
            q = triton_misc.rope_store_kv(qkv, cos, sin, heads, kb, vb, loc)
            o = K.decode_attention(q, kb, vb, kv_indptr, kv_indices, 0.125).reshape(1, -1)
        o = K.linear(o, o_w)
        gate_up, residual = K.add_norm_linear(o, residual, norm2, eps, gu_w)
        x = K.silu_mul_linear(gate_up, down_w)
    return x + residual


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="PDL needs sm90+"
)
@pytest.mark.parametrize("with_attention", [False, True])
def test_pdl_chain_in_a_cuda_graph_equals_the_plain_launches(monkeypatch, with_attention: bool) -> None:
    """With programmatic dependent launch each kernel may start while the one before still runs;
    every program waits for it before it reads what that kernel wrote, or writes. A chain of 12
    dependent layers replayed in a CUDA graph gives the bits the plain launches give (a missing
    wait reads a stale row, or a stale key at this step's slot, and differs), and so do eager
    launches. With attention: the 1B shape's 32 / 8 heads of 64, a 1,000-token context (4 splits,
    the one-launch merge), the new token's slot overwritten with noise before every replay."""
    from llmir_lang.kernels import triton_common

    torch.manual_seed(0)
    h, i, dt = 2048, 8192, torch.bfloat16

    def w(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, device=DEV, dtype=dt) * k**-0.5

    layers = [
        (1 + 0.1 * torch.randn(h, device=DEV, dtype=dt), w(3072, h), w(h, h),
         1 + 0.1 * torch.randn(h, device=DEV, dtype=dt), w(2 * i, h), w(h, i))
        for _ in range(12)
    ]  # fmt: skip
    attention = None
    if with_attention:
        ctx, slots = 1000, 4096
        pools = [_pool(slots, 8, 64, dt, seed=li) for li in range(12)]
        kv_indices = torch.randperm(slots, device=DEV)[:ctx]
        freqs = (ctx - 1) * 10000.0 ** (-torch.arange(0, 64, 2, device=DEV).float() / 64)
        cos = torch.cat((freqs.cos(), freqs.cos())).to(dt).view(1, 1, 64)
        sin = torch.cat((-freqs.sin(), freqs.sin())).to(dt).view(1, 1, 64)
        attention = (pools, cos, sin, indptr([ctx], DEV), kv_indices, kv_indices[-1:], 32)
    x = torch.randn(1, h, device=DEV, dtype=dt)
    assert triton_common.pdl_ok(x)
    monkeypatch.setattr(triton_common, "PDL", False)
    plain = _layer_chain(x, layers, attention)
    monkeypatch.setattr(triton_common, "PDL", True)
    assert torch.equal(_layer_chain(x, layers, attention), plain)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _layer_chain(x, layers, attention)
    for seed in range(3):
        x.copy_(torch.randn(1, h, generator=torch.Generator().manual_seed(seed)).to(DEV, dt))
        if attention is not None:
            for kb, vb in attention[0]:
                kb[attention[5]] = torch.randn_like(kb[attention[5]])
                vb[attention[5]] = torch.randn_like(vb[attention[5]])
        graph.replay()
        torch.cuda.synchronize()
        got = y.clone()
        monkeypatch.setattr(triton_common, "PDL", False)
        want = _layer_chain(x, layers, attention)
        assert torch.equal(got, want), seed
