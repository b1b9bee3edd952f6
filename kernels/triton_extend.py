"""Triton extend attention: ragged new tokens over a paged prefix, causal among themselves.

One program per (query head, block of ``BLOCK_M`` new tokens of one request). Request b's keys are
its slot list ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` (prefix, then the new tokens, already
stored), read through the list like every kernel here. In that key order, new token i of a request
with prefix P sits at key position P + i. Every query of a block starting at new token m0 sees all
keys before P + m0, so those tiles run without a mask; only the last ``BLOCK_M + BLOCK_N`` keys need
the causal mask.

With ``k_new``/``v_new`` (this step's keys/values ``[T, Hkv, D]``, the same values the pool holds at
the new tokens' slots) the kernel (``NEW_KV``) reads only the prefix through the slot list and the new
tokens' keys straight from those tensors by token index, in three loops: prefix tiles (the last one
bounded), new-token tiles before the block's first query (no mask), the diagonal (causal mask). New
tiles start at new token 0, not at key position 0, so they stay aligned for wide/bulk loads; how
they are loaded is ``ExtendConfig.new_kv_loads``.

The (request, block) list comes from ``plan_extend``, a host-side step (one sync) done once per
batch; blocks are ordered longest first so that the long causal blocks do not trail the launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from llmir_lang.kernels.triton_common import LOG2E, mma, upcast_dots

NEW_KV_LOADS: tuple[str, ...] = ("pointer", "descriptor")


@dataclass(frozen=True, slots=True)
class ExtendConfig:
    """Launch configuration of the extend kernels.

    The k_new kernel (see ``extend_attention``) shares ``block_m`` (one plan serves both) and has
    its own ``new_kv_block_n`` / ``new_kv_num_warps`` / ``new_kv_num_stages`` (None: the same as
    the gathered kernel's), since the two kernels are fastest at different shapes.
    ``new_kv_loads`` picks how it reads the new tokens' K/V: ``"pointer"`` (one int64 base per
    tile, a loop-invariant int32 offset tile) or ``"descriptor"`` (a host-built tensor descriptor
    over ``[T, Hkv * D]``: TMA bulk loads on Hopper; needs heads adjacent, head stride == D, and
    16-byte aligned base and token stride, else the launch takes ``"pointer"``).
    ``tl.make_block_ptr`` is gone from Triton 3.9, so it is not offered.
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    new_kv_loads: str = "pointer"
    new_kv_block_n: int | None = None
    new_kv_num_warps: int | None = None
    new_kv_num_stages: int | None = None

    def __post_init__(self) -> None:
        if self.new_kv_loads not in NEW_KV_LOADS:
            raise ValueError(f"ExtendConfig.new_kv_loads={self.new_kv_loads!r}; use one of {NEW_KV_LOADS}")


def default_extend_config(head_dim: int, device: torch.device) -> ExtendConfig:
    if device.type != "cuda":  # interpreter: tiny tiles so that short tests cross tile borders
        return ExtendConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    # H100 sweeps (sweep_extend_configs.py): through the slot list 128x64 tiles with 4 warps beat
    # 8 warps at d128 (357/395/420 TFLOP/s at 4k/8k/16k tokens). With k_new, 128x128 tiles with
    # 8 warps are best (428/491/527; 372 against 387 gathered for 4 x 1k over 4k prefixes), while
    # 128x64 with 4 warps spills and drops to ~100. Pointer and descriptor loads: within ~5%.
    return ExtendConfig(
        block_m=128, block_n=64, num_warps=4, num_stages=3, new_kv_block_n=128, new_kv_num_warps=8
    )


# A batch of at most this many new tokens (and no more prefix than new tokens) has too few
# 128-row query blocks to fill an H100 with the 8-warp k_new kernel: 64-row blocks, 64-key tiles,
# 4 warps and descriptor loads run it faster (H100 sweep at d128: 466 against 428 TFLOP/s at 4k
# tokens, 496 against 491 at 8k; at 16k the default wins, 527 against 472).
SMALL_EXTEND_TOKENS = 8192
SMALL_EXTEND_CONFIG = ExtendConfig(
    block_m=64, block_n=64, num_warps=4, num_stages=3, new_kv_loads="descriptor"
)


def extend_config_for(
    base: ExtendConfig, device: torch.device, new_tokens: int, prefix_tokens: int
) -> ExtendConfig:
    """The launch configuration for one extend batch of ``new_tokens`` new tokens over
    ``prefix_tokens`` cached ones (all requests together; both known on the host from tensor
    shapes, no sync): ``SMALL_EXTEND_CONFIG`` for a short batch that is mostly new tokens on CUDA,
    else ``base``. Plan the batch with the returned config's ``block_m``."""
    if device.type == "cuda" and new_tokens <= SMALL_EXTEND_TOKENS and prefix_tokens <= new_tokens:
        return SMALL_EXTEND_CONFIG
    return base


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
def _softmax_tile(q, k, m_i, l_i, visible, sm_scale_log2, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over one key tile ``k [BLOCK_N, D]`` (``visible`` only if MASKED): returns the
    probabilities, the rescale of the old accumulator, and the new max and sum. Callers load V
    only after this, so V's registers are not live across the scores.
    """
    qk = mma(q, tl.trans(k), UPCAST)
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * sm_scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * sm_scale_log2 - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _load_new(
    src,
    t0,
    t_end,
    col,
    stride_t,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BOUNDED: tl.constexpr,
    LOADS: tl.constexpr,
):
    """Rows ``[t0, t0 + BLOCK_N)`` (absolute token indices) of one KV head of k_new / v_new.

    ``src`` is the descriptor (LOADS 1; the head at column ``col``) or the head's token-0 pointer.
    BOUNDED: rows at or past ``t_end`` (the request's end) read as zeros (pointer) or as the next
    request's values or zeros past ``T`` (descriptor); the caller masks them out.
    """
    if LOADS == 1:
        tile = src.load([t0, col])
    else:
        # One int64 scalar per tile; the offset tile is int32 and loop-invariant.
        offs_t = tl.arange(0, BLOCK_N)
        ptrs = (
            src + t0.to(tl.int64) * stride_t + (offs_t[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :])
        )
        if BOUNDED:
            tile = tl.load(ptrs, mask=(t0 + offs_t < t_end)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


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
    KNew,
    VNew,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
    NEW_KV: tl.constexpr,
    LOADS: tl.constexpr,
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

    if not NEW_KV:
        # Keys before prefix + m0 are visible to every query here: whole tiles, no mask.
        full_end = ((prefix + m0) // BLOCK_N) * BLOCK_N
        for start in range(0, full_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            slot = tl.load(idx_base + offs_n).to(tl.int64)
            k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :])
            p, alpha, m_i, l_i = _softmax_tile(q, k, m_i, l_i, None, sm_scale_log2, False, UPCAST)
            v = tl.load(v_base + slot[:, None] * stride_vn + offs_d[None, :])
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)

        # The diagonal: key position n is visible to new token i iff n <= prefix + i.
        q_pos = prefix + offs_m
        tail_end = prefix + tl.minimum(m0 + BLOCK_M, q_len)
        for start in range(full_end, tail_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < tail_end
            slot = tl.load(idx_base + offs_n, mask=n_mask, other=0).to(tl.int64)
            k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
            p, alpha, m_i, l_i = _softmax_tile(q, k, m_i, l_i, visible, sm_scale_log2, True, UPCAST)
            v = tl.load(v_base + slot[:, None] * stride_vn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)
    else:
        # 1. The prefix, through the slot list; every query sees it. Whole tiles, then the rest.
        prefix_full = (prefix // BLOCK_N) * BLOCK_N
        for start in range(0, prefix_full, BLOCK_N):
            slot = tl.load(idx_base + start + tl.arange(0, BLOCK_N)).to(tl.int64)
            k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :])
            p, alpha, m_i, l_i = _softmax_tile(q, k, m_i, l_i, None, sm_scale_log2, False, UPCAST)
            v = tl.load(v_base + slot[:, None] * stride_vn + offs_d[None, :])
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)
        # Not pipelined (num_stages=1): at most one tile, and its buffers would cost occupancy.
        for start in tl.range(prefix_full, prefix, BLOCK_N, num_stages=1):
            n_mask = start + tl.arange(0, BLOCK_N) < prefix
            slot = tl.load(idx_base + start + tl.arange(0, BLOCK_N), mask=n_mask, other=0).to(tl.int64)
            k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            p, alpha, m_i, l_i = _softmax_tile(q, k, m_i, l_i, n_mask[None, :], sm_scale_log2, True, UPCAST)
            v = tl.load(v_base + slot[:, None] * stride_vn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)

        t_first = q_start.to(tl.int32)
        t_end = t_first + q_len
        if LOADS == 1:
            kn_src = KNew
            vn_src = VNew
        else:
            kn_src = KNew + kvh * stride_knh
            vn_src = VNew + kvh * stride_vnh
        col = kvh * HEAD_DIM
        # 2. New tokens before the block's first query: all visible, no mask. With BLOCK_M a
        # multiple of BLOCK_N this covers [0, m0) exactly.
        new_full = (m0 // BLOCK_N) * BLOCK_N
        for j in range(0, new_full, BLOCK_N):
            k = _load_new(kn_src, t_first + j, t_end, col, stride_knt, BLOCK_N, HEAD_DIM, False, LOADS)
            p, alpha, m_i, l_i = _softmax_tile(q, k, m_i, l_i, None, sm_scale_log2, False, UPCAST)
            v = _load_new(vn_src, t_first + j, t_end, col, stride_vnt, BLOCK_N, HEAD_DIM, False, LOADS)
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)

        # 3. The diagonal: new token j is visible to new token i iff j <= i. For a real query that
        # implies j < q_len, so rows past the request (zeros or the next request's) are masked out.
        # BLOCK_M / BLOCK_N tiles at most: not pipelined either.
        for j in tl.range(new_full, tl.minimum(m0 + BLOCK_M, q_len), BLOCK_N, num_stages=1):
            k = _load_new(kn_src, t_first + j, t_end, col, stride_knt, BLOCK_N, HEAD_DIM, True, LOADS)
            visible = (j + tl.arange(0, BLOCK_N))[None, :] <= offs_m[:, None]
            p, alpha, m_i, l_i = _softmax_tile(q, k, m_i, l_i, visible, sm_scale_log2, True, UPCAST)
            v = _load_new(vn_src, t_first + j, t_end, col, stride_vnt, BLOCK_N, HEAD_DIM, True, LOADS)
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)

    # Every real query sees at least key 0 of the request, so l_i > 0 on the rows stored.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        Out + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_mask[:, None],
    )


def _check_new_kv(q: torch.Tensor, k_buffer: torch.Tensor, name: str, t: torch.Tensor) -> None:
    want = (q.shape[0], k_buffer.shape[1], k_buffer.shape[2])
    if tuple(t.shape) != want or t.dtype != k_buffer.dtype or t.device != q.device or t.stride(-1) != 1:
        raise ValueError(
            f"extend_attention: {name} must be [T, Hkv, D] = {list(want)} of the pool's dtype "
            f"{k_buffer.dtype} on {q.device}, contiguous along D (got {list(t.shape)} {t.dtype} on "
            f"{t.device}, strides {t.stride()}); pass the keys/values just stored, or None"
        )


def _loads_for(t: torch.Tensor, loads: str) -> str:
    """``loads``, or ``"pointer"`` where the descriptor's 2-D view ``[T, Hkv * D]`` does not apply
    (heads not adjacent) or TMA would refuse it (base or token stride not 16-byte aligned)."""
    aligned = t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
    adjacent = t.shape[1] == 1 or t.stride(1) == t.shape[2]
    return loads if aligned and adjacent and t.shape[0] > 0 else "pointer"


def _new_kv_arg(t: torch.Tensor, block_n: int, loads: str) -> object:
    if loads != "descriptor":
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor

    num_tokens, num_kv, head_dim = t.shape
    return TensorDescriptor(t, [num_tokens, num_kv * head_dim], [t.stride(0), 1], [block_n, head_dim])


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
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``reference.extend_attention``. Pass ``plan`` (built with this call's
    ``config.block_m``) to skip the host step, as the attention backend does once per batch.

    ``k_new``/``v_new`` ``[T, Hkv, D]`` (optional, together): the new tokens' keys/values in
    ``qo_indptr`` order, equal to what the pool holds at their slots (the caller stored them this
    step); any token/head stride, contiguous along D, the pool's dtype. With them the new tokens'
    keys are read from these tensors instead of through the slot list; the result is the same.
    """
    if (k_new is None) != (v_new is None):
        raise ValueError("extend_attention: pass k_new and v_new together, or neither")
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
    args = (q, k_buffer, v_buffer, out, qo_indptr, kv_indptr, kv_indices, plan.block_req, plan.block_start)
    strides = (*q.stride()[:2], *k_buffer.stride()[:2], *v_buffer.stride()[:2], *out.stride()[:2])
    meta = {
        "GROUP": num_heads // k_buffer.shape[1],
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "HEAD_DIM": head_dim,
        "UPCAST": upcast_dots(q.dtype, q.device),
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "NEW_KV": False,
        "LOADS": 0,
    }
    grid = (num_heads, plan.num_blocks)
    if k_new is None or v_new is None:  # every key through the slot list (unused k_new args)
        _extend_kernel[grid](*args, sm_scale * LOG2E, *strides, k_buffer, v_buffer, 0, 0, 0, 0, **meta)
        return out
    _check_new_kv(q, k_buffer, "k_new", k_new)
    _check_new_kv(q, v_buffer, "v_new", v_new)
    loads = cfg.new_kv_loads
    if _loads_for(k_new, loads) != loads or _loads_for(v_new, loads) != loads:
        loads = "pointer"
    block_n = cfg.new_kv_block_n or cfg.block_n
    meta.update(
        BLOCK_N=block_n,
        num_warps=cfg.new_kv_num_warps or cfg.num_warps,
        num_stages=cfg.new_kv_num_stages or cfg.num_stages,
        NEW_KV=True,
        LOADS=NEW_KV_LOADS.index(loads),
    )
    new_kv = (_new_kv_arg(k_new, block_n, loads), _new_kv_arg(v_new, block_n, loads))
    _extend_kernel[grid](
        *args, sm_scale * LOG2E, *strides, *new_kv, *k_new.stride()[:2], *v_new.stride()[:2], **meta
    )
    return out
