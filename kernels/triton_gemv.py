"""Triton projections for decode steps: ``y = x @ W.T`` for a few rows ``x [M, K]`` and an
``nn.Linear`` weight ``W [N, K]`` (row-major, K contiguous), bf16/fp16 in, fp32 accumulation.

A decode step's projections read every weight once and do little arithmetic per byte, so they
are bound by how fast the weights stream from HBM. Two weight-streaming kernels:

* ``gemv`` (M <= 8): each program reads ``block_n`` rows of W in ``block_k`` slices with
  CUDA-core FMAs, keeps a ``[M, block_n, block_k]`` fp32 partial product and reduces it once at
  the end; many small programs keep enough loads in flight.
* ``skinny`` (M up to 128): ``tl.dot`` on a ``[block_m, block_k] x [block_k, block_n]`` tile
  per K slice, ``block_n`` small enough that the grid covers every SM.

Measured on one H100 80GB HBM3 at M = 1 (``benchmarks/gpu/bench_gemv.py``): cuBLAS (``F.linear``)
streams the Llama-3-8B step's weights at 2.0-2.8 TB/s per matrix (2.47 TB/s over a layer and the
output layer), these kernels at 2.5-3.15 TB/s (3.07 TB/s). Reference: ``F.linear`` in fp32.

On sm90+ the one-row kernels launch with programmatic dependent launch (``triton_common.PDL``): a
projection starts reading its weights while the kernel before it finishes, 1.21x on the 1B
step's projections and 1.08x on the 8B's (``benchmarks/gpu/probe_pdl.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from llmir_lang.kernels import triton_common
from llmir_lang.kernels.triton_common import pdl_wait


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


class SkinnyConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


GEMV_MAX_ROWS = 8
SKINNY_MAX_ROWS = 128


# ---- programmatic dependent launch (``triton_common``) ----------------------------------------
# A one-row projection reads megabytes of weights that no kernel before it writes, and only its
# input row (a few KB) depends on the kernel before: launched with PDL, each program loads its
# first weight slice before it waits for the kernel before.


PDL = True  # these kernels' own PDL switch (with triton_common.PDL): benchmarks compare


@triton.jit
def _weight_slice(w_ptrs, rn, N, EVEN_N: tl.constexpr):
    if EVEN_N:
        w = tl.load(w_ptrs, eviction_policy="evict_first")
    else:
        w = tl.load(w_ptrs, mask=rn[:, None] < N, other=0.0, eviction_policy="evict_first")
    return w


@triton.jit
def _gemv_kernel(
    X,
    W,
    Y,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    w_ptrs = W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    start = 0
    if USE_PDL:  # the first weight slice is read while the kernel before still runs
        w = _weight_slice(w_ptrs, rn, N, EVEN_N)
        pdl_wait()
        x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        start = BLOCK_K
    for _ in range(start, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        if EVEN_N:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=rn[:, None] < N, other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    y_ptrs = Y + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _skinny_kernel(
    X,
    W,
    Y,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = W + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]  # [BLOCK_K, BLOCK_N] view of W.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        w = tl.load(w_ptrs, mask=rn[None, :] < N, other=0.0, eviction_policy="evict_first")
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = Y + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


# the skinny kernel beat cuBLAS on output layers (N = vocab: 128,256 measured), not on a layer's
# matrices (up to 28,672 measured); above this N a matrix is taken for an output layer
SKINNY_MIN_N = 100_000


def default_gemv_config(n: int, k: int) -> GemvConfig | None:
    """A launch configuration near the best of ``bench_gemv.py``'s sweep on the Llama shapes (H100):
    4 rows a program for an output layer, one otherwise; None where K has no 256-multiple slice."""
    for block_k in (1024, 512, 256):
        if k % block_k == 0:
            return GemvConfig(4 if n >= 65536 else 1, block_k, 4, 3)
    return None


def default_skinny_config(m: int, n: int, k: int) -> SkinnyConfig | None:
    for block_k in (128, 64):
        if k % block_k == 0:
            block_m = 16 if m <= 16 else 32 if m <= 32 else 64
            return SkinnyConfig(block_m, 64, block_k, 4, 3)
    return None


def plan(x: torch.Tensor, w: torch.Tensor) -> GemvConfig | SkinnyConfig | None:
    """Which kernel ``linear`` runs for ``x @ w.T`` (None: cuBLAS): one row through ``gemv``;
    9-128 rows through ``skinny`` where ``w`` is an output layer's size; other batches measured even
    or slower than cuBLAS (``benchmarks/gpu/bench_gemv.py``)."""
    m, k = x.shape
    n = w.shape[0]
    if m == 1:
        return default_gemv_config(n, k)
    if GEMV_MAX_ROWS < m <= SKINNY_MAX_ROWS and n >= SKINNY_MIN_N:
        return default_skinny_config(m, n, k)
    return None


def _row_launch(cfg: GemvConfig, n: int, x: torch.Tensor) -> dict:
    """The launch arguments the weight-row kernels share (``gemv`` and the fused ones)."""
    return dict(
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        EVEN_N=n % cfg.block_n == 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **triton_common.pdl_launch(x, PDL),
    )


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cfg: GemvConfig) -> torch.Tensor:
    """``out [M, N] = x [M, K] @ w [N, K].T`` for ``M <= GEMV_MAX_ROWS``; ``K`` a multiple of
    ``cfg.block_k``."""
    m, k = x.shape
    n = w.shape[0]
    assert m <= GEMV_MAX_ROWS and x.stride(1) == 1 and w.stride(1) == 1 and k % cfg.block_k == 0
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x,
        w,
        out,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        out.stride(0),
        BLOCK_M=triton.next_power_of_2(m),
        **_row_launch(cfg, n, x),
    )
    return out


def skinny(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cfg: SkinnyConfig) -> torch.Tensor:
    """``out [M, N] = x [M, K] @ w [N, K].T``; ``K`` a multiple of ``cfg.block_k``."""
    m, k = x.shape
    n = w.shape[0]
    assert x.stride(1) == 1 and w.stride(1) == 1 and k % cfg.block_k == 0
    _skinny_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))](
        x,
        w,
        out,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        out.stride(0),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


# ---- one-row projections with the elementwise op before them fused in -------------------------
@triton.jit
def _norm_slice(X, R, G, ROut, k0, rk, w, acc, sq, pid, HAS_RES: tl.constexpr):
    """One ``BLOCK_K`` slice of ``_norm_gemv_kernel``: the input slice ``s`` (plus the residual,
    rounded once to the input dtype as the model's residual add; explicit fp32: the interpreter's
    own bf16 arithmetic is not IEEE; program 0 writes it out), its sum of squares, its products
    with the weight slice ``w``."""
    s = tl.load(X + k0 + rk)
    if HAS_RES:
        s = (s.to(tl.float32) + tl.load(R + k0 + rk).to(tl.float32)).to(X.dtype.element_ty)
        if pid == 0:
            tl.store(ROut + k0 + rk, s)
    s32 = s.to(tl.float32)
    sq += s32 * s32
    acc += w.to(tl.float32) * (s32 * tl.load(G + k0 + rk).to(tl.float32))[None, :]
    return acc, sq


@triton.jit
def _norm_gemv_kernel(
    X,
    R,
    G,
    W,
    Y,
    ROut,
    N,
    K,
    stride_wn,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """``y = rms_norm(x + r) @ W.T`` for one row in one pass: the norm's scale ``rstd`` is one
    number for the row, so ``y = rstd * ((s * g) @ W.T)`` with ``s = x + r``; each program
    accumulates the sum of squares of ``s`` next to its dot products (reading the row, a few KB,
    from L2) and scales at the end. The sum is rounded to the input dtype as the model's residual
    add; the normalized row is not rounded before the product (the model's plain ops round it:
    a difference of bf16 rounding). Program 0 also writes ``s`` (the next residual)."""
    pid = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    w_ptrs = W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    start = 0
    if USE_PDL:  # the first weight slice is read while the kernel before still runs
        w = _weight_slice(w_ptrs, rn, N, EVEN_N)
        pdl_wait()
        acc, sq = _norm_slice(X, R, G, ROut, 0, rk, w, acc, sq, pid, HAS_RES)
        w_ptrs += BLOCK_K
        start = BLOCK_K
    for k0 in range(start, K, BLOCK_K):
        w = _weight_slice(w_ptrs, rn, N, EVEN_N)
        acc, sq = _norm_slice(X, R, G, ROut, k0, rk, w, acc, sq, pid, HAS_RES)
        w_ptrs += BLOCK_K
    rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
    y = tl.sum(acc, axis=1) * rstd
    tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=rn < N)


@triton.jit
def _silu_slice(GU, K, k0, rk, w, acc):
    """One ``BLOCK_K`` slice of ``_silu_gemv_kernel``: ``silu(gate) * up`` rounded as
    ``model.silu_mul`` does (silu, then the product, in the input dtype), times the weight slice."""
    g = tl.load(GU + k0 + rk).to(tl.float32)
    u = tl.load(GU + K + k0 + rk).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(GU.dtype.element_ty).to(tl.float32)
    a = (a * u).to(GU.dtype.element_ty).to(tl.float32)
    return acc + w.to(tl.float32) * a[None, :]


@triton.jit
def _silu_gemv_kernel(
    GU,
    W,
    Y,
    N,
    K,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """``y = (silu(gate) * up) @ W.T`` for one row ``gate_up = [gate | up]`` (``K`` each), rounding
    as ``model.silu_mul`` does (silu, then the product, in the input dtype)."""
    pid = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    w_ptrs = W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    start = 0
    if USE_PDL:  # the first weight slice is read while the kernel before still runs
        w = _weight_slice(w_ptrs, rn, N, EVEN_N)
        pdl_wait()
        acc = _silu_slice(GU, K, 0, rk, w, acc)
        w_ptrs += BLOCK_K
        start = BLOCK_K
    for k0 in range(start, K, BLOCK_K):
        w = _weight_slice(w_ptrs, rn, N, EVEN_N)
        acc = _silu_slice(GU, K, k0, rk, w, acc)
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=rn < N)


def fused_config(n: int, k: int) -> GemvConfig | None:
    """The fused kernels' launch shape: 8 rows of W a program (every program also reads the whole
    input row, so more weight bytes per program keep those reads small); None where K has no
    256-multiple slice."""
    cfg = default_gemv_config(n, k)
    return None if cfg is None else cfg._replace(block_n=8)


def norm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    w: torch.Tensor,
    cfg: GemvConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) @ w.T, x + residual)`` for one row (``residual`` None: ``x``
    alone, and ``x`` is returned as the residual)."""
    k = x.shape[1]
    n = w.shape[0]
    assert x.shape[0] == 1 and x.is_contiguous() and w.stride(1) == 1 and k % cfg.block_k == 0
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    r_out = torch.empty_like(x) if residual is not None else x
    _norm_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x,
        residual if residual is not None else x,
        norm_weight,
        w,
        out,
        r_out,
        n,
        k,
        w.stride(0),
        eps,
        HAS_RES=residual is not None,
        **_row_launch(cfg, n, x),
    )
    return out, r_out


def silu_gemv(gate_up: torch.Tensor, w: torch.Tensor, cfg: GemvConfig) -> torch.Tensor:
    """``(silu(gate) * up) @ w.T`` for one row ``gate_up [1, 2K]``."""
    k = gate_up.shape[1] // 2
    n = w.shape[0]
    assert gate_up.shape[0] == 1 and gate_up.is_contiguous() and w.stride(1) == 1 and k % cfg.block_k == 0
    out = torch.empty(1, n, dtype=gate_up.dtype, device=gate_up.device)
    _silu_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        gate_up,
        w,
        out,
        n,
        k,
        w.stride(0),
        **_row_launch(cfg, n, gate_up),
    )
    return out
