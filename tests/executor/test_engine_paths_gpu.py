"""The engine's CPU-tested paths on CUDA: mixed steps give the tokens of separate steps, and
jump-forward gives the tokens of plain decoding, with the bundled model in fp32 (exact tokens need
fp32). The engine runs its CUDA path (Triton backend object, CUDA graphs, compiled ops, device
slot table); in fp32 the attention itself falls back to the torch reference, and the Triton
kernels are checked against that reference in bf16 by tests/kernels/test_triton_kernels_gpu.py.
Skipped without a GPU (run through the ``device`` tool)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from llmir_lang.executor.backend import EngineBackend  # noqa: E402
from llmir_lang.executor.engine import Engine  # noqa: E402


@pytest.fixture(scope="module")
def backend():
    be = EngineBackend(Engine(device="cuda", kv_memory="1GiB"))
    assert type(be.engine.backend).__name__ != "TorchAttentionBackend"  # the Triton path runs
    yield be
    be.engine.shutdown()


def test_mixed_steps_on_cuda(backend):
    from test_mixed_step import check_mixed_equals_separate

    # fp32 on the GPU: a different batch shape picks different GEMM kernels, which moves a
    # logprob by up to ~1e-4 (measured 1.4e-4 on an H100); the tokens must still be identical
    check_mixed_equals_separate(backend, atol=1e-3)


@pytest.mark.parametrize("batched", [False, True], ids=["sequential", "batched"])
def test_jump_forward_on_cuda_gives_the_same_tokens(backend, batched):
    from test_jump_forward import test_greedy_output_is_the_same_with_jump_forward_on_and_off as check

    check(backend, batched)


def test_speculation_on_cuda_gives_the_same_tokens(backend):
    """Prompt-lookup drafts verified through the Triton extend path (logits at every draft row),
    between graphed decode steps, keep plain greedy decoding's tokens."""
    from test_speculate import check_spec_equals_plain

    eng = backend.engine
    saved = eng.speculative_draft_tokens
    try:
        # fp32 GEMMs of an extend and of a decode differ by up to ~1e-4 in a logprob on an H100
        check_spec_equals_plain(eng, atol=1e-3)
    finally:
        eng.speculative_draft_tokens = saved


def test_run_ahead_on_cuda_gives_the_same_tokens(backend):
    """Decode steps queued before the previous step's tokens are read, through the decode graphs:
    the same tokens as reading each step's tokens first (run-ahead on against off)."""
    from test_run_ahead import check_run_ahead_equals_plain

    check_run_ahead_equals_plain(backend.engine, atol=1e-4)
