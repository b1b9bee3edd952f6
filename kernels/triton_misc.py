"""Triton ``store_kv`` (new K/V into pool slots) and ``apply_token_bitmask`` (constraint masks).

Both are pure data movement with no host work, so they are safe inside a CUDA graph.
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
