"""Triton extend attention: ragged new tokens over a paged prefix, causal among themselves.

One program per (query head, block of ``BLOCK_M`` new tokens of one request). Request b's keys are
its slot list ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` (prefix, then the new tokens, already
stored), read through the list like every kernel here. In that key order, new token i of a request
with prefix P sits at key position P + i. Every query of a block starting at new token m0 sees all
keys before P + m0, so those tiles run without a mask; only the last ``BLOCK_M + BLOCK_N`` keys need
the causal mask.

The (request, block) list comes from ``plan_extend``, a host-side step (one sync) done once per
batch; blocks are ordered longest first so that the long causal blocks do not trail the launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from llmir_lang.kernels.triton_common import LOG2E, mma, upcast_dots


@dataclass(frozen=True, slots=True)
class ExtendConfig:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


def default_extend_config(head_dim: int, device: torch.device) -> ExtendConfig:
    if device.type != "cuda":  # interpreter: tiny tiles so that short tests cross tile borders
        return ExtendConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    # H100 sweep (benchmarks/results): 128x64 tiles with 4 warps beat 8 warps at d128.
    return ExtendConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)


@dataclass(frozen=True, slots=True)
class ExtendPlan:
    """The work list of one extend launch: block ``i`` is new tokens ``[block_start[i], +BLOCK_M)``
    of request ``block_req[i]`` (both int32 on the device)."""

    block_req: torch.Tensor
    block_start: torch.Tensor
    block_m: int

    @property
    def num_blocks(self) -> int:
        return int(self.block_req.shape[0])


def plan_extend(qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, block_m: int) -> ExtendPlan:
    """Split every request's new tokens into blocks of ``block_m``; reads the indptrs on the host."""
    qo = qo_indptr.detach().to("cpu", torch.int64)
    kv = kv_indptr.detach().to("cpu", torch.int64)
    qo_lens = qo[1:] - qo[:-1]
    prefix_lens = (kv[1:] - kv[:-1]) - qo_lens
    blocks = (qo_lens + block_m - 1) // block_m
    req = torch.repeat_interleave(torch.arange(qo_lens.shape[0]), blocks)
    first = torch.repeat_interleave(torch.cumsum(blocks, 0) - blocks, blocks)
    start = (torch.arange(req.shape[0]) - first) * block_m
    # Keys a block reads grow with its prefix and its start: schedule the heaviest first.
    order = torch.argsort(prefix_lens[req] + start, descending=True, stable=True)
    device = qo_indptr.device
    return ExtendPlan(
        block_req=req[order].to(device=device, dtype=torch.int32),
        block_start=start[order].to(device=device, dtype=torch.int32),
        block_m=block_m,
    )


@triton.jit
def _extend_kernel(
    Q,
    K,
    V,
    Out,
    QoIndptr,
    KvIndptr,
    KvIndices,
    BlockReq,
    BlockStart,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Heads vary fastest across the grid so programs that read the same keys run together.
    head = tl.program_id(0)
    blk = tl.program_id(1)
    b = tl.load(BlockReq + blk)
    m0 = tl.load(BlockStart + blk)
    q_start = tl.load(QoIndptr + b).to(tl.int64)
    q_len = (tl.load(QoIndptr + b + 1) - q_start).to(tl.int32)
    kv_start = tl.load(KvIndptr + b).to(tl.int64)
    kv_len = (tl.load(KvIndptr + b + 1) - kv_start).to(tl.int32)
    prefix = kv_len - q_len
    kvh = head // GROUP

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    idx_base = KvIndices + kv_start

    # Keys before prefix + m0 are visible to every query here: whole tiles, no mask.
    full_end = ((prefix + m0) // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        slot = tl.load(idx_base + offs_n).to(tl.int64)
        k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :])
        qk = mma(q, tl.trans(k), UPCAST)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * sm_scale_log2)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * sm_scale_log2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vn + offs_d[None, :])
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    # The diagonal: key position n is visible to new token i iff n <= prefix + i.
    q_pos = prefix + offs_m
    tail_end = prefix + tl.minimum(m0 + BLOCK_M, q_len)
    for start in range(full_end, tail_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < tail_end
        slot = tl.load(idx_base + offs_n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        qk = mma(q, tl.trans(k), UPCAST)
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * sm_scale_log2)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * sm_scale_log2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    # Every real query sees at least key 0 of the request, so l_i > 0 on the rows stored.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        Out + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_mask[:, None],
    )


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    *,
    plan: ExtendPlan | None = None,
    out: torch.Tensor | None = None,
    config: ExtendConfig | None = None,
) -> torch.Tensor:
    """Same contract as ``reference.extend_attention``. Pass ``plan`` (built with this call's
    ``config.block_m``) to skip the host step, as the attention backend does once per batch."""
    num_tokens, num_heads, head_dim = q.shape
    cfg = config or default_extend_config(head_dim, q.device)
    if plan is None:
        plan = plan_extend(qo_indptr, kv_indptr, cfg.block_m)
    if plan.block_m != cfg.block_m:
        raise ValueError(
            f"extend plan was made for block_m={plan.block_m}, but the launch uses {cfg.block_m}"
        )
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if plan.num_blocks == 0:
        return out
    group = num_heads // k_buffer.shape[1]
    _extend_kernel[(num_heads, plan.num_blocks)](
        q,
        k_buffer,
        v_buffer,
        out,
        qo_indptr,
        kv_indptr,
        kv_indices,
        plan.block_req,
        plan.block_start,
        sm_scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        HEAD_DIM=head_dim,
        UPCAST=upcast_dots(q.dtype, q.device),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
