"""Paged attention in numpy for CPU steps of a few requests (the sequential and speculative cases).

``TorchAttentionBackend`` batches requests into padded gathers and one fused
``scaled_dot_product_attention`` per layer: right for a batch of a hundred requests, but a step of
one request then pays for about ten torch ops per layer (two ``index_copy_``, two gathers, the
kernel and its layout changes) at 5-20 us each on a small CPU. Here each request of the step
attends on numpy arrays over the same pool memory: its keys are a slice of the pool where its slots
are consecutive (a gather otherwise), the query heads of one KV head are stacked as rows so GQA
needs no copy of the keys, and the whole request is two batched ``sgemm``s (scores, then values)
and a softmax. Measured on the bundled model's shape (8 heads, 4 KV heads, head dim 32, 120 keys,
2-core AVX2 EPYC, one thread): 30 us for one query row against 105 us for the torch path, 56 us
against 113 us for four rows.

The plan (each request's query rows and slots) is built once per step from the batch; the causal
mask of a request with several new tokens is an additive ``-inf`` bias over its last keys. It
computes what ``reference.extend_attention`` defines, in fp32, up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAX_REQUESTS = 4  # steps of up to this many requests take the numpy path (the speculative limit)


@dataclass(slots=True)
class _Req:
    lo: int  # the request's query rows in the step: [lo, hi)
    hi: int
    idx: np.ndarray  # its key slots (prefix, then this step's tokens)
    start: int  # idx[0] where idx is consecutive (a slice of the pool), -1 to gather, -2 no keys
    bias: np.ndarray | None  # [hi - lo, len(idx)] causal bias (0 or -inf) for several new tokens


class NumpyPlan:
    """One step's attention for every layer, on numpy views of the pool's fp32 buffers."""

    def __init__(
        self,
        k_buffers: list[np.ndarray],
        v_buffers: list[np.ndarray],
        sm_scale: float,
        qo_indptr: list[int],
        kv_indptr: list[int],
        kv_indices: np.ndarray,
        out_cache_loc: np.ndarray,
    ):
        self.k_buffers, self.v_buffers = k_buffers, v_buffers
        self.scale = np.float32(sm_scale)
        self.loc = out_cache_loc
        # one slot for a lone new token: a scalar index stores without advanced indexing
        self.loc1 = int(out_cache_loc[0]) if out_cache_loc.shape[0] == 1 else None
        self.reqs: list[_Req] = []
        for b in range(len(qo_indptr) - 1):
            lo, hi = qo_indptr[b], qo_indptr[b + 1]
            idx = kv_indices[kv_indptr[b] : kv_indptr[b + 1]]
            s, t = idx.shape[0], hi - lo
            if s == 0:  # a padding row (bucketed steps): it attends to nothing, its output is zero
                self.reqs.append(_Req(lo, hi, idx, -2, None))
                continue
            first = int(idx[0])
            consecutive = int(idx[-1]) - first == s - 1 and (s <= 2 or bool((np.diff(idx) == 1).all()))
            bias = None
            if t > 1:  # query i sits at key position s - t + i and sees the keys up to it
                later = np.arange(s)[None, :] > np.arange(s - t, s)[:, None]
                bias = np.where(later, np.float32(-np.inf), np.float32(0.0))
            self.reqs.append(_Req(lo, hi, idx, first if consecutive else -1, bias))

    def forward(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, layer_id: int) -> np.ndarray:
        """q ``[T, H, D]``, k/v ``[T, Hkv, D]`` (this step's tokens) -> ``[T, H, D]``; stores k/v
        into the pool first, so new tokens see themselves."""
        kb, vb = self.k_buffers[layer_id], self.v_buffers[layer_id]
        if self.loc1 is not None:
            kb[self.loc1] = k[0]
            vb[self.loc1] = v[0]
        else:
            kb[self.loc] = k
            vb[self.loc] = v
        n_tok, h, d = q.shape
        hkv = kb.shape[1]
        g = h // hkv
        out = np.empty((n_tok, h, d), np.float32)
        for r in self.reqs:
            t, s = r.hi - r.lo, r.idx.shape[0]
            if r.start == -2:
                out[r.lo : r.hi] = 0.0
                continue
            if r.start >= 0:
                keys, vals = kb[r.start : r.start + s], vb[r.start : r.start + s]
            else:
                keys, vals = kb.take(r.idx, 0), vb.take(r.idx, 0)
            # the G query heads of a KV head (and the request's T rows) as rows of one matrix
            qg = q[r.lo : r.hi].reshape(t, hkv, g, d).transpose(1, 0, 2, 3).reshape(hkv, t * g, d)
            sc = np.matmul(qg, keys.transpose(1, 2, 0))  # [Hkv, T*G, S]
            sc *= self.scale
            if r.bias is not None:
                sc4 = sc.reshape(hkv, t, g, s)
                sc4 += r.bias[None, :, None, :]
            sc -= sc.max(-1, keepdims=True)
            np.exp(sc, out=sc)
            sc /= sc.sum(-1, keepdims=True)
            o = np.matmul(sc, vals.transpose(1, 0, 2))  # [Hkv, T*G, D]
            out[r.lo : r.hi] = o.reshape(hkv, t, g, d).transpose(1, 0, 2, 3).reshape(t, h, d)
        return out


def numpy_buffers(buffers: list[torch.Tensor]) -> list[np.ndarray] | None:
    """Numpy views of the pool's buffers where this path applies: CPU, fp32. None otherwise."""
    if not buffers or buffers[0].device.type != "cpu" or buffers[0].dtype != torch.float32:
        return None
    return [b.numpy() for b in buffers]
