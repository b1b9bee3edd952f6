"""Triton shared-prefix decode (cascade / Hydragen): the common prefix once, as a matrix product.

B decoding requests share the KV slots ``prefix_indices [P]`` and each has its own suffix. Plain
decode reads the prefix B times. Here the query rows of all B requests that map to one KV head
(``B * group`` rows) form the M dimension of one tiled attention over the prefix, so the prefix is
read once per ``BLOCK_M`` rows and the work runs on the tensor cores. Two launches:
1. the prefix kernel writes fp32 partials (output + base-2 lse) for ``Sp`` prefix splits;
2. the decode kernel attends each request to its own suffix in one split and, in its epilogue,
   merges the ``Sp`` prefix partials of its rows by log-sum-exp and writes the final output.
Slots without keys hold lse = -inf and get weight 0, so an empty suffix or prefix is fine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from llmir_lang.kernels import triton_decode as td
from llmir_lang.kernels.support import num_sms
from llmir_lang.kernels.triton_common import LOG2E, mma, upcast_dots


@dataclass(frozen=True, slots=True)
class SharedPrefixConfig:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    min_chunk: int = 512  # prefix tokens per split, at least
    max_prefix_splits: int = 64
    programs_per_sm: int = 2
    suffix: td.DecodeConfig = td.DecodeConfig()  # launched with one split per suffix


def default_shared_prefix_config(
    head_dim: int, device: torch.device, prefix_len: int = 0
) -> SharedPrefixConfig:
    if device.type != "cuda":
        return SharedPrefixConfig(
            block_m=16,
            block_n=16,
            num_warps=1,
            num_stages=1,
            min_chunk=16,
            max_prefix_splits=4,
            suffix=td.default_decode_config(head_dim, device),
        )
    if prefix_len <= (4096 if head_dim <= 64 else 2048):
        # H100 sweep at the engine's shapes (benchmarks/gpu/sweep_shared_prefix.py): with a short
        # prefix the grid of 128-row blocks is too small (1B, 64 x 1k: 32 programs on 132 SMs);
        # 64-row blocks, 128-key tiles and 256-token splits took 22-36 us against 30-43 us.
        return SharedPrefixConfig(block_m=64, block_n=128, num_warps=4, num_stages=2, min_chunk=256)
    # H100 sweep (benchmarks/results): 128 rows x 64 keys, 8 warps, >= 512 prefix tokens per split.
    return SharedPrefixConfig(num_warps=8 if head_dim >= 128 else 4)


def prefix_splits(prefix_len: int, num_rows: int, num_kv_heads: int, cfg: SharedPrefixConfig, device) -> int:
    """Splits of the prefix so that the grid fills the GPU without slices under ``min_chunk``."""
    row_blocks = math.ceil(num_rows / cfg.block_m)
    want = math.ceil(num_sms(device) * cfg.programs_per_sm / max(1, row_blocks * num_kv_heads))
    most = max(1, math.ceil(prefix_len / cfg.min_chunk))
    return max(1, min(want, most, cfg.max_prefix_splits))


@triton.jit
def _prefix_partial_kernel(
    Q,
    K,
    V,
    PrefixIndices,
    PartO,
    PartLse,
    prefix_len,
    num_rows,
    per_split,
    sm_scale_log2,
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
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    row_block = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # Row r of this KV head's tile is query head kvh*GROUP + r % GROUP of request r // GROUP.
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    req = (rows // GROUP).to(tl.int64)
    head = kvh * GROUP + rows % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + req[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )
    lo = split * per_split
    hi = tl.minimum(lo + per_split, prefix_len)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        slot = tl.load(PrefixIndices + offs_n, mask=n_mask, other=0).to(tl.int64)
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
    o_ptrs = (
        PartO + req[:, None] * stride_ob + head[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    )
    tl.store(o_ptrs, acc / denom[:, None], mask=row_mask[:, None] & has_keys[:, None])
    tl.store(PartLse + req * stride_lb + head * stride_lh + split, lse, mask=row_mask)


def shared_prefix_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    prefix_indices: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    suffix_kv_indices: torch.Tensor,
    sm_scale: float,
    *,
    return_lse: bool = False,
    config: SharedPrefixConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.shared_prefix_decode`` (plus the merged lse if ``return_lse``).

    The prefix split count is chosen on the host from P and B (both known without a sync); each
    suffix's split count is chosen in the decode kernel from its length.
    """
    bsz, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_heads // num_kv_heads
    prefix_len = int(prefix_indices.shape[0])
    cfg = config or default_shared_prefix_config(head_dim, q.device, prefix_len)
    num_rows = bsz * group
    n_pre = prefix_splits(prefix_len, num_rows, num_kv_heads, cfg, q.device) if prefix_len > 0 else 0
    per_split = triton.cdiv(triton.cdiv(max(prefix_len, 1), max(n_pre, 1)), cfg.block_n) * cfg.block_n
    if n_pre:
        n_pre = triton.cdiv(prefix_len, per_split)  # rounding up per_split can leave splits unused
    part_o, part_lse, _ = td.alloc_partials(
        bsz, num_heads, max(n_pre, 1), head_dim, q.device, with_counters=False
    )
    out = torch.empty(bsz, num_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, num_heads, dtype=torch.float32, device=q.device) if return_lse else None
    if bsz == 0:
        return (out, lse) if lse is not None else out
    if n_pre:
        grid = (triton.cdiv(num_rows, cfg.block_m), num_kv_heads, n_pre)
        _prefix_partial_kernel[grid](
            q,
            k_buffer,
            v_buffer,
            prefix_indices,
            part_o,
            part_lse,
            prefix_len,
            num_rows,
            per_split,
            sm_scale * LOG2E,
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
            GROUP=group,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            HEAD_DIM=head_dim,
            UPCAST=upcast_dots(q.dtype, q.device),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    # Each suffix in one split; its epilogue merges the prefix partials and writes the result.
    td.launch_decode_partial(
        q,
        k_buffer,
        v_buffer,
        suffix_kv_indptr[: bsz + 1],
        suffix_kv_indices,
        1,
        out.unsqueeze(2),
        (lse if lse is not None else out).unsqueeze(2),
        0,
        sm_scale,
        cfg.suffix,
        direct=True,
        store_lse=lse is not None,
        merge=(part_o, part_lse, n_pre),
    )
    return (out, lse) if lse is not None else out
