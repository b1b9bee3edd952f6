"""The attention backend interface and the torch reference backend.

A backend turns one ForwardBatch into attention outputs for every layer. The model calls
``backend.forward(q, k, v, layer_id)`` and never looks inside; a new backend (Triton on CUDA)
plugs in without touching the model.

The torch backend dispatches here; it inherits its planning (once per step) from
``torch_attention_plan.py`` and its attention of one layer from ``torch_attention_layer.py``.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from llmir_lang.executor import cpu_attention
from llmir_lang.executor.torch_attention_layer import _FLASH_CPU, TorchLayerAttention
from llmir_lang.executor.torch_attention_plan import (
    TorchAttentionPlanning,
    _DecodePlan,
    _ExtendPlan,
)
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
        # set by prepare() where this step's attention runs on numpy arrays (CPU, few requests):
        # the CPU forward then calls its forward(q, k, v, layer_id) with arrays, not tensors
        self.numpy_plan: cpu_attention.NumpyPlan | None = None

    def prepare(self, batch: ForwardBatch) -> None:
        self.batch = batch

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        """q ``[T, H, D]``, k/v ``[T, Hkv, D]`` for this step's tokens -> ``[T, H, D]``."""

    def rotary_forward(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, layer_id: int
    ) -> torch.Tensor | None:
        """``forward`` after the model's rotary, where the backend does both in fewer kernels:
        ``qkv [T, (H + 2 Hkv) * D]`` unrotated (no per-head norm), ``cos`` / ``sin`` from
        ``Rotary.tables``; returns ``[T, H, D]`` as ``forward`` does, or None where it does not
        apply (the model then runs its rotary and ``forward``). This base: never."""
        return None


class TorchAttentionBackend(TorchAttentionPlanning, TorchLayerAttention, AttentionBackend):
    """Reference backend: gather from the pool and run masked attention in fp32. CPU default.

    Requests are grouped by how many new tokens they have, each group batched (one padded gather
    and two matmuls per layer, no Python loop over requests):

    * one new token (decode steps, and decode rows that share an extend step with short extends):
      a batched form of ``reference.decode_attention``;
    * 2..``max_padded_extend`` new tokens (forced tokens of jump-forward, short chain text): padded
      to the longest of them, with a bottom-right causal mask; one request alone is not padded;
    * longer extends (prompt prefills): one fused attention per request, where the matmuls are big
      enough that a loop costs nothing.

    A CPU step of at most ``numpy_max_requests`` requests (the sequential and speculative cases),
    none a long prompt, skips all of this: ``prepare`` builds a ``cpu_attention.NumpyPlan`` and each
    request attends on numpy views of the fp32 pool (about 2-3x faster there: the torch path's ten
    ops per layer cost more than the arithmetic); the CPU forward calls that plan with arrays.

    Within the first two groups, when every request starts with the same KV slots (a shared
    radix-cache prefix of at least ``min_shared_prefix`` cached tokens, and prefix length x
    requests at least ``min_shared_keys``: about the key reads saved) the prefix is gathered and
    attended once for all queries, the per-request suffixes separately, and the two merged by
    log-sum-exp (the cascade idea). On the CPU the prefix (and an extend's suffixes) go through
    torch's flash kernel, which returns each row's log-sum-exp for the merge. The split costs about
    ten more ops per layer than one fused kernel over whole rows; measured on the benchmark model's
    attention shape (8 heads, 4 KV heads, head dim 32, 2-core EPYC, 4 layers), it pays from about
    6,000 saved key reads (batch 20 x 256-token prefix, batch 64 x 100) and costs up to 2x below. Without such a prefix the two groups run
    ``F.scaled_dot_product_attention`` (GQA, boolean mask) on keys gathered in the pool's layout:
    one fused kernel per layer, about 4x faster on the CPU than matmuls over permuted copies. Every
    path computes the attention ``reference`` defines.

    On the CPU, gathers write into workspaces reused from layer to layer and step to step (a fresh
    multi-MB tensor per gather is fresh pages to fault in: at batch 120 that doubled the step), and
    decode rows go through in chunks of ``cpu_decode_chunk`` (a chunk's gathered keys are still in
    cache when the attention reads them); new K/V are stored with ``index_copy_``. Other devices
    keep fresh tensors (their caching allocator makes them cheap), one chunk and
    ``reference.store_kv``.

    """

    min_shared_prefix = 32
    min_shared_keys = 6144  # prefix length x requests (about the key reads saved) below which the split does not pay
    max_padded_extend = 64  # extends longer than this (prompt prefills) keep the per-request loop
    max_workspace_bytes = 64 << 20  # a CPU workspace larger than this is not kept between gathers
    cpu_decode_chunk = 64  # CPU decode rows per gather + attention: 5-8% off a step at batch 120
    # CPU steps of up to this many requests, none with more than max_padded_extend new tokens,
    # attend in numpy (cpu_attention; 0 turns it off): fp32 pools only
    numpy_max_requests = cpu_attention.MAX_REQUESTS

    def __init__(self, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], sm_scale: float):
        super().__init__(k_buffers, v_buffers, sm_scale)
        self._cpu = k_buffers[0].device.type == "cpu"
        # split (shared-prefix) paths through torch's CPU flash kernel, which returns log-sum-exp
        self._flash = self._cpu and _FLASH_CPU is not None
        self._workspace: dict[str, torch.Tensor] = {}
        self._np_bufs: tuple[tuple[int, ...], list, list] | None = None  # numpy views of the pool

    def prepare(self, batch: ForwardBatch) -> None:
        super().prepare(batch)
        self._dec: _DecodePlan | None = None
        self._ext: _ExtendPlan | None = None
        self._long: list[int] = []
        self.numpy_plan = None
        qo, kv = batch.qo_indptr, batch.kv_indptr
        if self._cpu and batch.batch_size <= self.numpy_max_requests:
            qo_h = qo.tolist()
            bufs = self._numpy_buffers()
            if bufs is not None and all(
                qo_h[i + 1] - qo_h[i] <= self.max_padded_extend for i in range(len(qo_h) - 1)
            ):
                self.numpy_plan = cpu_attention.NumpyPlan(
                    *bufs,
                    self.sm_scale,
                    qo_h,
                    kv.tolist(),
                    batch.kv_indices.numpy(),
                    batch.out_cache_loc.numpy(),
                )
                return
        kv_lens = kv[1:] - kv[:-1]
        if batch.mode is ForwardMode.DECODE:
            self._dec = self._plan_decode(kv[:-1], kv_lens, batch.kv_indices, None)
            return
        qo_h = qo.tolist()
        q_lens = [qo_h[i + 1] - qo_h[i] for i in range(len(qo_h) - 1)]
        one = [b for b, n in enumerate(q_lens) if n == 1]
        short = [b for b, n in enumerate(q_lens) if 1 < n <= self.max_padded_extend]
        self._long = [b for b, n in enumerate(q_lens) if n > self.max_padded_extend]
        everyone = len(q_lens)
        if one:
            if len(one) == everyone:
                self._dec = self._plan_decode(kv[:-1], kv_lens, batch.kv_indices, None)
            else:
                sel = torch.tensor(one, device=qo.device)
                self._dec = self._plan_decode(kv[:-1][sel], kv_lens[sel], batch.kv_indices, qo[:-1][sel])
        if short:
            self._ext = self._plan_extend(batch, short, [q_lens[b] for b in short], len(short) == everyone)

    def _numpy_buffers(self) -> tuple[list, list] | None:
        """Numpy views of the pool's buffers (None where they are not fp32), made again when the
        buffers are replaced."""
        key = tuple(map(id, self.k_buffers)) + tuple(map(id, self.v_buffers))
        if self._np_bufs is None or self._np_bufs[0] != key:
            k, v = cpu_attention.numpy_buffers(self.k_buffers), cpu_attention.numpy_buffers(self.v_buffers)
            self._np_bufs = (key, k, v) if k is not None and v is not None else (key, [], [])
        _, k, v = self._np_bufs
        return (k, v) if k else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        b = self.batch
        assert b is not None, "prepare(batch) must be called before forward"
        if self.numpy_plan is not None:
            return torch.from_numpy(self.numpy_plan.forward(q.numpy(), k.numpy(), v.numpy(), layer_id))
        kb, vb = self.k_buffers[layer_id], self.v_buffers[layer_id]
        if self._cpu and k.dtype == kb.dtype:  # one copy kernel each, without index_put's checks
            kb.index_copy_(0, b.out_cache_loc, k)
            vb.index_copy_(0, b.out_cache_loc, v)
        else:
            ref.store_kv(kb, vb, b.out_cache_loc, k, v)
        dec, ext = self._dec, self._ext
        if dec is not None and dec.q_rows is None:
            return self._decode(q, kb, vb, dec)  # one new token for every request, in order
        if ext is not None and ext.whole:
            return self._extend(q, kb, vb, ext).reshape(q.shape).to(q.dtype)
        result = torch.empty_like(q)
        if dec is not None:
            result[dec.q_rows] = self._decode(q[dec.q_rows], kb, vb, dec)
        if ext is not None:
            out = self._extend(q, kb, vb, ext)
            result[ext.q_rows[ext.q_valid]] = out[ext.q_valid].to(q.dtype)
        for r in self._long:
            lo, hi = int(b.qo_indptr[r]), int(b.qo_indptr[r + 1])
            idx = b.kv_indices[int(b.kv_indptr[r]) : int(b.kv_indptr[r + 1])]
            result[lo:hi] = self._attend_long(q[lo:hi], kb, vb, idx).to(q.dtype)
        return result
