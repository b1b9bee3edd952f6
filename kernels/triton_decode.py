"""Triton decode attention: split-KV (flash-decoding) over a paged, token-granular pool.

The *split* kernel runs one program per (request, KV head, split): the query heads of one KV
head are packed as the rows of a ``[BLOCK_H, D]`` tile (GQA packing), so even a batch of one
decode feeds the tensor cores, and each program walks its slice of the request's slot list.
It writes an fp32 partial output and a base-2 log-sum-exp per (request, head, split), which are
merged by log-sum-exp (``triton_decode_merge``): in the same launch (the last split program of
each (request, KV head) to finish merges, counted by an atomic) or by a second launch; see
``merge_in_split_kernel`` for which. With one split per request the split kernel writes the result.

Invariants the kernels rely on:
- Request b takes ``clamp(ceil(kv_len_b / min_chunk), 1, grid splits)`` splits (``min_chunk``:
  ``DecodeConfig.min_chunk_for(B)``), computed in the
  kernel; a split whose slice is empty writes only lse = -inf, and the merge neither weights nor
  reads it. So the grid depends only on (B, KV heads, max splits), never on the KV lengths: the
  launch is CUDA-graph safe as long as those and the tensors' addresses stay fixed.
- One launch: the workspace's counters are 0 before the launch and the launch leaves them 0.
- The last dim of q, the pool buffers and the outputs is contiguous.

On sm90+ the split kernel launches with programmatic dependent launch (``triton_common.PDL``):
its programs may be resident before the kernel before it ends, and wait for it before anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from llmir_lang.kernels import triton_common
from llmir_lang.kernels.support import num_sms
from llmir_lang.kernels.triton_common import LOG2E, mma, pdl_wait, upcast_dots
from llmir_lang.kernels.triton_decode_merge import (
    DecodeWorkspace,
    alloc_partials,
    launch_merge,
    merge_in_split_kernel,
    merge_tile_shape,
    store_split_and_merge_last,
)

PDL = True  # these kernels' own PDL switch (with triton_common.PDL): benchmarks compare


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Launch shape of the decode kernels. ``one_launch``: True merges the splits inside the
    split kernel (the last program to finish merges), False in a second launch, None (default)
    by ``one_launch_min_splits`` (``merge_in_split_kernel``). ``merge_tile``: most elements of
    the merging program's ``[group, splits, head_dim]`` tile (more splits: more chunks)."""

    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2
    max_splits: int = 32
    min_chunk: int = 256  # never split a request into slices shorter than this many tokens
    # ... but this many in batches of at most ``small_batch`` requests (``min_chunk_for``): there a
    # call is a chain of dependent memory round trips more than a stream of KV bytes, and shorter
    # slices put more programs on it. H100 (benchmarks/gpu/probe_decode_small.py): batch 1 at 1k
    # tokens 1.22x / 1.26x at head dims 64 / 128, batch 4 at 1k 1.08x / 1.10x; 4k and 16k within 4%.
    small_batch: int = 4
    small_batch_min_chunk: int = 128
    programs_per_sm: int = 4  # split until the grid has about this many programs per SM
    one_launch: bool | None = None
    # H100 (benchmarks/gpu/README.md): one launch 0.3-2.4% faster at grids of 5 and 32 splits,
    # 0.4-0.5% slower at 2 splits with 4k/16k contexts (half of all programs merge there).
    one_launch_min_splits: int = 3
    merge_tile: int = 8192

    def min_chunk_for(self, batch_size: int) -> int:
        """The shortest split of a batch of ``batch_size`` requests."""
        if batch_size <= self.small_batch:
            return min(self.min_chunk, self.small_batch_min_chunk)
        return self.min_chunk


def default_decode_config(head_dim: int, device: torch.device) -> DecodeConfig:
    if device.type != "cuda":  # interpreter: tiny tiles so that short test lengths still split
        return DecodeConfig(block_n=16, num_warps=1, num_stages=1, max_splits=4, min_chunk=16, merge_tile=128)
    # H100 sweep (benchmarks/results): 128-token tiles, 4 warps, 3 stages led at d128.
    return DecodeConfig(block_n=128, num_warps=4, num_stages=3)


def pre_chunk(num_pre: int, block_h: int, head_dim: int) -> int:
    """Partials the direct kernel merges per round: all of them up to a tile of 8,192 fp32
    elements (8 at head dim 64, 4 at 128 with 16 head rows), a power of two."""
    most = max(1, 8192 // (block_h * head_dim))
    return min(triton.next_power_of_2(max(num_pre, 1)), 1 << (most.bit_length() - 1))


def block_h_for(group: int) -> int:
    # tl.dot needs at least 16 rows; smaller groups are padded with masked rows.
    return max(16, triton.next_power_of_2(group))


def split_cap(batch_size: int, num_kv_heads: int, config: DecodeConfig, device: torch.device) -> int:
    """Most splits any request of a batch of ``batch_size`` gets: the z extent of the grid.

    Depends only on the batch size (not on KV lengths), so a captured graph keeps one grid. Each
    request then takes ``clamp(ceil(kv_len / min_chunk), 1, split_cap)`` splits, decided inside the
    kernel from its own length.
    """
    target = num_sms(device) * config.programs_per_sm
    return max(1, min(config.max_splits, math.ceil(target / max(1, batch_size * num_kv_heads))))


@triton.jit
def _decode_partial_kernel(
    Q,
    K,
    V,
    KvIndptr,
    KvIndices,
    PartO,
    PartLse,
    sm_scale_log2,
    min_chunk,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    split_offset,
    PreO,
    PreLse,
    num_pre,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    Out,
    Lse,
    Counters,
    stride_outb,
    stride_outh,
    stride_lseb,
    stride_lseh,
    stride_cb,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
    DIRECT: tl.constexpr,
    STORE_LSE: tl.constexpr,
    MERGE_PRE: tl.constexpr,
    FUSED: tl.constexpr,
    BLOCK_G: tl.constexpr,
    MERGE_CHUNK: tl.constexpr,
    PRE_CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # launched early: wait for the kernel before (this step's KV store) first
        pdl_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    kv_start = tl.load(KvIndptr + b).to(tl.int64)
    kv_len = (tl.load(KvIndptr + b + 1) - kv_start).to(tl.int32)
    n_splits = tl.minimum(tl.maximum(tl.cdiv(kv_len, min_chunk), 1), tl.num_programs(2))
    # Slices are whole tiles so that only the request's last tile needs a mask.
    per_split = tl.cdiv(tl.cdiv(kv_len, n_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, kv_len)

    offs_h = tl.arange(0, BLOCK_H)
    head_mask = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=head_mask[:, None],
        other=0.0,
    )
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        slot = tl.load(KvIndices + kv_start + offs_n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        qk = mma(q, tl.trans(k), UPCAST)
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * sm_scale_log2)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * sm_scale_log2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    has_keys = l_i > 0.0
    denom = tl.where(has_keys, l_i, 1.0)
    lse = tl.where(has_keys, m_i + tl.log2(denom), float("-inf"))
    slot_id = split_offset + split
    o_ptrs = (
        PartO
        + b.to(tl.int64) * stride_ob
        + heads[:, None] * stride_oh
        + slot_id * stride_os
        + offs_d[None, :]
    )
    lse_ptrs = PartLse + b.to(tl.int64) * stride_lb + heads * stride_lh + slot_id
    if DIRECT:
        # One split per request: this is the final output (q's dtype) and natural-log lse.
        o = acc / denom[:, None]
        if MERGE_PRE:
            # Fold in partials computed elsewhere over other keys of the same rows (the shared
            # prefix): saves a separate merge launch and a round trip of this split's result.
            # PRE_CHUNK partials a round: their lse and outputs load together (one memory round
            # trip, not two per partial); an empty partial (lse -inf) may hold garbage, so its
            # output is zeroed after the load rather than masked out of it.
            m_run = lse
            l_run = tl.where(has_keys, 1.0, 0.0)
            offs_s = tl.arange(0, PRE_CHUNK)
            row = b.to(tl.int64)
            pre_o = (
                PreO
                + row * stride_pob
                + heads[:, None, None] * stride_poh
                + offs_s[None, :, None] * stride_pos
                + offs_d[None, None, :]
            )
            pre_lse = PreLse + row * stride_plb + heads[:, None] * stride_plh + offs_s[None, :]
            for c0 in range(0, num_pre, PRE_CHUNK):
                s_mask = (c0 + offs_s) < num_pre
                lse_c = tl.load(pre_lse + c0, mask=head_mask[:, None] & s_mask[None, :], other=float("-inf"))
                o_c = tl.load(
                    pre_o + c0 * stride_pos,
                    mask=head_mask[:, None, None] & s_mask[None, :, None],
                    other=0.0,
                )
                m_new = tl.maximum(m_run, tl.max(lse_c, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                a = tl.exp2(m_run - m_safe)
                w = tl.exp2(lse_c - m_safe[:, None])
                o_c = tl.where((lse_c > float("-inf"))[:, :, None], o_c, 0.0)
                o = o * a[:, None] + tl.sum(o_c * w[:, :, None], 1)
                l_run = l_run * a + tl.sum(w, 1)
                m_run = m_new
            safe_l = tl.where(l_run > 0.0, l_run, 1.0)
            o = o / safe_l[:, None]
            lse = tl.where(l_run > 0.0, m_run + tl.log2(safe_l), float("-inf"))
        tl.store(o_ptrs, o.to(PartO.dtype.element_ty), mask=head_mask[:, None])
        if STORE_LSE:
            tl.store(lse_ptrs, lse * 0.6931471805599453, mask=head_mask)
    elif FUSED:
        store_split_and_merge_last(
            acc / denom[:, None],
            lse,
            heads,
            head_mask,
            kvh,
            split,
            n_splits,
            PartO + b.to(tl.int64) * stride_ob,
            stride_oh,
            stride_os,
            PartLse + b.to(tl.int64) * stride_lb,
            stride_lh,
            Out + b.to(tl.int64) * stride_outb,
            stride_outh,
            Lse + b.to(tl.int64) * stride_lseb,
            stride_lseh,
            Counters + b.to(tl.int64) * stride_cb + kvh,
            GROUP,
            BLOCK_G,
            MERGE_CHUNK,
            HEAD_DIM,
            STORE_LSE,
        )
    else:
        # An empty slice stores only its lse (-inf); the merge never reads its output.
        tl.store(o_ptrs, acc / denom[:, None], mask=head_mask[:, None] & has_keys[:, None])
        tl.store(lse_ptrs, lse, mask=head_mask)


def launch_decode_partial(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    grid_splits: int,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    split_offset: int,
    sm_scale: float,
    config: DecodeConfig,
    direct: bool = False,
    store_lse: bool = True,
    merge: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    fused: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
) -> None:
    """Write splits ``split_offset .. split_offset + grid_splits - 1`` of every (request, head).

    ``direct`` (only with ``grid_splits == 1``): ``part_o`` is the final ``[B, H, 1, D]`` output in
    q's dtype and ``part_lse`` the final ``[B, H, 1]`` natural-log lse (skipped if not ``store_lse``).
    ``merge`` (direct only): ``(pre_o [B, H, S, D], pre_lse [B, H, S], n)`` partials over other keys
    (base-2 lse, as the partial kernels write them) whose first ``n`` slots are merged in.
    ``fused``: ``(out [B, H, D], lse [B, H] or None, counters [B, H] int32, all 0)``: merge the
    splits in this launch into ``out`` (and the natural-log ``lse``); needs ``split_offset == 0``.
    """
    bsz, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_heads // num_kv_heads
    assert not direct or grid_splits == 1
    assert merge is None or direct
    assert fused is None or (not direct and split_offset == 0)
    pre_o, pre_lse, num_pre = merge if merge is not None else (part_o, part_lse, 0)
    out, lse, counters = fused if fused is not None else (part_o, None, part_lse)
    lse_t = lse if lse is not None else part_lse
    block_g, chunk = merge_tile_shape(group, grid_splits, head_dim, config.merge_tile, fused is not None)
    _decode_partial_kernel[(bsz, num_kv_heads, grid_splits)](
        q,
        k_buffer,
        v_buffer,
        kv_indptr,
        kv_indices,
        part_o,
        part_lse,
        sm_scale * LOG2E,
        config.min_chunk_for(bsz),
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        split_offset,
        pre_o,
        pre_lse,
        num_pre,
        pre_o.stride(0),
        pre_o.stride(1),
        pre_o.stride(2),
        pre_lse.stride(0),
        pre_lse.stride(1),
        out,
        lse_t,
        counters,
        out.stride(0),
        out.stride(1),
        lse_t.stride(0),
        lse_t.stride(1),
        counters.stride(0),
        GROUP=group,
        BLOCK_H=block_h_for(group),
        BLOCK_N=config.block_n,
        HEAD_DIM=head_dim,
        UPCAST=upcast_dots(q.dtype, q.device),
        DIRECT=direct,
        STORE_LSE=store_lse,
        MERGE_PRE=merge is not None,
        FUSED=fused is not None,
        BLOCK_G=block_g,
        MERGE_CHUNK=chunk,
        PRE_CHUNK=pre_chunk(num_pre, block_h_for(group), head_dim),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **triton_common.pdl_launch(q, PDL),
    )


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    *,
    return_lse: bool = False,
    workspace: DecodeWorkspace | tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.decode_attention`` (``..._with_lse`` when ``return_lse``).

    No host sync and no device work besides the kernels: the grid depends only on q's shape, so a
    call can be captured in a CUDA graph. ``workspace`` (from ``alloc_partials`` with at least B
    rows and ``split_cap(...)`` slots) and ``out`` may be preallocated to avoid allocations; the
    one-launch merge needs its zeroed counters: a plain ``(part_o, part_lse)`` pair takes the
    two-launch merge (an error if ``config.one_launch`` is True).
    """
    bsz, num_heads, head_dim = q.shape
    cfg = config or default_decode_config(head_dim, q.device)
    grid_splits = split_cap(bsz, k_buffer.shape[1], cfg, q.device)
    if out is None:
        out = torch.empty(bsz, num_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, num_heads, dtype=torch.float32, device=q.device) if return_lse else None
    if bsz == 0:
        return (out, lse) if lse is not None else out
    inputs = (q, k_buffer, v_buffer, kv_indptr, kv_indices)
    if grid_splits == 1:  # nothing to merge: the kernel writes the result itself
        launch_decode_partial(
            *inputs,
            1,
            out.unsqueeze(2),
            (lse if lse is not None else out).unsqueeze(2),
            0,
            sm_scale,
            cfg,
            direct=True,
            store_lse=lse is not None,
        )
        return (out, lse) if lse is not None else out
    if workspace is None:
        workspace = alloc_partials(
            bsz,
            num_heads,
            grid_splits,
            head_dim,
            q.device,
            with_counters=merge_in_split_kernel(cfg, grid_splits),
        )
    part_o, part_lse = workspace[0], workspace[1]
    counters = workspace[2] if len(workspace) > 2 else None
    one_launch = merge_in_split_kernel(cfg, grid_splits, counters is not None)
    if one_launch and counters is None:
        raise ValueError(
            "decode_attention with config.one_launch=True needs a workspace with counters: allocate "
            "it with alloc_partials(..., with_counters=True), or leave config.one_launch unset"
        )
    fused = (out, lse, counters) if one_launch else None
    launch_decode_partial(*inputs, grid_splits, part_o, part_lse, 0, sm_scale, cfg, fused=fused)
    if not one_launch:
        launch_merge(part_o, part_lse, grid_splits, out, lse)
    return (out, lse) if lse is not None else out
