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
    max_padded_extend = 64  # extends longer than this (prompt prefills) keep the per-request loop

    def prepare(self, batch: ForwardBatch) -> None:
        super().prepare(batch)
        self._idx = self._valid = self._prefix_idx = None
        self._ext = None
        if batch.mode is not ForwardMode.DECODE:
            self._ext = self._plan_extend(batch)
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
        if self._ext is not None:
            return self._extend(q, kb, vb)
        return ref.extend_attention(q, kb, vb, b.qo_indptr, b.kv_indptr, b.kv_indices, self.sm_scale)

    def _merge_prefix(
        self,
        q: torch.Tensor,
        kb: torch.Tensor,
        vb: torch.Tensor,
        prefix_idx: torch.Tensor,
        num: torch.Tensor,
        den: torch.Tensor,
        m: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend every query of ``q [B, Hkv, G, T, D]`` to one shared prefix (gathered once, one
        matmul per KV head) and merge with the per-request partials (``num``, ``den``, running max
        ``m``, all ``[B, Hkv, G, T, .]``) by log-sum-exp."""
        bsz, hkv, g, t, d = q.shape
        kp = kb[prefix_idx].float().permute(1, 2, 0).unsqueeze(1)  # [Hkv, 1, D, P]
        vp = vb[prefix_idx].float().permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, P, D]
        qq = q.permute(1, 2, 0, 3, 4).reshape(hkv, g, bsz * t, d)
        sp = torch.matmul(qq, kp) * self.sm_scale  # [Hkv, G, B*T, P]
        mp = sp.amax(-1, keepdim=True)
        ep = torch.exp(sp - mp)
        nump = torch.matmul(ep, vp).view(hkv, g, bsz, t, d).permute(2, 0, 1, 3, 4)
        denp = ep.sum(-1, keepdim=True).view(hkv, g, bsz, t, 1).permute(2, 0, 1, 3, 4)
        mp = mp.view(hkv, g, bsz, t, 1).permute(2, 0, 1, 3, 4)
        top = torch.maximum(m, mp)
        a, c = torch.exp(m - top), torch.exp(mp - top)
        return num * a + nump * c, den * a + denp * c

    def _plan_extend(self, batch: ForwardBatch) -> dict | None:
        """Padded, batched extend for the requests with few new tokens (one gather and two matmuls
        per layer instead of a loop over requests), with a prefix shared by all of them attended
        once; requests with long extends keep the reference loop. None = reference for all."""
        qo, kv = batch.qo_indptr, batch.kv_indptr
        q_lens, kv_lens = qo[1:] - qo[:-1], kv[1:] - kv[:-1]
        short = (q_lens <= self.max_padded_extend).nonzero().flatten()
        if short.numel() < 2:
            return None
        long_reqs = (q_lens > self.max_padded_extend).nonzero().flatten().tolist()
        qo_s, kv_s = qo[:-1][short], kv[:-1][short]
        q_lens, kv_lens = q_lens[short], kv_lens[short]
        t_max = int(q_lens.max())
        shared = 0
        first = batch.kv_indices[int(kv_s[0]) : int(kv_s[0]) + int(kv_lens[0])]
        limit = int((kv_lens - q_lens).min())  # only cached prefix tokens: no causal mask needed there
        if limit >= self.min_shared_prefix:
            shared = limit
            for b in range(1, short.numel()):
                row = batch.kv_indices[int(kv_s[b]) : int(kv_s[b]) + shared]
                diff = (row != first[:shared]).nonzero()
                if diff.numel():
                    shared = int(diff[0])
                if shared < self.min_shared_prefix:
                    shared = 0
                    break
        s_lens = kv_lens - shared
        s_max = int(s_lens.max())
        cols_q = torch.arange(t_max)
        cols_k = torch.arange(s_max)
        q_valid = cols_q.unsqueeze(0) < q_lens.unsqueeze(1)  # [B, Tq]
        k_valid = cols_k.unsqueeze(0) < s_lens.unsqueeze(1)  # [B, S]
        q_rows = (qo_s.unsqueeze(1) + cols_q.unsqueeze(0)).masked_fill(~q_valid, 0)
        k_pos = (kv_s.unsqueeze(1) + shared + cols_k.unsqueeze(0)).clamp_max(batch.kv_indices.numel() - 1)
        k_idx = batch.kv_indices[k_pos].masked_fill(~k_valid, 0)
        q_pos = (s_lens - q_lens).unsqueeze(1) + cols_q.unsqueeze(0)  # each query's position in its suffix
        mask = k_valid.unsqueeze(1) & (cols_k.view(1, 1, -1) <= q_pos.unsqueeze(2))  # [B, Tq, S]
        return {
            "q_rows": q_rows,
            "q_valid": q_valid,
            "k_idx": k_idx,
            "mask": mask,
            "prefix_idx": first[:shared] if shared else None,
            "long": long_reqs,
        }

    def _extend(self, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
        plan = self._ext
        t_total, h, d = q.shape
        hkv = kb.shape[1]
        g = h // hkv
        rows, qv = plan["q_rows"], plan["q_valid"]
        bsz, t_max = rows.shape
        qp = q.float()[rows].view(bsz, t_max, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Tq, D]
        keys = kb[plan["k_idx"]].float().permute(0, 2, 3, 1).unsqueeze(2)  # [B, Hkv, 1, D, S]
        vals = vb[plan["k_idx"]].float().permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, S, D]
        s = torch.matmul(qp, keys) * self.sm_scale  # [B, Hkv, G, Tq, S]
        s = s.masked_fill(~plan["mask"][:, None, None], float("-inf"))
        m = s.amax(-1, keepdim=True).clamp_min(-1e30)  # padded query rows see no key
        e = torch.exp(s - m)
        num, den = torch.matmul(e, vals), e.sum(-1, keepdim=True)
        if plan["prefix_idx"] is not None:
            num, den = self._merge_prefix(qp, kb, vb, plan["prefix_idx"], num, den, m)
        out = (num / den).permute(0, 3, 1, 2, 4).reshape(bsz, t_max, h, d)  # [B, Tq, H, D]
        result = torch.empty(t_total, h, d, dtype=q.dtype, device=q.device)
        result[rows[qv]] = out[qv].to(q.dtype)
        b = self.batch
        for r in plan["long"]:
            lo, hi = int(b.qo_indptr[r]), int(b.qo_indptr[r + 1])
            idx = b.kv_indices[int(b.kv_indptr[r]) : int(b.kv_indptr[r + 1])]
            result[lo:hi] = ref._attend(
                q[lo:hi], kb[idx], vb[idx], self.sm_scale, idx.numel() - (hi - lo)
            ).to(q.dtype)
        return result

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
            num, den = self._merge_prefix(
                qg.unsqueeze(3), kb, vb, self._prefix_idx, num.unsqueeze(3), den.unsqueeze(3), m.unsqueeze(3)
            )
            num, den = num.squeeze(3), den.squeeze(3)
        return (num / den).reshape(bsz, h, d).to(q.dtype)
