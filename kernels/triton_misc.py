"""Triton ``store_kv`` (new K/V into pool slots), ``apply_token_bitmask`` (constraint masks) and
``greedy_tokens`` (each row's argmax over the vocabulary, a greedy decode step's token).

All are pure data movement with no host work, so they are safe inside a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
