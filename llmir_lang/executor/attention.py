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
    """Reference backend: gather from the pool and run masked attention in fp32. CPU default.

    Extend runs ``reference.extend_attention``. Decode runs a batched form of
    ``reference.decode_attention`` (same math, one padded gather for the whole batch instead of a
    Python loop over requests). When every request of a decode batch starts with the same KV slots
    (a shared radix-cache prefix of at least ``min_shared_prefix`` tokens), the prefix is gathered and
    attended once for all queries, the per-request suffixes separately, and the two merged by
    log-sum-exp (the cascade idea); the result is the same attention.
    """

    min_shared_prefix = 32

    def prepare(self, batch: ForwardBatch) -> None:
        super().prepare(batch)
        self._idx = self._valid = self._prefix_idx = None
        if batch.mode is not ForwardMode.DECODE:
            return
        lens = batch.kv_indptr[1:] - batch.kv_indptr[:-1]
        width = int(lens.max())
        cols = torch.arange(width, device=lens.device)
        valid = cols.unsqueeze(0) < lens.unsqueeze(1)  # [B, L]
        pos = (batch.kv_indptr[:-1].unsqueeze(1) + cols.unsqueeze(0)).clamp_max(batch.kv_indices.numel() - 1)
        idx = batch.kv_indices[pos].masked_fill(~valid, 0)
        shared = 0
        if batch.batch_size > 1:
            same = ((idx == idx[:1]) & valid).all(0)
            shared = min(int(same.int().cumprod(0).sum()), int(lens.min()) - 1)
        if shared >= self.min_shared_prefix:
            self._prefix_idx = idx[0, :shared]
            idx, valid = idx[:, shared:], valid[:, shared:]
        self._idx, self._valid = idx, valid

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        b = self.batch
        assert b is not None, "prepare(batch) must be called before forward"
        kb, vb = self.k_buffers[layer_id], self.v_buffers[layer_id]
        ref.store_kv(kb, vb, b.out_cache_loc, k, v)
        if b.mode is ForwardMode.DECODE:
            return self._decode(q, kb, vb)
        return ref.extend_attention(q, kb, vb, b.qo_indptr, b.kv_indptr, b.kv_indices, self.sm_scale)

    def _decode(self, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
        bsz, h, d = q.shape
        hkv = kb.shape[1]
        g = h // hkv
        qg = q.float().view(bsz, hkv, g, d)  # query heads grouped by their KV head
        # per-request part: [B, Hkv, G, L]
        keys = kb[self._idx].float().permute(0, 2, 3, 1)  # [B, Hkv, D, L]
        vals = vb[self._idx].float().permute(0, 2, 1, 3)  # [B, Hkv, L, D]
        s = torch.matmul(qg, keys) * self.sm_scale
        s = s.masked_fill(~self._valid[:, None, None, :], float("-inf"))
        m = s.amax(-1, keepdim=True)
        e = torch.exp(s - m)
        num, den = torch.matmul(e, vals), e.sum(-1, keepdim=True)
        if self._prefix_idx is not None:
            # shared prefix: all B*G query rows of a KV head against one gathered prefix
            kp = kb[self._prefix_idx].float().permute(1, 2, 0)  # [Hkv, D, P]
            vp = vb[self._prefix_idx].float().permute(1, 0, 2)  # [Hkv, P, D]
            qp = qg.permute(1, 0, 2, 3).reshape(hkv, bsz * g, d)
            sp = torch.matmul(qp, kp) * self.sm_scale  # [Hkv, B*G, P]
            mp = sp.amax(-1, keepdim=True)
            ep = torch.exp(sp - mp)
            nump = torch.matmul(ep, vp).view(hkv, bsz, g, d).permute(1, 0, 2, 3)
            denp = ep.sum(-1, keepdim=True).view(hkv, bsz, g, 1).permute(1, 0, 2, 3)
            mp = mp.view(hkv, bsz, g, 1).permute(1, 0, 2, 3)
            top = torch.maximum(m, mp)
            a, c = torch.exp(m - top), torch.exp(mp - top)
            num, den = num * a + nump * c, den * a + denp * c
        return (num / den).reshape(bsz, h, d).to(q.dtype)
