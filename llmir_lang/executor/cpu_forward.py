"""``CausalLM``'s forward in fp32 on the CPU: the module path's model, arranged for a machine where a
step of a few rows is matrix-vector products from memory plus per-op dispatch cost.

* Projections go to numpy's OpenBLAS on zero-copy views (``Tensor.numpy`` of the ``[in, out]``
  weight views; ``CausalLM.column_major_projections`` makes them contiguous): one ``sgemv`` per
  row at 1-3 rows, ``sgemm`` above (at one torch thread; see below for more). Measured on the
  bundled model (2-core AVX2 EPYC, one thread), over the projections of whole steps: MKL's
  ``sgemm`` through ``torch.mm`` takes about 1.3x OpenBLAS's ``sgemv`` at one row (1.3-1.9x per
  product in isolation), and 6-26% more than OpenBLAS's ``sgemm`` from 4 rows up to a 1,400-row
  prefill; at 2 and 3 rows OpenBLAS's ``sgemm`` is 20-30% slower than MKL and a ``sgemv`` per row
  about even with it.
* A step of one row (decode at batch 1, the sequential case) runs every op but attention in numpy
  (``layer_row``): a numpy ufunc on a few hundred floats costs about 1 us where a torch op costs
  3-5 us (in isolation; inside a step, whose weight stream evicts the caches, both cost several
  times that), an RMSNorm is a ``sdot`` and two multiplies against ``F.rms_norm``'s six CPU ops,
  and the attention inputs are arrays each layer writes into; attention itself runs in numpy too
  where the backend planned it so (``cpu_attention``: steps of up to four requests), else through
  tensor views made once per step over those arrays.
  Steps of 2 to ``NUMPY_ROWS`` rows (jump-forward's forced text, speculative drafts, short chain
  text) run the same numpy ops on ``[T, hidden]`` arrays (``layer_rows``): a torch op costs 15-60
  us inside such a step on this machine (``F.rms_norm`` alone is six of them), and a small
  extend cost 1.7x a one-row decode step with torch ops against 1.5x with numpy's. Measured inside
  ``bench_json``'s sequential extraction, alternated in one process (3 rounds): extends of 2-5
  rows 8.4-9.4 ms against 9.7-11.2 ms, the JSON run with jump-forward 9.4-10.6 s against
  10.4-11.8 s. Longer steps (prefills) keep torch ops (``layer_torch``): no module calls, residual
  adds and SwiGLU in place; around 24-64 rows the two measured even.

Both compute Hugging Face's fp32 Llama step; they differ from the module path by rounding only
(another BLAS's summation order, numpy's ``exp`` and dot products): about 1e-6 relative.

OpenBLAS runs on one thread, never more than torch's count: ``openblas().held()`` sets it for the
length of each forward and restores the count it had after (about 5 us a step), so numpy elsewhere
in the process keeps its threads, except for numpy calls on other threads during a forward (the
count is process-wide). At one torch thread every projection goes to OpenBLAS; at more, one-row
steps only, and bigger products stay MKL's on torch's threads (OpenBLAS's own threads next to
torch's OpenMP threads fought for the cores: steps 2-3x slower with two of each on two cores).
Where numpy's BLAS is not OpenBLAS, or
threadpoolctl is missing or cannot see it, projections keep ``torch.mm`` (``torch.mv`` for one row).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmir_lang.executor.attention import AttentionBackend

NUMPY_ROWS = 16  # steps of up to this many rows run layer_rows (numpy elementwise ops)
GEMV_ROWS = (2, 3)  # row counts where one sgemv per row beats OpenBLAS's sgemm (see proj_t)

# ---- OpenBLAS threads --------------------------------------------------------------------------


class _OpenBlas:
    """numpy's OpenBLAS, held to one thread; ``usable`` False where numpy's BLAS is not OpenBLAS
    or threadpoolctl cannot set its thread count."""

    def __init__(self) -> None:
        self._libs: list[Any] = []
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return
        blas = ThreadpoolController().select(user_api="blas").lib_controllers
        # every BLAS numpy may have loaded must be one whose thread count we can hold
        if blas and all(lib.internal_api == "openblas" for lib in blas):
            self._libs = list(blas)

    @property
    def usable(self) -> bool:
        return bool(self._libs)

    @contextlib.contextmanager
    def held(self) -> Iterator[int]:
        """Hold OpenBLAS at one thread for one forward, then give it back the count it had (numpy
        elsewhere in the process keeps its threads). Yields up to how many rows a step's
        projections go to OpenBLAS: all at one torch thread, one row at more (one thread's
        ``sgemv`` still beats MKL's threaded one-row ``sgemm`` there); 0 where it is not usable."""
        if not self._libs:
            yield 0
            return
        before = [lib.get_num_threads() for lib in self._libs]
        for lib, n in zip(self._libs, before):
            if n != 1:
                lib.set_num_threads(1)
        try:
            yield 1 if torch.get_num_threads() > 1 else 1 << 62
        finally:
            for lib, n in zip(self._libs, before):
                if n != 1:
                    lib.set_num_threads(n)


@functools.cache
def openblas() -> _OpenBlas:
    return _OpenBlas()


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
    arrays: tuple[Any, ...]  # the fields above from norm1 on, as numpy arrays (or None)

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


# ---- steps of several rows: torch ops -------------------------------------------------------


def norm_t(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def proj_t(
    x: torch.Tensor, wt: torch.Tensor, w: np.ndarray, b: torch.Tensor | None, blas: bool
) -> torch.Tensor:
    """``F.linear(x, wt.t(), b)`` for 2-D ``x`` (``w`` is ``wt`` as an array): through OpenBLAS
    where ``blas`` says it is capped, else the ``mm``/``addmm`` ``F.linear`` runs."""
    if not blas:
        return torch.mm(x, wt) if b is None else torch.addmm(b, x, wt)
    return torch.from_numpy(proj_rows(x.numpy(), w, wt, _np(b), True))


def layer_torch(
    p: CpuLayer,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backend: AttentionBackend,
    dims: tuple[int, int, int, float],
    blas: bool,
    keep: torch.Tensor | None = None,
    keep_blas: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``DecoderLayer.forward`` with the plain fp32 ops. ``x`` is a tensor this forward made (the
    embedding lookup or a projection's output), so the residual add may write into it. ``keep``:
    only these rows go on past attention (the last layer, where only some rows' logits are read;
    every row's K/V is still stored), their projections through OpenBLAS where ``keep_blas``."""
    h_q, h_kv, d, eps = dims
    _, qkv_w, _, o_w, _, _, gu_w, _, down_w, _, _, _ = p.arrays
    t = x.shape[0]
    residual = x if residual is None else x.add_(residual)
    qkv = proj_t(norm_t(residual, p.norm1, eps), p.qkv, qkv_w, p.qkv_b, blas)
    qk, v = qkv.split(((h_q + h_kv) * d, h_kv * d), 1)
    qk = qk.view(t, h_q + h_kv, d)
    if p.q_norm is not None and p.k_norm is not None:
        q, k = qk.split((h_q, h_kv), 1)
        qk = torch.cat((norm_t(q, p.q_norm, eps), norm_t(k, p.k_norm, eps)), 1)
    # rope_qkv's rotation: rotate_half(x) * sin == roll(x, D/2) * [-sin, sin]
    q, k = (qk * cos + torch.roll(qk, d // 2, -1) * sin).split((h_q, h_kv), 1)
    o = backend.forward(q, k, v.view(t, h_kv, d), p.layer_id).reshape(t, h_q * d)
    if keep is not None:  # fewer rows from here: OpenBLAS takes them where it takes that many
        o, residual = o.index_select(0, keep), residual.index_select(0, keep)
        blas = keep_blas
    residual = proj_t(o, p.o, o_w, p.o_b, blas).add_(residual)
    gate_up = proj_t(norm_t(residual, p.norm2, eps), p.gate_up, gu_w, p.gate_up_b, blas)
    gate, up = gate_up.chunk(2, -1)
    act = F.silu(gate, inplace=True).mul_(up)
    return proj_t(act, p.down, down_w, p.down_b, blas), residual


# ---- steps of one row: numpy ops -----------------------------------------------------------


def norm_row(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of one row ``x [hidden]`` into a new array: a ``sdot`` and two multiplies."""
    y = x * weight
    y *= 1.0 / math.sqrt(float(np.dot(x, x)) / x.shape[0] + eps)
    return y


def norm_heads(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last dim of ``x [heads, head_dim]`` (Qwen3's q/k norms), into a new array."""
    ms = np.einsum("ij,ij->i", x, x)[:, None]
    ms *= np.float32(1.0 / x.shape[-1])
    ms += np.float32(eps)
    np.sqrt(ms, out=ms)
    y = np.divide(x, ms)
    y *= weight
    return y


def gemv(
    x: np.ndarray, w: np.ndarray, wt: torch.Tensor, b: np.ndarray | None, blas: bool, out: Any = None
) -> np.ndarray:
    """``x @ w (+ b)`` for one row ``x``: OpenBLAS's ``sgemv`` where ``blas`` says it is capped,
    else ``torch.mv`` over the same memory."""
    if blas:
        y = np.matmul(x, w, out=out)
    else:
        y = torch.mv(wt.t(), torch.from_numpy(x), out=None if out is None else torch.from_numpy(out)).numpy()
    if b is not None:
        y += b
    return y


def rope_into(qk: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """``rope_qkv``'s rotation by halves over the last dim, into ``out``: x * cos + [-x2 * s, x1 * s]
    (``sin`` is sign-folded); ``tmp`` is scratch of ``out``'s shape."""
    half = qk.shape[-1] // 2
    np.multiply(qk, cos, out=out)
    np.multiply(qk[..., half:], sin[..., :half], out=tmp[..., :half])
    np.multiply(qk[..., :half], sin[..., half:], out=tmp[..., half:])
    out += tmp


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` into a new array; silu(g) = g / (1 + exp(-g)), as torch computes it."""
    act = np.negative(gate)
    np.exp(act, out=act)
    act += np.float32(1.0)
    np.divide(gate, act, out=act)
    act *= up
    return act


class RowScratch:
    """Arrays one row's layers write into, with the attention inputs as tensors over them, made
    once per forward: a tensor view costs a few microseconds, about what a layer's numpy ops cost."""

    def __init__(self, h_q: int, h_kv: int, d: int):
        self.qkv = np.empty((h_q + 2 * h_kv) * d, np.float32)
        self.rot = np.empty((h_q + h_kv, d), np.float32)
        self.tmp = np.empty((h_q + h_kv, d), np.float32)
        rot = self.rot.reshape(1, h_q + h_kv, d)
        self.q_np, self.k_np = rot[:, :h_q], rot[:, h_q:]
        self.v_np = self.qkv[(h_q + h_kv) * d :].reshape(1, h_kv, d)
        self.q, self.k, self.v = (torch.from_numpy(a) for a in (self.q_np, self.k_np, self.v_np))


def layer_row(
    p: CpuLayer,
    x: np.ndarray,
    residual: np.ndarray | None,
    cos: np.ndarray,
    sin: np.ndarray,
    backend: AttentionBackend,
    dims: tuple[int, int, int, float],
    blas: bool,
    s: RowScratch,
) -> tuple[np.ndarray, np.ndarray]:
    """``layer_torch`` for a step of one row ``x [hidden]`` (an array this forward made), in numpy
    but for attention; ``cos``/``sin`` are ``[head_dim]``."""
    h_q, h_kv, d, eps = dims
    norm1, qkv_w, qkv_b, o_w, o_b, norm2, gu_w, gu_b, down_w, down_b, q_norm, k_norm = p.arrays
    residual = x if residual is None else np.add(x, residual, out=x)
    gemv(norm_row(residual, norm1, eps), qkv_w, p.qkv, qkv_b, blas, s.qkv)
    qk = s.qkv[: (h_q + h_kv) * d].reshape(h_q + h_kv, d)
    if q_norm is not None and k_norm is not None:
        qk = np.concatenate((norm_heads(qk[:h_q], q_norm, eps), norm_heads(qk[h_q:], k_norm, eps)))
    rope_into(qk, cos, sin, s.rot, s.tmp)
    plan = backend.numpy_plan
    if plan is not None:
        o = plan.forward(s.q_np, s.k_np, s.v_np, p.layer_id).reshape(h_q * d)
    else:
        o = backend.forward(s.q, s.k, s.v, p.layer_id).reshape(h_q * d).numpy()
    residual += gemv(o, o_w, p.o, o_b, blas)
    gate_up = gemv(norm_row(residual, norm2, eps), gu_w, p.gate_up, gu_b, blas)
    inter = gate_up.shape[0] // 2
    act = swiglu(gate_up[:inter], gate_up[inter:])
    return gemv(act, down_w, p.down, down_b, blas), residual


def norm_rows(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of each row of ``x [T, hidden]`` into a new array."""
    ms = np.einsum("ij,ij->i", x, x)
    ms *= np.float32(1.0 / x.shape[1])
    ms += np.float32(eps)
    np.sqrt(ms, out=ms)
    y = x * weight
    y /= ms[:, None]
    return y


def proj_rows(
    x: np.ndarray, w: np.ndarray, wt: torch.Tensor, b: np.ndarray | None, blas: bool, out: Any = None
) -> np.ndarray:
    """``x [T, in] @ w (+ b)``: a ``sgemv`` per row at ``GEMV_ROWS`` rows, else one ``sgemm``,
    where ``blas`` says OpenBLAS is capped; else ``torch.mm`` over the same memory."""
    if out is None:
        out = np.empty((x.shape[0], w.shape[1]), np.float32)
    if not blas:
        torch.mm(torch.from_numpy(x), wt, out=torch.from_numpy(out))
    elif x.shape[0] in GEMV_ROWS:
        for r in range(x.shape[0]):
            np.matmul(x[r], w, out=out[r])
    else:
        np.matmul(x, w, out=out)
    if b is not None:
        out += b
    return out


def layer_rows(
    p: CpuLayer,
    x: np.ndarray,
    residual: np.ndarray | None,
    cos: np.ndarray,
    sin: np.ndarray,
    backend: AttentionBackend,
    dims: tuple[int, int, int, float],
    blas: bool,
    keep: np.ndarray | None = None,
    keep_blas: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``layer_row`` for a step of a few rows ``x [T, hidden]``; ``cos``/``sin`` ``[T, 1, head_dim]``;
    ``keep`` as in ``layer_torch``."""
    h_q, h_kv, d, eps = dims
    norm1, qkv_w, qkv_b, o_w, o_b, norm2, gu_w, gu_b, down_w, down_b, q_norm, k_norm = p.arrays
    t = x.shape[0]
    residual = x if residual is None else np.add(x, residual, out=x)
    qkv = proj_rows(norm_rows(residual, norm1, eps), qkv_w, p.qkv, qkv_b, blas)
    qk = qkv[:, : (h_q + h_kv) * d].reshape(t, h_q + h_kv, d)
    if q_norm is not None and k_norm is not None:
        qk = np.concatenate(
            (
                norm_heads(qk[:, :h_q].reshape(-1, d), q_norm, eps).reshape(t, h_q, d),
                norm_heads(qk[:, h_q:].reshape(-1, d), k_norm, eps).reshape(t, h_kv, d),
            ),
            1,
        )
    rot, tmp = np.empty(qk.shape, np.float32), np.empty(qk.shape, np.float32)
    rope_into(qk, cos, sin, rot, tmp)
    v = qkv[:, (h_q + h_kv) * d :].reshape(t, h_kv, d)
    plan = backend.numpy_plan
    if plan is not None:
        o = plan.forward(rot[:, :h_q], rot[:, h_q:], v, p.layer_id).reshape(t, h_q * d)
    else:
        rt, vt = torch.from_numpy(rot), torch.from_numpy(v)
        o = backend.forward(rt[:, :h_q], rt[:, h_q:], vt, p.layer_id).reshape(t, h_q * d).numpy()
    if keep is not None:
        o, residual = o[keep], residual[keep]
        blas = keep_blas
    residual += proj_rows(o, o_w, p.o, o_b, blas)
    gate_up = proj_rows(norm_rows(residual, norm2, eps), gu_w, p.gate_up, gu_b, blas)
    inter = gate_up.shape[1] // 2
    act = swiglu(gate_up[:, :inter], gate_up[:, inter:])
    return proj_rows(act, down_w, p.down, down_b, blas), residual


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
    blas_rows: int,
) -> torch.Tensor:
    """Logits ``[len(rows) or T, vocab]`` of the embedded tokens ``x [T, hidden]`` (a tensor this
    forward made); ``head`` is the output layer's weight ``[vocab, hidden]``. Call it inside
    ``with openblas().held() as blas_rows``: projections of up to ``blas_rows`` rows go to OpenBLAS."""
    eps = dims[3]
    if x.shape[0] == 1:
        blas = blas_rows >= 1
        xn, cn, sn = x.numpy()[0], cos.numpy().reshape(-1), sin.numpy().reshape(-1)
        res: np.ndarray | None = None
        scratch = RowScratch(*dims[:3])
        for layer in layers:
            xn, res = layer_row(layer, xn, res, cn, sn, backend, dims, blas, scratch)
        assert res is not None, "a model has at least one layer"
        h = norm_row(np.add(xn, res, out=xn), final_norm.detach().numpy(), eps)
        logits = torch.from_numpy(gemv(h, head.detach().t().numpy(), head.t(), None, blas)).view(1, -1)
        return logits if rows is None else logits.index_select(0, rows)
    blas = x.shape[0] <= blas_rows
    if x.shape[0] <= NUMPY_ROWS:
        xs, cs, ss = x.numpy(), cos.numpy(), sin.numpy()
        rs: np.ndarray | None = None
        sel = None if rows is None else rows.numpy()
        keep_blas = sel is not None and sel.shape[0] <= blas_rows
        for i, layer in enumerate(layers):
            keep = sel if i == len(layers) - 1 else None  # the last layer: only the rows read
            xs, rs = layer_rows(layer, xs, rs, cs, ss, backend, dims, blas, keep, keep_blas)
        assert rs is not None, "a model has at least one layer"
        h = norm_rows(np.add(xs, rs, out=xs), final_norm.detach().numpy(), eps)
        out = proj_rows(h, head.detach().t().numpy(), head.t(), None, h.shape[0] <= blas_rows)
        return torch.from_numpy(out)
    residual: torch.Tensor | None = None
    keep_blas = rows is not None and rows.shape[0] <= blas_rows
    for i, layer in enumerate(layers):
        keep = rows if i == len(layers) - 1 else None  # the last layer: only the rows read
        x, residual = layer_torch(layer, x, residual, cos, sin, backend, dims, blas, keep, keep_blas)
    assert residual is not None, "a model has at least one layer"
    h = norm_t(x.add_(residual), final_norm, eps)
    return proj_t(h, head.t(), head.detach().t().numpy(), None, h.shape[0] <= blas_rows)
