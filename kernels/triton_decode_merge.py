"""Log-sum-exp merge of decode splits: as its own launch, or folded into the split kernel.

A split writes, per query head, an fp32 partial output (normalised over its own keys) and a
base-2 log-sum-exp; a split with no keys writes only lse = -inf and its output is never used.
Merging weights each split by ``exp2(lse_s - max lse)``.

Two ways to run the merge:
- ``launch_merge``: a second launch, one program per (request, head), after the split kernel.
- ``store_split_and_merge_last`` (called from the split kernel's epilogue): each split program
  stores its partial, then counts itself in on a per-(request, KV head) int32 counter with an
  acq_rel atomic; the program that arrives last reads every partial of its row and writes the
  merged result, then sets the counter back to 0. So the counters are 0 between launches and the
  call needs no memset: one launch, CUDA-graph capturable.

Memory ordering of the folded merge: every thread's partial stores come before a CTA barrier,
and only then does the (single-thread) release-acquire atomic publish them at GPU scope; in the
last program the atomic's result reaches the other threads through Triton's broadcast (shared
memory and a barrier), so their partial loads come after the acquire. The loads bypass L1
(``.cg``): the lines were written by other SMs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from llmir_lang.kernels.triton_decode import DecodeConfig

LN2 = tl.constexpr(0.6931471805599453)  # natural-log lse = base-2 lse * ln 2


class DecodeWorkspace(NamedTuple):
    """Scratch for split results (see ``alloc_partials``).

    ``part_o [B, H, S, D]`` fp32 and ``part_lse [B, H, S]`` fp32 (base 2) hold split partials;
    ``counters [B, H]`` int32 (entry ``[b, kv head]`` used) must be all 0 before a one-launch
    call, which leaves them 0 again; None where the one-launch merge is not used.
    """

    part_o: torch.Tensor
    part_lse: torch.Tensor
    counters: torch.Tensor | None


def alloc_partials(
    batch_size: int,
    num_heads: int,
    num_slots: int,
    head_dim: int,
    device: torch.device,
    *,
    with_counters: bool = True,
) -> DecodeWorkspace:
    """Workspace for split results: ``part_o [B, H, S, D]``, ``part_lse [B, H, S]`` (fp32,
    uninitialised) and, if ``with_counters``, zeroed ``counters [B, H]`` for the one-launch merge.

    Reuse one workspace across calls (e.g. every layer of a step) only on one stream: calls that
    overlap in time must not share it.
    """
    part_o = torch.empty(batch_size, num_heads, num_slots, head_dim, dtype=torch.float32, device=device)
    part_lse = torch.empty(batch_size, num_heads, num_slots, dtype=torch.float32, device=device)
    counters = torch.zeros(batch_size, num_heads, dtype=torch.int32, device=device) if with_counters else None
    return DecodeWorkspace(part_o, part_lse, counters)


def merge_in_split_kernel(config: DecodeConfig, grid_splits: int, has_counters: bool = True) -> bool:
    """Whether a decode whose grid has ``grid_splits`` splits merges inside the split kernel.

    A forced ``config.one_launch`` decides alone; otherwise one launch where the grid has at
    least ``config.one_launch_min_splits`` splits and the workspace has counters.
    """
    if config.one_launch is not None:
        return bool(config.one_launch)
    return has_counters and grid_splits >= config.one_launch_min_splits


def merge_tile_shape(
    group: int, grid_splits: int, head_dim: int, merge_tile: int, used: bool
) -> tuple[int, int]:
    """``(BLOCK_G, CHUNK)`` of ``merge_group``: the group padded to a power of two, and the most
    splits per chunk (a power of two, at least 1) that keep the tile within ``merge_tile``
    elements and no wider than the grid's splits. ``(1, 1)`` when the merge is not ``used``, so
    the two-launch path compiles one variant."""
    if not used:
        return 1, 1
    block_g = triton.next_power_of_2(group)
    fit = max(1, merge_tile // (block_g * head_dim))
    return block_g, min(1 << (fit.bit_length() - 1), triton.next_power_of_2(grid_splits))


@triton.jit
def merge_head(
    po,
    pl,
    out,
    lse_out,
    num_slots,
    stride_s,
    MAX_SLOTS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """Merge slots ``0 .. num_slots-1`` of one (request, head): ``po`` points at its slot-0 partial
    output (slot stride ``stride_s``), ``pl`` at its slot-0 lse; writes ``out [D]`` (out's dtype)
    and, if ``WRITE_LSE``, the natural-log lse at ``lse_out``. No keys at all: output 0, lse -inf.
    An empty slot's output is never loaded (many slots are empty for short requests)."""
    offs_s = tl.arange(0, MAX_SLOTS)
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(pl + offs_s, mask=offs_s < num_slots, other=float("-inf"))
    valid = lse > float("-inf")
    o = tl.load(po + offs_s[:, None] * stride_s + offs_d[None, :], mask=valid[:, None], other=0.0)
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(valid, tl.exp2(lse - m_safe), 0.0)
    total = tl.sum(w, 0)
    safe_total = tl.where(total > 0.0, total, 1.0)
    merged = tl.sum(o * w[:, None], 0) / safe_total
    tl.store(out + offs_d, merged.to(out.dtype.element_ty))
    if WRITE_LSE:
        tl.store(lse_out, tl.where(total > 0.0, (m_safe + tl.log2(safe_total)) * LN2, float("-inf")))


@triton.jit
def merge_group(
    po,
    pl,
    out,
    lse_out,
    n_splits,
    stride_oh,
    stride_os,
    stride_lh,
    stride_outh,
    stride_lseh,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """Merge splits ``0 .. n_splits-1`` of the ``GROUP`` heads of one (request, KV head) at once.

    Pointers are at the group's first head (slot 0). Splits go ``CHUNK`` at a time through one
    ``[BLOCK_G, CHUNK, D]`` tile: every load of a chunk is issued together (one round trip, not
    one per head), and chunks combine by a running log-sum-exp. Partials bypass L1 (``.cg``).
    """
    offs_g = tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    m_run = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    # num_stages=1: a loop of (usually) one chunk gains nothing from pipelining, which would only
    # take shared memory.
    for c0 in tl.range(0, n_splits, CHUNK, num_stages=1):
        s = c0 + offs_c
        live = g_mask[:, None] & (s < n_splits)[None, :]
        lse = tl.load(
            pl + offs_g[:, None] * stride_lh + s[None, :],
            mask=live,
            other=float("-inf"),
            cache_modifier=".cg",
        )
        o = tl.load(
            po + offs_g[:, None, None] * stride_oh + s[None, :, None] * stride_os + offs_d[None, None, :],
            mask=live[:, :, None],
            other=0.0,
            cache_modifier=".cg",
        )
        valid = lse > float("-inf")
        o = tl.where(valid[:, :, None], o, 0.0)  # an empty split's output was never written
        m_new = tl.maximum(m_run, tl.max(lse, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_safe)
        w = tl.where(valid, tl.exp2(lse - m_safe[:, None]), 0.0)
        acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 1)
        l_run = l_run * alpha + tl.sum(w, 1)
        m_run = m_new
    has_keys = l_run > 0.0
    safe_l = tl.where(has_keys, l_run, 1.0)
    merged = acc / safe_l[:, None]
    out_ptrs = out + offs_g[:, None] * stride_outh + offs_d[None, :]
    tl.store(out_ptrs, merged.to(out.dtype.element_ty), mask=g_mask[:, None])
    if WRITE_LSE:
        lse_fin = tl.where(has_keys, (m_run + tl.log2(safe_l)) * LN2, float("-inf"))
        tl.store(lse_out + offs_g * stride_lseh, lse_fin, mask=g_mask)


@triton.jit
def store_split_and_merge_last(
    o,
    lse,
    heads,
    head_mask,
    kvh,
    split,
    n_splits,
    po_b,
    stride_oh,
    stride_os,
    pl_b,
    stride_lh,
    out_b,
    stride_outh,
    lse_b,
    stride_lseh,
    counter,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """Epilogue of one split program of the one-launch decode (see the module docstring).

    ``o [BLOCK_H, D]`` fp32 and ``lse [BLOCK_H]`` (base 2, -inf without keys) are this split's
    result for query heads ``heads`` (rows where ``head_mask``); ``*_b`` point at request b's rows
    of the partials and of the final output / lse; ``counter`` is this (request, KV head)'s.
    A request of one split writes its result directly (no counter); programs past the request's
    ``n_splits`` store nothing and never touch the counter.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    if split < n_splits:
        if n_splits == 1:
            out_ptrs = out_b + heads[:, None] * stride_outh + offs_d[None, :]
            tl.store(out_ptrs, o.to(out_b.dtype.element_ty), mask=head_mask[:, None])
            if WRITE_LSE:
                tl.store(lse_b + heads * stride_lseh, lse * LN2, mask=head_mask)
        else:
            has_keys = lse > float("-inf")
            o_ptrs = po_b + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
            tl.store(o_ptrs, o, mask=head_mask[:, None] & has_keys[:, None])
            tl.store(pl_b + heads * stride_lh + split, lse, mask=head_mask)
            # Every thread's stores above happen before the barrier; the atomic (one thread) then
            # releases them all at GPU scope. A fence in one thread alone would order only its own.
            tl.debug_barrier()
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == n_splits - 1:
                h0 = kvh * GROUP
                merge_group(
                    po_b + h0 * stride_oh,
                    pl_b + h0 * stride_lh,
                    out_b + h0 * stride_outh,
                    lse_b + h0 * stride_lseh,
                    n_splits,
                    stride_oh,
                    stride_os,
                    stride_lh,
                    stride_outh,
                    stride_lseh,
                    GROUP,
                    BLOCK_G,
                    CHUNK,
                    HEAD_DIM,
                    WRITE_LSE,
                )
                # Every split of this row has arrived: nobody else touches the counter in this launch.
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_splits_kernel(
    PartO,
    PartLse,
    Out,
    Lse,
    num_slots,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_outb,
    stride_outh,
    stride_lseb,
    MAX_SLOTS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    merge_head(
        PartO + b * stride_pb + h * stride_ph,
        PartLse + b * stride_lb + h * stride_lh,
        Out + b * stride_outb + h * stride_outh,
        Lse + b * stride_lseb + h,
        num_slots,
        stride_ps,
        MAX_SLOTS,
        HEAD_DIM,
        WRITE_LSE,
    )


def launch_merge(
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    num_slots: int,
    out: torch.Tensor,
    lse: torch.Tensor | None,
) -> None:
    """``out [B, H, D]`` (and ``lse [B, H]`` natural log, if given) from slots ``0 .. num_slots-1``
    of ``part_o [B, H, S, D]`` / ``part_lse [B, H, S]`` (base 2), in a launch of its own."""
    bsz, num_heads, head_dim = out.shape
    lse_t = lse if lse is not None else part_lse
    _merge_splits_kernel[(bsz, num_heads)](
        part_o,
        part_lse,
        out,
        lse_t,
        num_slots,
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        lse_t.stride(0) if lse is not None else 0,
        MAX_SLOTS=triton.next_power_of_2(max(num_slots, 2)),
        HEAD_DIM=head_dim,
        WRITE_LSE=lse is not None,
        num_warps=4 if head_dim >= 128 else 2,
    )
