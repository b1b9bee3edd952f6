"""The attention backend interface and the torch reference backend.

A backend turns one ForwardBatch into attention outputs for every layer. The model calls
``backend.forward(q, k, v, layer_id)`` and never looks inside; a new backend (Triton on CUDA)
plugs in without touching the model.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from llmir_lang.kernels import reference as ref


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # new tokens (>= 1 per request) over a cached prefix; prefill is prefix 0
    DECODE = "decode"  # exactly one new token per request


@dataclass(slots=True)
class ForwardBatch:
    """Everything one model forward needs to know about the batch.

    Invariants: ``input_ids``, ``positions`` and ``out_cache_loc`` have one entry per new token,
    grouped by request in batch order. ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` lists request b's
    slots for every token it has KV for after this step (prefix, then the new tokens), so its last
    ``qo_len[b]`` entries equal request b's part of ``out_cache_loc``.
    """

    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64: where this step's K/V go
    qo_indptr: torch.Tensor  # [B+1] int64: new tokens per request
    kv_indptr: torch.Tensor  # [B+1] int64
    kv_indices: torch.Tensor  # [kv_indptr[-1]] int64
    batch_size: int
    # Indices into the T new tokens whose logits the caller wants (last token of each request
    # for sampling; more for prompt logprobs / scoring). None = all tokens.
    logits_indices: torch.Tensor | None = None


class AttentionBackend(ABC):
    """Computes paged attention for a model whose KV lives in a KVPool.

    Contract: ``prepare(batch)`` is called once before the model forward of that batch; then
    ``forward`` is called once per layer, in layer order. ``forward`` stores this step's k/v into
    the pool at ``batch.out_cache_loc`` before attending, so new tokens see themselves.
    """

    def __init__(self, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], sm_scale: float):
        self.k_buffers = k_buffers
        self.v_buffers = v_buffers
        self.sm_scale = sm_scale
        self.batch: ForwardBatch | None = None

    def prepare(self, batch: ForwardBatch) -> None:
        self.batch = batch

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        """q ``[T, H, D]``, k/v ``[T, Hkv, D]`` for this step's tokens -> ``[T, H, D]``."""


class TorchAttentionBackend(AttentionBackend):
    """Reference backend: gather from the pool and run masked attention in fp32. CPU default."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        b = self.batch
        assert b is not None, "prepare(batch) must be called before forward"
        kb, vb = self.k_buffers[layer_id], self.v_buffers[layer_id]
        ref.store_kv(kb, vb, b.out_cache_loc, k, v)
        if b.mode is ForwardMode.DECODE:
            return ref.decode_attention(q, kb, vb, b.kv_indptr, b.kv_indices, self.sm_scale)
        return ref.extend_attention(q, kb, vb, b.qo_indptr, b.kv_indptr, b.kv_indices, self.sm_scale)
