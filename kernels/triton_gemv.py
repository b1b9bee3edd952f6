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
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


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
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    w_ptrs = W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
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


SKINNY_MIN_N = 32768  # the skinny kernel beats cuBLAS on output layers (N = vocab), not on a layer's


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
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        EVEN_N=n % cfg.block_n == 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
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
