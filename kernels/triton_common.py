"""Pieces shared by the Triton kernels: fp32-accumulating dots, and programmatic dependent launch."""

from __future__ import annotations

import functools
import os

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


# ---- programmatic dependent launch (Hopper and newer) ------------------------------------------
# A decode step at batch 1 is a chain of kernels of a few microseconds each; between two of them
# the GPU drains one kernel's last wave, then launches and ramps up the next. Launched with PDL
# (``launch_pdl``), a kernel's programs may start while the kernel before it still runs its last
# wave; each may read what no kernel of this step writes (a projection's first weight slice),
# then waits (``gdc_wait``: the kernel before has finished and its writes are visible) before it
# reads anything else or writes. Right after that wait it lets the kernel after it launch
# (``gdc_launch_dependents``): never before its own wait, so a kernel that starts early can only
# overlap one that has itself seen every earlier kernel finish. A kernel launched without PDL
# ignores both instructions. Kernels that take it: the one-row projections (``triton_gemv``), the
# decode step's rotary and KV store (``triton_misc.rope_store_kv``) and decode attention
# (``triton_decode``). ``USE_PDL`` is off in the CPU interpreter and before Hopper.

PDL = True  # the switch: False launches every kernel without PDL (benchmarks compare both)

if os.environ.get("TRITON_INTERPRET", "0") == "1":

    @triton.jit
    def pdl_wait():  # the CPU interpreter has no grid-dependency instructions (nor PDL launches)
        tl.program_id(0)

else:

    @triton.jit
    def pdl_wait():
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def _triton_has_pdl() -> bool:
    """The instructions and the ``launch_pdl`` launch option (Triton 3.3 and newer)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


_GDC = _triton_has_pdl()


@functools.cache
def _pdl_device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_ok(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL: ``PDL`` on, a CUDA device of compute
    capability 9.0 or newer, and a Triton that has the instructions (3.3 and newer)."""
    return (
        PDL
        and t.is_cuda
        and _GDC
        and _pdl_device_ok(t.device.index if t.device.index is not None else torch.cuda.current_device())
    )


def pdl_launch(t: torch.Tensor, on: bool = True) -> dict:
    """The launch arguments of a kernel with a ``USE_PDL`` constexpr, for tensors on ``t``'s device
    (``on``: the kernel module's own switch, for benchmarks that turn one kind of kernel off)."""
    return dict(USE_PDL=True, launch_pdl=True) if on and pdl_ok(t) else dict(USE_PDL=False)
