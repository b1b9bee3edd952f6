"""Shared fixtures: locally trained tokenizers (cached on disk) and compilers over them."""

from __future__ import annotations

import pytest
import torch

from llmir_lang.executor.constraints import ConstraintCompiler, TokenizerInfo
from llmir_lang.executor.constraints.testing import shared_data_dir, train_test_tokenizer

torch.set_num_threads(1)

MODEL_VOCAB = 32064  # the model's embedding is padded past the tokenizer's 32000 ids


@pytest.fixture(scope="session")
def bpe_hf():
    """32k byte-level BPE (GPT-2 / Llama-3 scheme)."""
    return train_test_tokenizer("byte_level_bpe", 32000)


@pytest.fixture(scope="session")
def bpe_info(bpe_hf) -> TokenizerInfo:
    return TokenizerInfo.from_hf(bpe_hf, vocab_size=MODEL_VOCAB)


@pytest.fixture(scope="session")
def sp_hf():
    """Small SentencePiece-style BPE (``▁`` spaces, ``<0xNN>`` byte fallback)."""
    return train_test_tokenizer("sentencepiece_bpe", 2000, 2_000_000)


@pytest.fixture(scope="session")
def sp_info(sp_hf) -> TokenizerInfo:
    return TokenizerInfo.from_hf(sp_hf)


@pytest.fixture(scope="session")
def compiler(bpe_info) -> ConstraintCompiler:
    return ConstraintCompiler(bpe_info, cache_size=4096)


@pytest.fixture(scope="session")
def data_dir():
    d = shared_data_dir()
    if not (d / "jsonschemabench").is_dir():
        pytest.skip(f"shared test data not found at {d} (set LLMIR_SHARED_DATA)")
    return d



@pytest.fixture()
def parser_limits(monkeypatch):
    """``parser_limits(name=value, ...)``: llguidance matchers made afterwards (the forcing guard's
    byte-level copies too) run under these ``PARSER_LIMITS`` instead; put back after the test."""
    from llmir_lang.executor.constraints import llguidance_backend as llg_backend

    def set_limits(**values: int) -> None:
        for name, value in values.items():
            monkeypatch.setitem(llg_backend.PARSER_LIMITS, name, value)
        llg_backend.parser_limits.cache_clear()
        llg_backend._byte_template.cache_clear()

    yield set_limits
    monkeypatch.undo()
    llg_backend.parser_limits.cache_clear()
    llg_backend._byte_template.cache_clear()
