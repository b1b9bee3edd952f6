"""Triton ``store_kv`` (new K/V into pool slots), ``rope_store_kv`` (a decode step's rotary and KV
store in one kernel), ``apply_token_bitmask`` (constraint masks) and ``greedy_tokens`` (each row's
argmax over the vocabulary, a greedy decode step's token).

None does host work, so all are safe inside a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from llmir_lang.kernels import triton_common
from llmir_lang.kernels.triton_common import pdl_wait


@triton.jit
def _store_kv_kernel(
    K,
    V,
    KBuf,
    VBuf,
    Loc,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kbn,
    stride_kbh,
    stride_vbn,
    stride_vbh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Loc + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    tl.store(
        KBuf + slot * stride_kbn + offs_h[:, None] * stride_kbh + offs_d[None, :],
        k.to(KBuf.dtype.element_ty),
        mask=mask,
    )
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(
        VBuf + slot * stride_vbn + offs_h[:, None] * stride_vbh + offs_d[None, :],
        v.to(VBuf.dtype.element_ty),
        mask=mask,
    )


def store_kv(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Same contract as ``reference.store_kv``; the last dim of every tensor must be contiguous."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = triton.next_power_of_2(num_heads)
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_buffer,
        v_buffer,
        loc,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4 if block_h * block_d >= 2048 else 1,
    )


PDL = True  # these kernels' own PDL switch (with triton_common.PDL): benchmarks compare


@triton.jit
def _round_to_half(x, BF16: tl.constexpr):
    """fp32 ``x`` rounded to bf16 (``BF16``) or fp16, to nearest even, as fp32. bf16 by its bits:
    the CPU interpreter's fp32 -> bf16 cast does not round to nearest."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r)  # a NaN stays a NaN
    else:
        return x.to(tl.float16).to(tl.float32)


@triton.jit
def _rope_store_kv_kernel(
    QKV,
    Cos,
    Sin,
    Q,
    KBuf,
    VBuf,
    Loc,
    stride_t,
    stride_ct,
    stride_st,
    stride_qt,
    stride_qh,
    stride_kbn,
    stride_kbh,
    stride_vbn,
    stride_vbh,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_QK: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BF16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program t: token t's q and k heads rotated (one ``[BLOCK_QK, D]`` tile; q rows first, then k
    rows, as ``qkv`` lays them out), q to ``Q``, k and v to pool slot ``Loc[t]``."""
    if USE_PDL:  # launched early: wait for the kernel before (the q/k/v projection) first
        pdl_wait()
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Loc + t).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    c = _round_to_half(tl.load(Cos + t * stride_ct + offs_d).to(tl.float32), BF16)
    s = _round_to_half(tl.load(Sin + t * stride_st + offs_d).to(tl.float32), BF16)
    offs_h = tl.arange(0, BLOCK_QK)
    rows = offs_h < NUM_HEADS + NUM_KV_HEADS
    row = QKV + t * stride_t + offs_h[:, None] * HEAD_DIM
    x = tl.load(row + offs_d[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
    # roll(x, D / 2) along the head dim: element d reads (d + D / 2) mod D
    xr = tl.load(row + ((offs_d + HEAD_DIM // 2) % HEAD_DIM)[None, :], mask=rows[:, None], other=0.0)
    # each product and the sum rounded to the input dtype, as torch's ops on bf16/fp16 round (the
    # model's rope_qkv, Hugging Face's rotary): the same bits as those
    dt = QKV.dtype.element_ty
    a = _round_to_half(x * c[None, :], BF16)
    b = _round_to_half(xr.to(tl.float32) * s[None, :], BF16)
    y = _round_to_half(a + b, BF16)
    is_q = offs_h < NUM_HEADS
    tl.store(
        Q + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
        y.to(Q.dtype.element_ty),
        mask=is_q[:, None],
    )
    kh = tl.where(is_q, 0, offs_h - NUM_HEADS)
    tl.store(
        KBuf + slot * stride_kbn + kh[:, None] * stride_kbh + offs_d[None, :],
        y.to(dt).to(KBuf.dtype.element_ty),
        mask=(rows & ~is_q)[:, None],
    )
    offs_v = tl.arange(0, BLOCK_KV)
    vrows = offs_v < NUM_KV_HEADS
    v = tl.load(
        QKV + t * stride_t + (NUM_HEADS + NUM_KV_HEADS + offs_v[:, None]) * HEAD_DIM + offs_d[None, :],
        mask=vrows[:, None],
    )
    tl.store(
        VBuf + slot * stride_vbn + offs_v[:, None] * stride_vbh + offs_d[None, :],
        v.to(VBuf.dtype.element_ty),
        mask=vrows[:, None],
    )


def rope_store_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    loc: torch.Tensor,
) -> torch.Tensor:
    """Same contract as ``reference.rope_store_kv``: one program per token. ``qkv``'s rows and the
    last dim of every tensor contiguous; the head dim a power of two. Launched with PDL on sm90+."""
    num_tokens = qkv.shape[0]
    num_kv_heads, head_dim = k_buffer.shape[1], k_buffer.shape[2]
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    cos2, sin2 = cos.reshape(num_tokens, head_dim), sin.reshape(num_tokens, head_dim)
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim and qkv.stride(1) == 1
    assert cos2.stride(1) == 1 and sin2.stride(1) == 1 and head_dim & (head_dim - 1) == 0
    block_qk = triton.next_power_of_2(num_heads + num_kv_heads)
    _rope_store_kv_kernel[(num_tokens,)](
        qkv,
        cos2,
        sin2,
        q,
        k_buffer,
        v_buffer,
        loc,
        qkv.stride(0),
        cos2.stride(0),
        sin2.stride(0),
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_QK=block_qk,
        BLOCK_KV=triton.next_power_of_2(num_kv_heads),
        BF16=qkv.dtype == torch.bfloat16,
        num_warps=4 if block_qk * head_dim >= 2048 else 1,
        **triton_common.pdl_launch(qkv, PDL),
    )
    return q


@triton.jit
def _apply_token_bitmask_kernel(Logits, Bitmask, vocab, stride_lb, stride_mb, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = offs < vocab
    words = tl.load(Bitmask + b * stride_mb + offs // 32, mask=in_vocab, other=-1)
    allowed = ((words >> (offs % 32)) & 1) != 0
    tl.store(Logits + b * stride_lb + offs, float("-inf"), mask=in_vocab & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Same contract as ``reference.apply_token_bitmask`` (in place, int32 bitmask, bit set = allowed)."""
    bsz, vocab = logits.shape
    if bsz == 0 or vocab == 0:
        return
    if logits.stride(1) != 1 or bitmask.stride(1) != 1:
        raise ValueError("apply_token_bitmask needs logits and bitmask contiguous along the vocab dim")
    block_v = 1024
    _apply_token_bitmask_kernel[(bsz, triton.cdiv(vocab, block_v))](
        logits, bitmask, vocab, logits.stride(0), bitmask.stride(0), BLOCK_V=block_v, num_warps=4
    )


@triton.jit
def _argmax_chunk_kernel(
    Logits, PartMax, PartIdx, vocab, chunk, stride_lb, num_chunks, BLOCK_V: tl.constexpr
):
    """Program (b, c): the max of row b's columns [c * chunk, (c + 1) * chunk) and its first index."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lo = c * chunk
    best = tl.full([1], float("-inf"), tl.float32)
    best_idx = tl.full([1], -1, tl.int32)
    for start in range(lo, lo + chunk, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(Logits + b * stride_lb + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("inf"), x)  # NaN ranks above every number, as in torch.argmax
        m, i = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        better = m > best  # strict: an earlier tile keeps a tie
        best_idx = tl.where(better, start + i, best_idx)
        best = tl.where(better, m, best)
    tl.store(PartMax + b * num_chunks + c + tl.arange(0, 1), best)
    tl.store(PartIdx + b * num_chunks + c + tl.arange(0, 1), best_idx)


@triton.jit
def _argmax_merge_kernel(PartMax, PartIdx, Out, num_chunks, BLOCK_C: tl.constexpr):
    """Row b's token: the first chunk holding the row's max (-1 when every logit is -inf)."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    m = tl.load(PartMax + b * num_chunks + offs, mask=offs < num_chunks, other=float("-inf"))
    idx = tl.load(PartIdx + b * num_chunks + offs, mask=offs < num_chunks, other=-1)
    top, at = tl.max(m, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tok = tl.sum(tl.where(offs == at, idx, 0), axis=0)
    tok = tl.where(top == float("-inf"), -1, tok)
    tl.store(Out + b, tok.to(tl.int64))


def greedy_chunks(bsz: int, vocab: int, block_v: int, num_sms: int) -> tuple[int, int]:
    """(chunks per row, columns per chunk): about 4 programs per SM over the whole batch, each
    chunk a whole number of ``block_v`` tiles."""
    tiles = triton.cdiv(vocab, block_v)
    want = max(1, min(tiles, triton.cdiv(4 * num_sms, max(bsz, 1)), 256))
    per = triton.cdiv(tiles, want)
    return triton.cdiv(tiles, per), per * block_v


def greedy_tokens(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Same contract as ``reference.greedy_tokens``: int64 ``[B]``, each row's first argmax over its
    first ``vocab`` columns, -1 where all of them are -inf. Two launches: the max of each chunk of
    a row (the whole batch spread over the SMs; one program per row, as a plain row reduction
    has, leaves most SMs idle at decode batch sizes), then the first chunk holding the row max."""
    from llmir_lang.kernels.support import num_sms

    bsz = logits.shape[0]
    out = torch.empty(bsz, dtype=torch.int64, device=logits.device)
    if bsz == 0:
        return out
    if logits.stride(1) != 1:
        raise ValueError("greedy_tokens needs logits contiguous along the vocab dim")
    block_v = 1024 if logits.device.type == "cuda" else 16
    n_chunks, chunk = greedy_chunks(bsz, vocab, block_v, num_sms(logits.device))
    part_max = torch.empty(bsz, n_chunks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(bsz, n_chunks, dtype=torch.int32, device=logits.device)
    _argmax_chunk_kernel[(bsz, n_chunks)](
        logits, part_max, part_idx, vocab, chunk, logits.stride(0), n_chunks, BLOCK_V=block_v, num_warps=4
    )
    _argmax_merge_kernel[(bsz,)](
        part_max, part_idx, out, n_chunks, BLOCK_C=max(16, triton.next_power_of_2(n_chunks)), num_warps=1
    )
    return out
