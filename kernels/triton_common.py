"""Pieces shared by the Triton kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def upcast_dots(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernels must run ``tl.dot`` on fp32 copies of their operands.

    Triton's CPU interpreter computes bf16 ``tl.dot`` on the raw bit patterns (wrong by 1e10), so
    under ``TRITON_INTERPRET`` bf16 operands are widened first; values are already bf16-rounded,
    so the result matches the GPU's bf16 tensor-core product to fp32 accuracy. On the GPU: never.
    """
    return device.type != "cuda" and dtype == torch.bfloat16


@triton.jit
def mma(a, b, UPCAST: tl.constexpr):
    """``tl.dot(a, b)`` with fp32 accumulation; see ``upcast_dots`` for ``UPCAST``."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)
