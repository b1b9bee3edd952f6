"""Shared setup for the kernel tests."""

from __future__ import annotations

import importlib.util

import pytest
import torch

# This machine has few cores shared by many jobs: keep torch to one thread.
torch.set_num_threads(1)

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def triton_interpreter():
    """``TRITON_INTERPRET=1`` for one test module, so Triton kernels run on CPU tensors.

    Scoped to the module so that other tests keep the torch reference on the CPU. Triton reads the
    variable when a kernel is defined, and ``llmir_lang.kernels`` imports its Triton modules on first
    use, so the first use must happen under this fixture.
    """
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    from llmir_lang.kernels import triton_decode
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton_decode._decode_partial_kernel, InterpretedFunction):
        mp.undo()
        pytest.skip("the Triton kernel modules were imported without TRITON_INTERPRET=1 in this process")
    yield
    mp.undo()
