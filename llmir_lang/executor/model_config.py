"""Model configuration read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmir_lang.errors import CheckpointError, UnsupportedArchitectureError

# architecture name in config.json -> the features it turns on
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2; Llama with attention_bias)
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before rotary
    sliding_window: int | None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None

    @property
    def context_len(self) -> int:
        # NOTE: sliding-window attention is not implemented; capping the context at the window keeps
        # every prompt inside the range where full attention and windowed attention agree.
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        archs = [a for a in (archs if isinstance(archs, list) else [archs]) if isinstance(a, str)]
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            name = archs[0] if archs else cfg.get("model_type", "<unknown>")
            raise UnsupportedArchitectureError(
                f"architecture {name!r} is not supported by the embedded engine; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}. Run this model through an Endpoint/OpenAI backend instead."
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        hidden = _int_field(cfg, "hidden_size")
        heads = _int_field(cfg, "num_attention_heads")
        layers = _int_field(cfg, "num_hidden_layers")
        vocab = _int_field(cfg, "vocab_size")
        inter = _int_field(cfg, "intermediate_size")
        kv_heads = _int_field(cfg, "num_key_value_heads", heads)
        head_dim = _int_field(cfg, "head_dim", hidden // heads)
        rope_params = cfg.get("rope_parameters") or {}
        if not isinstance(rope_params, dict):
            raise CheckpointError(
                f"config.json field 'rope_parameters' must be an object, got {rope_params!r}"
            )
        rope_theta = _float_field(cfg, "rope_theta", _float_field(rope_params, "rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or None
        if scaling is not None and not isinstance(scaling, dict):
            raise CheckpointError(
                f"config.json field 'rope_scaling' must be an object or null, got {scaling!r}"
            )
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = dict(rope_params)
        if scaling is not None:
            kind = scaling.get("rope_type") or scaling.get("type") or "default"
            if kind not in ("default", "linear", "llama3"):
                raise UnsupportedArchitectureError(
                    f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)"
                )
            if kind == "default":
                scaling = None
        eos = cfg.get("eos_token_id")
        eos_list = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        if any(isinstance(e, bool) or not isinstance(e, int) for e in eos_list):
            raise CheckpointError(
                f"config.json field 'eos_token_id' must be a token id or a list of them, got {eos!r}"
            )
        eos_ids = list(eos_list)
        if heads % kv_heads:
            raise CheckpointError(
                f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        window = _int_field(cfg, "sliding_window", None) if cfg.get("sliding_window") else None  # 0: none
        sliding = window if family == "mistral" else None
        if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            sliding = window
        return cls(
            architecture=arch,
            family=family,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=_int_field(cfg, "max_position_embeddings", 2048),
            rms_norm_eps=_float_field(cfg, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
            o_bias=bool(cfg.get("attention_bias", False)) and family == "llama",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CheckpointError(
                f"no config.json in {str(folder)!r}: pass the folder of a Hugging Face checkpoint "
                "(config.json + *.safetensors + tokenizer files), or None for the bundled model"
            )
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(
                f"{path} holds a JSON {type(cfg).__name__}, not an object of model fields; the checkpoint is corrupt"
            )
        return cls.from_dict(cfg)


def _int_field(cfg: dict[str, Any], name: str, default: Any = ...) -> Any:
    """``cfg[name]`` as a positive int (``default`` when absent or null; ``...``: required). A value
    of another type is a CheckpointError naming config.json and the field, not a bare ValueError
    from ``int()`` or a ZeroDivisionError later (``num_attention_heads: 0``)."""
    v = cfg.get(name)
    if v is None:
        if default is ...:
            raise CheckpointError(f"config.json lacks required field {name!r}")
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise CheckpointError(f"config.json field {name!r} must be a positive integer, got {v!r}")
    return v


def _float_field(cfg: dict[str, Any], name: str, default: float) -> float:
    """``cfg[name]`` as a positive finite float (``default`` when absent or null)."""
    v = cfg.get(name)
    if v is None:
        return float(default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise CheckpointError(f"config.json field {name!r} must be a positive number, got {v!r}")
    return float(v)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding (fp32), with linear or llama3 scaling applied.

    Computed with the same fp32 torch operations as the reference implementation so positions far
    into the context still agree to the last bit.
    """
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if not s:
        return inv
    kind = s.get("rope_type") or s.get("type")
    factor = float(s.get("factor", 1.0))
    if kind == "linear":
        return inv / factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
