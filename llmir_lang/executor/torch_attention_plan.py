"""The torch attention backend's planning, once per step: which keys each query row reads (padded
per group of requests), and where every request starts with the same cached prefix.

``TorchAttentionBackend`` (``attention.py``) inherits this; ``prepare`` calls it. Needs of the
backend: ``min_shared_prefix``, ``min_shared_keys`` and ``_flash``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llmir_lang.executor.attention import ForwardBatch


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True: attend) as the additive fp32 bias the fused kernel takes."""
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


@dataclass(slots=True)
class _DecodePlan:
    """One query row per request: keys ``idx [B, L]`` (``valid`` marks real ones) after an optional
    prefix ``prefix_idx`` shared by all; ``q_rows`` are the queries' rows in the step (None: all)."""

    q_rows: torch.Tensor | None
    idx: torch.Tensor
    valid: torch.Tensor
    prefix_idx: torch.Tensor | None


@dataclass(slots=True)
class _ExtendPlan:
    """Padded extend: query rows ``q_rows [B, Tq]`` (``q_valid``), keys ``k_idx [B, S]`` after an
    optional shared prefix, ``masked [B, 1, 1, Tq, S]`` True where a query must not see a key.
    ``whole``: the plan covers every row of the step, unpadded and in order."""

    q_rows: torch.Tensor
    q_valid: torch.Tensor
    k_idx: torch.Tensor
    masked: torch.Tensor
    allowed: torch.Tensor  # [B, 1, Tq, S]: ~masked, in the layout scaled_dot_product_attention takes
    prefix_idx: torch.Tensor | None
    whole: bool
    # 0 / -inf of ``masked`` for the fused split path: [B, 1, 1, Tq, S], then (from the first
    # layer on) [B, 1, G * Tq, S] with a row per query head of a KV head
    bias: torch.Tensor | None = None


class TorchAttentionPlanning:
    min_shared_prefix: int
    min_shared_keys: int
    _flash: bool

    # ---- planning (once per step) ----------------------------------------------------------
    def _plan_decode(
        self, starts: torch.Tensor, lens: torch.Tensor, kv_indices: torch.Tensor, q_rows: torch.Tensor | None
    ) -> _DecodePlan:
        """One query per request; request b's keys are ``kv_indices[starts[b]:starts[b] + lens[b]]``."""
        width = int(lens.max())
        cols = torch.arange(width, device=lens.device)
        valid = cols.unsqueeze(0) < lens.unsqueeze(1)  # [B, L]
        pos = (starts.unsqueeze(1) + cols.unsqueeze(0)).clamp_max(kv_indices.numel() - 1)
        idx = kv_indices[pos].masked_fill(~valid, 0)
        shared, prefix_idx = 0, None
        if idx.shape[0] > 1:
            same = ((idx == idx[:1]) & valid).all(0)
            shared = min(int(same.int().cumprod(0).sum()), int(lens.min()) - 1)
        if shared >= self.min_shared_prefix and shared * idx.shape[0] >= self.min_shared_keys:
            prefix_idx = idx[0, :shared]
            idx, valid = idx[:, shared:], valid[:, shared:]
        return _DecodePlan(q_rows, idx, valid, prefix_idx)

    def _plan_extend(
        self, batch: ForwardBatch, reqs: list[int], q_len_list: list[int], whole: bool
    ) -> _ExtendPlan:
        """Padded extend for ``reqs`` (each with 2..max_padded_extend new tokens)."""
        dev = batch.qo_indptr.device
        sel = torch.tensor(reqs, device=dev)
        qo_s, kv_s = batch.qo_indptr[:-1][sel], batch.kv_indptr[:-1][sel]
        q_lens = torch.tensor(q_len_list, device=dev)
        kv_lens = batch.kv_indptr[1:][sel] - kv_s
        t_max = max(q_len_list)
        shared = 0
        limit = int((kv_lens - q_lens).min())  # only cached prefix tokens: no causal mask needed there
        if len(reqs) > 1 and limit >= self.min_shared_prefix:
            cols = torch.arange(limit, device=dev)
            rows = batch.kv_indices[kv_s.unsqueeze(1) + cols.unsqueeze(0)]  # [B, limit]
            same = (rows == rows[:1]).all(0)
            shared = int(same.int().cumprod(0).sum())
            if shared < self.min_shared_prefix or shared * len(reqs) < self.min_shared_keys:
                shared = 0
        prefix_idx = batch.kv_indices[int(kv_s[0]) : int(kv_s[0]) + shared] if shared else None
        s_lens = kv_lens - shared
        s_max = int(s_lens.max())
        cols_q = torch.arange(t_max, device=dev)
        cols_k = torch.arange(s_max, device=dev)
        q_valid = cols_q.unsqueeze(0) < q_lens.unsqueeze(1)  # [B, Tq]
        k_valid = cols_k.unsqueeze(0) < s_lens.unsqueeze(1)  # [B, S]
        q_rows = (qo_s.unsqueeze(1) + cols_q.unsqueeze(0)).masked_fill(~q_valid, 0)
        k_pos = (kv_s.unsqueeze(1) + shared + cols_k.unsqueeze(0)).clamp_max(batch.kv_indices.numel() - 1)
        k_idx = batch.kv_indices[k_pos].masked_fill(~k_valid, 0)
        q_pos = (s_lens - q_lens).unsqueeze(1) + cols_q.unsqueeze(0)  # each query's position in its suffix
        mask = k_valid.unsqueeze(1) & (cols_k.view(1, 1, -1) <= q_pos.unsqueeze(2))  # [B, Tq, S]
        # the whole step, unpadded and in order: the output is the step's output as it is
        whole = whole and min(q_len_list) == t_max
        bias = _additive(mask[:, None, None]) if prefix_idx is not None and self._flash else None
        return _ExtendPlan(q_rows, q_valid, k_idx, ~mask[:, None, None], mask[:, None], prefix_idx, whole, bias)
