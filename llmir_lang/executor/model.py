"""A Llama-family decoder in plain PyTorch (Llama 2/3, Mistral, Qwen2, Qwen3).

Read it top to bottom: embedding, N x (RMSNorm -> attention -> RMSNorm -> SwiGLU MLP), RMSNorm,
LM head. Attention goes through an AttentionBackend over the paged KV pool, so the model never
sees how KV is stored.

Work per step is kept small, since a decode step is mostly kernel launches on a GPU and op
dispatches on a CPU:

* q/k/v is one projection (``qkv_proj``) and gate/up is one (``gate_up_proj``): their weights are
  the checkpoint's separate matrices concatenated along dim 0 (the loader does this);
* the rotary tables are computed once per forward for all layers, and q and k are rotated together
  (``torch.roll`` and a sign-folded sine instead of rotate-half's slice, negate and concat);
* each residual add happens inside the next RMSNorm (``add_rms_norm``).

The elementwise pieces are free functions bundled in ``FusedOps``, so ``compiled_ops()`` can swap in
``torch.compile``d versions (one kernel each on CUDA) without touching the modules. Every variant
computes what Hugging Face's reference computes, rounding step for rounding step in fp32.

On the CPU in fp32 with the plain ops, ``CausalLM.forward`` takes ``_forward_cpu``, which runs
``cpu_forward``: the same model arranged for a machine where a decode step at batch 1 is weight
streaming plus per-op dispatch cost (no module calls, projections through numpy's OpenBLAS on views
of the weights, one-row steps in numpy but for attention, rotary rows looked up in a table cached
by position). It equals the module path within rounding (about 1e-6 relative), not bit for bit.
Other devices and dtypes, and compiled ops, run the module path unchanged. On CUDA the runner swaps
the projections' ``F.linear`` for ``kernels.linear`` (Triton GEMVs for one row); a step of one row
then also runs each RMSNorm (with its residual add) and SwiGLU's product inside the projection
after it (``kernels.add_norm_linear`` / ``silu_mul_linear``; ``CausalLM.fuse_rows``), where the
model has no projection biases. The loader stores fp32
CPU projection weights column-major (``column_major_projections``), which changes the BLAS's
summation order: both paths differ from Hugging Face's row-major GEMMs by rounding (about 1e-5 in
the logits).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmir_lang import kernels
from llmir_lang.executor import cpu_forward
from llmir_lang.executor.attention import AttentionBackend, ForwardBatch, ForwardMode
from llmir_lang.executor.model_config import ModelConfig, rope_inv_freq

# ---- the elementwise pieces ------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalize in fp32, cast back, then scale by the weight in the input dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``: the residual add of a block fused into the next norm."""
    r = x + residual
    return rms_norm(r, weight, eps), r


def rope_qkv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``qkv [T, (H + 2 Hkv) * D]`` into q, k, v, normalize q and k per head if given (Qwen3),
    and rotate q and k together. ``cos``/``sin`` come from ``Rotary.tables`` (``sin`` sign-folded).

    Returns q ``[T, H, D]`` and k ``[T, Hkv, D]`` (views of one new tensor) and v ``[T, Hkv, D]`` (a
    view of ``qkv``); every last dim is contiguous.
    """
    t = qkv.shape[0]
    d = cos.shape[-1]
    qk = qkv[:, : (num_heads + num_kv_heads) * d].view(t, num_heads + num_kv_heads, d)
    v = qkv[:, (num_heads + num_kv_heads) * d :].view(t, num_kv_heads, d)
    if q_norm is not None and k_norm is not None:
        qk = torch.cat(
            (rms_norm(qk[:, :num_heads], q_norm, eps), rms_norm(qk[:, num_heads:], k_norm, eps)), 1
        )
    # rotate_half(x) * sin == roll(x, D/2) * [-sin, sin] exactly (negation is exact)
    qk = qk * cos + torch.roll(qk, d // 2, -1) * sin
    return qk[:, :num_heads], qk[:, num_heads:], v


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's middle: ``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dim."""
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


@dataclass(slots=True, frozen=True)
class FusedOps:
    norm: Callable[..., torch.Tensor]
    add_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    act: Callable[..., torch.Tensor]


PLAIN_OPS = FusedOps(rms_norm, add_rms_norm, rope_qkv, silu_mul)


@functools.cache
def compiled_ops() -> FusedOps:
    """The same functions through ``torch.compile`` (compiled lazily on first call, dynamic in the
    token count); made once per process and shared by every model."""
    return FusedOps(*(torch.compile(f, dynamic=True) for f in (rms_norm, add_rms_norm, rope_qkv, silu_mul)))


# ---- modules ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _building_on_meta() -> bool:
    """Whether modules are being built on the meta device (as the loader builds the model).
    NOTE: torch's meta kernels of ``normal_`` (nn.Embedding's init), ``arange`` and division are
    Python code whose first call imports torch._dynamo, triton and sympy (0.75 s of an engine's
    start, 0.3 s of its exit on a 2-core CPU) for values the loader replaces: avoided there."""
    return torch.get_default_device().type == "meta"


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half layout); tables computed in fp32, once per forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if _building_on_meta():
            with torch.device("cpu"):  # the same tensor, without the meta kernels
                inv_freq = rope_inv_freq(cfg).to("meta")
        else:
            inv_freq = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table: torch.Tensor | None = None
        self._table_src: torch.Tensor | None = None

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and sign-folded ``sin`` (``[-sin, sin]`` halves), both ``[T, 1, D]`` in ``dtype``."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.unsqueeze(0)  # [T, D/2]
        c, s = freqs.cos(), freqs.sin()
        cos = torch.cat((c, c), dim=-1).to(dtype).unsqueeze(1)
        sin = torch.cat((-s, s), dim=-1).to(dtype).unsqueeze(1)
        return cos, sin

    def cached_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tables(positions, float32)`` as rows of a table by position (one lookup per step).

        The table holds ``tables(arange(n))``, the same fp32 operations on the same values, so its
        rows equal what ``tables`` computes. It grows (doubling) when a position is past its end,
        and is rebuilt when ``inv_freq`` is replaced (the loader does that after the dtype cast).
        Host-side growth needs the positions on the host: the CPU path only.
        """
        table = self._table if self._table_src is self.inv_freq else None
        if table is not None:
            try:
                return table.index_select(0, positions).unbind(1)  # type: ignore[return-value]
            except IndexError:  # a position past the end: grow below
                pass
        n = max(1024, 2 * table.shape[0] if table is not None else 0)
        while n <= (int(positions.max()) if positions.numel() else 0):
            n *= 2
        cos, sin = self.tables(torch.arange(n, device=positions.device), torch.float32)
        self._table, self._table_src = torch.stack((cos, sin), 1), self.inv_freq  # [n, 2, 1, D]
        return self._table.index_select(0, positions).unbind(1)  # type: ignore[return-value]


@dataclass(slots=True)
class _Step:
    """What every layer needs in one forward: rotary tables, the attention backend, the ops."""

    cos: torch.Tensor
    sin: torch.Tensor
    backend: AttentionBackend
    ops: FusedOps
    linear: Callable[..., torch.Tensor]  # F.linear, or kernels.linear (CausalLM.linear)
    # one row on CUDA with the Triton projections: each norm, and SwiGLU's product, runs inside
    # the projection after it (kernels.add_norm_linear / silu_mul_linear)
    fused: bool = False


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        self.qkv_proj = nn.Linear(h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.eps = cfg.rms_norm_eps

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        return self.attend(step.linear(x, self.qkv_proj.weight, self.qkv_proj.bias), step)

    def attend(self, qkv: torch.Tensor, step: _Step) -> torch.Tensor:
        """Everything after the q/k/v projection: rotary, attention, the output projection."""
        o = None
        if not self.qk_norm:  # a decode step on the GPU: the rotary inside the KV store's kernel
            o = step.backend.rotary_forward(qkv, step.cos, step.sin, self.num_heads, self.layer_id)
        if o is None:
            qn, kn = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
            q, k, v = step.ops.rope(qkv, step.cos, step.sin, self.num_heads, self.num_kv_heads, qn, kn, self.eps)
            o = step.backend.forward(q, k, v, self.layer_id)
        o = o.reshape(qkv.shape[0], self.num_heads * self.head_dim)
        return step.linear(o, self.o_proj.weight, self.o_proj.bias)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        gate_up = step.linear(x, self.gate_up_proj.weight, self.gate_up_proj.bias)
        return step.linear(step.ops.act(gate_up), self.down_proj.weight, self.down_proj.bias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, step: _Step
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is the previous layer's last output and ``residual`` the stream before it was added
        (None for the first layer); returns the same pair for the next layer."""
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        if step.fused:
            a, m = self.self_attn, self.mlp
            qkv, residual = kernels.add_norm_linear(x, residual, n1.weight, n1.eps, a.qkv_proj.weight)
            o = a.attend(qkv, step)
            gate_up, residual = kernels.add_norm_linear(o, residual, n2.weight, n2.eps, m.gate_up_proj.weight)
            return kernels.silu_mul_linear(gate_up, m.down_proj.weight), residual
        if residual is None:
            h, residual = step.ops.norm(x, n1.weight, n1.eps), x
        else:
            h, residual = step.ops.add_norm(x, residual, n1.weight, n1.eps)
        h, residual = step.ops.add_norm(self.self_attn(h, step), residual, n2.weight, n2.eps)
        return self.mlp(h, step), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        shape = (cfg.vocab_size, cfg.hidden_size)
        if _building_on_meta():  # a weight given is not initialized (the loader fills it in)
            self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        else:  # the init, and the random numbers it draws, as ever
            self.embed_tokens = nn.Embedding(*shape)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The whole model. ``forward`` runs one ForwardBatch and returns logits of the selected tokens.

    ``ops`` picks the elementwise implementations (``PLAIN_OPS`` or ``compiled_ops()``); it may be
    swapped between forwards.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.rotary = Rotary(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.ops = PLAIN_OPS
        # the projections' ``F.linear``; ``ModelRunner`` puts ``kernels.linear`` here on CUDA
        self.linear: Callable[..., torch.Tensor] = F.linear
        self._no_biases: bool | None = None
        self.fuse_rows = True  # with kernels.linear: fused norm / SwiGLU projections for one row
        # extends (and mixed steps) of at most this many tokens run ``PLAIN_OPS`` even when ``ops``
        # is compiled: such a forward on a GPU is bound by host work, and a compiled op's call
        # costs more host time than the plain ops it fuses (H100 host, 1,088 tokens: 98-189 us per
        # op call, benchmarks/gpu/probe_host_calls.py). ``ModelRunner.set_compile`` sets it.
        self.plain_extend_tokens = 0
        self._cpu_layers: list[cpu_forward.CpuLayer] | None = None

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, backend: AttentionBackend) -> torch.Tensor:
        """Returns fp32 logits ``[len(batch.logits_indices) or T, vocab]``."""
        backend.prepare(batch)
        emb = self.model.embed_tokens.weight
        if emb.device.type == "cpu" and emb.dtype == torch.float32 and self.ops is PLAIN_OPS:
            return self._forward_cpu(batch, backend)
        x = self.model.embed_tokens(batch.input_ids)
        fused = self.fuse_rows and self.linear is kernels.linear and self._fusable(x)
        ops = self.ops
        if batch.mode is not ForwardMode.DECODE and x.shape[0] <= self.plain_extend_tokens:
            ops = PLAIN_OPS
        step = _Step(*self.rotary.tables(batch.positions, x.dtype), backend, ops, self.linear, fused)
        residual: torch.Tensor | None = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, step)
        assert residual is not None, "a model has at least one layer"
        if batch.logits_indices is not None:
            x, residual = x[batch.logits_indices], residual[batch.logits_indices]
        norm = self.model.norm
        if fused and x.shape[0] == 1:
            return kernels.add_norm_linear(x, residual, norm.weight, norm.eps, self.output_weight())[0].float()
        x, _ = ops.add_norm(x, residual, norm.weight, norm.eps)
        return self.linear(x, self.output_weight()).float()

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether this step's one row may run the fused norm / SwiGLU projections: CUDA, fp16 or
        bf16, no projection biases, row lengths the kernels take."""
        cfg = self.config
        if not kernels.fused_rows_ok(x, cfg.hidden_size, cfg.intermediate_size):
            return False
        if self._no_biases is None:
            self._no_biases = all(
                mod.bias is None for mod in self.modules() if isinstance(mod, nn.Linear)
            )
        return self._no_biases

    def _forward_cpu(self, batch: ForwardBatch, backend: AttentionBackend) -> torch.Tensor:
        """``forward`` for fp32 on the CPU with the plain ops (``cpu_forward``; see the module
        docstring)."""
        cfg = self.config
        layers = self._cpu_layers
        if layers is None:
            layers = self._cpu_layers = [cpu_forward.CpuLayer.of(layer) for layer in self.model.layers]
        x = self.model.embed_tokens.weight.index_select(0, batch.input_ids)
        cos, sin = self.rotary.cached_tables(batch.positions)
        dims = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps)
        head, norm = self.output_weight(), self.model.norm.weight
        with cpu_forward.openblas().held() as blas_rows:
            return cpu_forward.forward(
                layers, x, cos, sin, batch.logits_indices, norm, head, backend, dims, blas_rows
            )

    def column_major_projections(self) -> None:
        """Store every projection weight (and the output layer) column-major: ``[in, out]``
        contiguous, still seen as ``[out, in]``. Values do not change; ``F.linear`` and the CPU
        path take either layout. On the CPU in fp32, MKL's sgemm streams this layout faster when a
        step has few rows (a one-token decode step about 20% faster in the projections, a
        jump-forward extend of a few tokens about 30%, measured on a 2-core AVX2 EPYC); prefill-
        sized steps run at the same speed; ``cpu_forward`` hands the same ``[in, out]`` memory to
        OpenBLAS. The loader calls it for fp32 models on the CPU."""
        linears: list[nn.Linear] = []
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            linears += [a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj]
        weights = [lin.weight for lin in linears]
        # the output layer; a tied one is also the embedding table, whose row lookups stay cheap
        weights.append(self.output_weight())
        with torch.no_grad():
            for w in weights:
                if w.stride(0) != 1:
                    w.data = w.data.t().contiguous().t()
        self._cpu_layers = None

    # the CPU path holds views of the weights: drop them whenever parameters may be replaced
    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._cpu_layers = None
        return super()._apply(fn, recurse)

    def to_empty(self, *, device, recurse=True):  # type: ignore[no-untyped-def]
        # NOTE: nn.Module's ``empty_like`` of a meta tensor runs torch's Python meta kernel, whose
        # first call imports sympy (0.3 s; see _building_on_meta); for the contiguous tensors the
        # model is built of, ``empty`` makes the same uninitialized tensor directly
        def empty(t: torch.Tensor) -> torch.Tensor:
            if t.is_contiguous():
                return torch.empty(t.shape, dtype=t.dtype, device=device)
            return torch.empty_like(t, device=device)

        return self._apply(empty, recurse=recurse)

    def load_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._cpu_layers = None
        return super().load_state_dict(*args, **kwargs)
