"""Which calls the Triton kernels take, and the one-time warnings when they must fall back.

A call goes to Triton when its tensors are on a CUDA device the kernels support (compute
capability 8.0 or newer), or on the CPU while ``TRITON_INTERPRET=1`` is set (the tests' mode).
Anything else the kernels do not cover (head dim, dtype, old GPU, Triton missing on CUDA) falls
back to the torch reference with one warning per kernel and reason: slower, never wrong.

NOTE: Triton reads ``TRITON_INTERPRET`` when a kernel is *defined*, so the Triton modules of this
package are imported lazily, on the first call that takes them; set the variable before that.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

# Powers of two that tl.dot accepts as the reduction dim; 16 and 32 exist for the CPU tests.
SUPPORTED_HEAD_DIMS: frozenset[int] = frozenset({16, 32, 64, 128})
SUPPORTED_DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16})
MIN_CAPABILITY: tuple[int, int] = (8, 0)

_warned: set[tuple[str, str]] = set()


class KernelFallbackWarning(UserWarning):
    """A kernel call ran on the torch reference because Triton does not cover it."""


def warn_once(kernel: str, reason: str) -> None:
    """Warn that ``kernel`` falls back to the reference, once per (kernel, reason)."""
    key = (kernel, reason)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"llmir_lang.kernels.{kernel}: {reason}; using the torch reference (correct but slower). "
        "Use fp16/bf16 tensors with head dim 64 or 128 on a GPU of compute capability >= 8.0 "
        "to get the Triton kernel.",
        KernelFallbackWarning,
        stacklevel=3,
    )


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_ok(kernel: str, t: torch.Tensor) -> bool:
    """True if ``t``'s device can run Triton; warns (once) only where a GPU is left unused."""
    if t.device.type == "cpu":
        return interpret_mode() and triton_available()
    if t.device.type != "cuda":
        return False
    if not triton_available():
        warn_once(kernel, "triton is not installed")
        return False
    cap = _capability(t.device.index if t.device.index is not None else torch.cuda.current_device())
    if cap < MIN_CAPABILITY:
        warn_once(kernel, f"GPU compute capability {cap[0]}.{cap[1]} is below 8.0")
        return False
    return True


def attention_ok(kernel: str, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> bool:
    """True if an attention call with these tensors runs on Triton (else warn once and fall back)."""
    if not device_ok(kernel, q):
        return False
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS or k_buffer.shape[-1] != head_dim:
        warn_once(kernel, f"head dim {head_dim} is not one of {sorted(SUPPORTED_HEAD_DIMS)}")
        return False
    if q.dtype not in SUPPORTED_DTYPES:
        warn_once(kernel, f"dtype {q.dtype} is not float16 or bfloat16")
        return False
    if k_buffer.dtype != q.dtype or v_buffer.dtype != q.dtype:
        warn_once(kernel, f"KV pool dtype {k_buffer.dtype} differs from the query dtype {q.dtype}")
        return False
    if q.shape[-2] % k_buffer.shape[-2] != 0:
        warn_once(kernel, f"{q.shape[-2]} query heads are not a multiple of {k_buffer.shape[-2]} KV heads")
        return False
    return True


def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device``; a stand-in of 8 on the CPU (interpreter) keeps grids small."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
