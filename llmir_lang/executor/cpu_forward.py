"""``CausalLM``'s forward for fp32 on the CPU: the same model, arranged for a machine where a step
of a few rows is mostly per-op dispatch cost and matrix-vector products.

Two arrangements of one layer, picked per step by its row count:

* up to ``NUMPY_MAX_ROWS`` rows (decode at small batch, jump-forward's forced tokens, speculative
  verify steps), every op but attention runs in numpy on zero-copy views of the weights and of
  the activations (``Tensor.numpy`` / ``torch.from_numpy``): a numpy ufunc on a few hundred floats
  costs about 1 us where a torch op costs 3-5 us, and an RMSNorm is 4-10 us in numpy against 17-30
  us for ``F.rms_norm`` (which decomposes into six ops on the CPU). One-row projections go to
  numpy's OpenBLAS ``sgemv``, 1.3-1.9x faster than ``torch.mm`` (MKL's ``sgemm``) on the bundled
  model's shapes with the weight ``[in, out]`` contiguous (``CausalLM.column_major_projections``);
  for 2..8 rows OpenBLAS's small ``sgemm`` is as often slower as faster, so those stay ``torch.mm``.
* more rows (prefills, large decode batches): torch ops, which thread and vectorize better on big
  tensors (numpy's float32 ``exp`` is ~2.5x slower than torch's at 300 rows), one ``mm`` per
  projection on transposed weight views, residual adds and SwiGLU in place.

Both compute Hugging Face's fp32 Llama step; they differ from the module path only by rounding
(another BLAS's summation order, numpy's own ``exp`` and reductions): about 1e-6 relative.

OpenBLAS gets no more threads than torch: its thread count is set to ``torch.get_num_threads()``
whenever that changes (checked once per forward, a fraction of a microsecond), so a benchmark at
one torch thread uses one core. This sets the process-wide OpenBLAS count, which numpy shares. Where
numpy's BLAS is not OpenBLAS or threadpoolctl cannot see it, one-row projections keep ``torch.mm``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmir_lang.executor.attention import AttentionBackend

NUMPY_MAX_ROWS = 16  # steps with more rows take the torch arrangement


# ---- OpenBLAS threads --------------------------------------------------------------------------


class _OpenBlasThreads:
    """numpy's OpenBLAS, held to torch's intra-op thread count; ``usable`` False where it is not
    OpenBLAS or its thread count cannot be set."""

    def __init__(self) -> None:
        self._libs: list[Any] = []
        self._applied = 0
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return
        blas = ThreadpoolController().select(user_api="blas").lib_controllers
        # every BLAS numpy may have loaded must be one whose thread count we can cap
        if blas and all(lib.internal_api == "openblas" for lib in blas):
            self._libs = list(blas)

    @property
    def usable(self) -> bool:
        return bool(self._libs)

    def follow_torch(self) -> bool:
        """Cap OpenBLAS at ``torch.get_num_threads()`` (a call only when that changed); returns
        ``usable``."""
        n = torch.get_num_threads()
        if n != self._applied and self._libs:
            for lib in self._libs:
                lib.set_num_threads(n)
            self._applied = n
        return bool(self._libs)


@functools.cache
def openblas_threads() -> _OpenBlasThreads:
    return _OpenBlasThreads()


# ---- weights -----------------------------------------------------------------------------------


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


@dataclass(slots=True)
class CpuLayer:
    """One decoder layer's tensors as the CPU forward uses them: projection weights transposed to
    ``[in, out]`` (views, so a projection is one ``mm`` or one ``sgemv``), biases, norm weights,
    each as a tensor and as a numpy array over the same memory. Views of the parameters: in-place
    weight updates show through; ``CausalLM`` drops them where parameters may be replaced."""

    layer_id: int
    norm1: torch.Tensor
    qkv: torch.Tensor
    qkv_b: torch.Tensor | None
    o: torch.Tensor
    o_b: torch.Tensor | None
    norm2: torch.Tensor
    gate_up: torch.Tensor
    gate_up_b: torch.Tensor | None
    down: torch.Tensor
    down_b: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    arrays: tuple[np.ndarray | None, ...]  # the fields above from norm1 on, as numpy arrays

    @classmethod
    def of(cls, layer: Any) -> CpuLayer:
        """From a ``model.DecoderLayer``."""
        a, m = layer.self_attn, layer.mlp
        qn, kn = (a.q_norm.weight, a.k_norm.weight) if a.qk_norm else (None, None)
        ts = (
            layer.input_layernorm.weight,
            a.qkv_proj.weight.t(),
            a.qkv_proj.bias,
            a.o_proj.weight.t(),
            a.o_proj.bias,
            layer.post_attention_layernorm.weight,
            m.gate_up_proj.weight.t(),
            m.gate_up_proj.bias,
            m.down_proj.weight.t(),
            m.down_proj.bias,
            qn,
            kn,
        )
        return cls(a.layer_id, *ts, tuple(_np(t) for t in ts))


# ---- the torch arrangement (many rows) -------------------------------------------------------


def norm_t(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def proj_t(x: torch.Tensor, wt: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, wt.t(), b)`` for 2-D ``x``: the same ``mm``/``addmm`` it runs."""
    return torch.mm(x, wt) if b is None else torch.addmm(b, x, wt)


def layer_torch(
    p: CpuLayer,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backend: AttentionBackend,
    dims: tuple[int, int, int, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``DecoderLayer.forward`` with the plain fp32 ops. ``x`` is a tensor this forward made (the
    embedding lookup or a projection's output), so the residual add may write into it."""
    h_q, h_kv, d, eps = dims
    t = x.shape[0]
    residual = x if residual is None else x.add_(residual)
    qkv = proj_t(norm_t(residual, p.norm1, eps), p.qkv, p.qkv_b)
    qk, v = qkv.split(((h_q + h_kv) * d, h_kv * d), 1)
    qk = qk.view(t, h_q + h_kv, d)
    if p.q_norm is not None and p.k_norm is not None:
        q, k = qk.split((h_q, h_kv), 1)
        qk = torch.cat((norm_t(q, p.q_norm, eps), norm_t(k, p.k_norm, eps)), 1)
    # rope_qkv's rotation: rotate_half(x) * sin == roll(x, D/2) * [-sin, sin]
    q, k = (qk * cos + torch.roll(qk, d // 2, -1) * sin).split((h_q, h_kv), 1)
    o = backend.forward(q, k, v.view(t, h_kv, d), p.layer_id)
    residual = proj_t(o.reshape(t, h_q * d), p.o, p.o_b).add_(residual)
    gate, up = proj_t(norm_t(residual, p.norm2, eps), p.gate_up, p.gate_up_b).chunk(2, -1)
    return proj_t(F.silu(gate, inplace=True).mul_(up), p.down, p.down_b), residual


# ---- the numpy arrangement (few rows) ---------------------------------------------------------


def norm_np(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last dim of ``x`` (any leading dims), into a new array."""
    ms = np.einsum("...i,...i->...", x, x)[..., None]
    ms *= np.float32(1.0 / x.shape[-1])
    ms += np.float32(eps)
    np.sqrt(ms, out=ms)
    y = np.divide(x, ms)
    y *= weight
    return y


def proj_np(x: np.ndarray, w: np.ndarray, wt: torch.Tensor, b: np.ndarray | None, gemv: bool) -> np.ndarray:
    """``x @ w (+ b)`` for 2-D ``x``: one row through OpenBLAS's ``sgemv`` where ``gemv`` says
    OpenBLAS is capped, other row counts through ``torch.mm`` on the same memory (faster there)."""
    if gemv and x.shape[0] == 1:
        y = np.matmul(x, w)
    else:
        y = torch.mm(torch.from_numpy(x), wt).numpy()
    if b is not None:
        y += b
    return y


def rope_np(qk: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """``qk * cos + rotate_half(qk) * sin`` with ``sin`` sign-folded (``[-sin, sin]`` halves)."""
    half = qk.shape[-1] // 2
    out = qk * cos
    out[..., :half] += qk[..., half:] * sin[..., :half]
    out[..., half:] += qk[..., :half] * sin[..., half:]
    return out


def layer_np(
    p: CpuLayer,
    x: np.ndarray,
    residual: np.ndarray | None,
    cos: np.ndarray,
    sin: np.ndarray,
    backend: AttentionBackend,
    dims: tuple[int, int, int, float],
    gemv: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``layer_torch`` in numpy but for attention; ``x`` is an array this forward made."""
    h_q, h_kv, d, eps = dims
    norm1, qkv_w, qkv_b, o_w, o_b, norm2, gu_w, gu_b, down_w, down_b, q_norm, k_norm = p.arrays
    t = x.shape[0]
    residual = x if residual is None else np.add(x, residual, out=x)
    qkv = proj_np(norm_np(residual, norm1, eps), qkv_w, p.qkv, qkv_b, gemv)  # type: ignore[arg-type]
    qk = qkv[:, : (h_q + h_kv) * d].reshape(t, h_q + h_kv, d)
    if q_norm is not None and k_norm is not None:
        qk = np.concatenate((norm_np(qk[:, :h_q], q_norm, eps), norm_np(qk[:, h_q:], k_norm, eps)), 1)
    q, k = torch.from_numpy(rope_np(qk, cos, sin)).split((h_q, h_kv), 1)
    v = torch.from_numpy(qkv[:, (h_q + h_kv) * d :]).view(t, h_kv, d)
    o = backend.forward(q, k, v, p.layer_id).reshape(t, h_q * d).numpy()
    residual += proj_np(o, o_w, p.o, o_b, gemv)  # type: ignore[arg-type]
    gate_up = proj_np(norm_np(residual, norm2, eps), gu_w, p.gate_up, gu_b, gemv)  # type: ignore[arg-type]
    inter = gate_up.shape[1] // 2
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    act = np.negative(gate)  # silu(g) = g / (1 + exp(-g)), as torch computes it
    np.exp(act, out=act)
    act += np.float32(1.0)
    np.divide(gate, act, out=act)
    act *= up
    return proj_np(act, down_w, p.down, down_b, gemv), residual  # type: ignore[arg-type]


# ---- the whole step ----------------------------------------------------------------------------


def forward(
    layers: list[CpuLayer],
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor | None,
    final_norm: torch.Tensor,
    head: torch.Tensor,
    backend: AttentionBackend,
    dims: tuple[int, int, int, float],
) -> torch.Tensor:
    """Logits ``[len(rows) or T, vocab]`` of the embedded tokens ``x [T, hidden]`` (a tensor this
    forward made); ``head`` is the output layer's weight ``[vocab, hidden]``."""
    eps = dims[3]
    gemv = openblas_threads().follow_torch()
    if x.shape[0] > NUMPY_MAX_ROWS:
        residual: torch.Tensor | None = None
        for layer in layers:
            x, residual = layer_torch(layer, x, residual, cos, sin, backend, dims)
        assert residual is not None, "a model has at least one layer"
        if rows is not None:
            x, residual = x.index_select(0, rows), residual.index_select(0, rows)
        h = norm_t(x.add_(residual), final_norm, eps)
        if gemv and h.shape[0] == 1:
            return torch.from_numpy(np.matmul(h.numpy(), head.detach().t().numpy()))
        return F.linear(h, head)
    xn, cn, sn = x.numpy(), cos.numpy(), sin.numpy()
    res: np.ndarray | None = None
    for layer in layers:
        xn, res = layer_np(layer, xn, res, cn, sn, backend, dims, gemv)
    assert res is not None, "a model has at least one layer"
    if rows is not None:
        idx = rows.numpy()
        xn, res = xn[idx], res[idx]
    h = norm_np(np.add(xn, res, out=xn), final_norm.detach().numpy(), eps)
    return torch.from_numpy(proj_np(h, head.detach().t().numpy(), head.t(), None, gemv))
