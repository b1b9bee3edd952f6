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
# a config.json without "architectures" (a config saved on its own: LlamaConfig(...).save_pretrained)
# is read by its model_type, as transformers' Auto classes do
_MODEL_TYPES = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}
# transformers' names (ACT2FN) of SiLU, the only MLP activation the model implements (SwiGLU)
_SILU_NAMES = ("silu", "swish")
# max_position_embeddings where config.json lacks it: each family's transformers default
_DEFAULT_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768}
# head_dim where config.json lacks it: Qwen3Config's is 128, the others' hidden_size // heads
_DEFAULT_HEAD_DIM = {"qwen3": 128}
# the keys transformers requires of each supported rope scaling type (it raises without them)
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
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
        if arch is None and not archs:
            model_type = cfg.get("model_type")
            arch = _MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
        if arch is None:
            name = archs[0] if archs else cfg.get("model_type", "<unknown>")
            raise UnsupportedArchitectureError(
                f"architecture {name!r} is not supported by the embedded engine; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}. Run this model through an Endpoint/OpenAI backend instead."
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        quant = cfg.get("quantization_config")
        if quant:
            method = quant.get("quant_method") if isinstance(quant, dict) else None
            raise UnsupportedArchitectureError(
                f"config.json has a quantization_config{f' (quant_method {method!r})' if method else ''}: "
                "quantized checkpoints are not supported by the embedded engine; load an unquantized "
                "bf16 / fp16 / fp32 checkpoint of this model, or serve this one through an "
                "Endpoint/OpenAI backend"
            )
        act = cfg.get("hidden_act")
        if act is not None and act not in _SILU_NAMES:
            raise UnsupportedArchitectureError(
                f"config.json field 'hidden_act' is {act!r}; the embedded engine implements only "
                f"{' / '.join(repr(a) for a in _SILU_NAMES)} (SwiGLU), as {arch} has by default. "
                "Run this model through an Endpoint/OpenAI backend instead."
            )
        hidden = _int_field(cfg, "hidden_size")
        heads = _int_field(cfg, "num_attention_heads")
        layers = _int_field(cfg, "num_hidden_layers")
        vocab = _int_field(cfg, "vocab_size")
        inter = _int_field(cfg, "intermediate_size")
        kv_heads = _int_field(cfg, "num_key_value_heads", heads)
        head_dim = _int_field(cfg, "head_dim", _DEFAULT_HEAD_DIM.get(family, hidden // heads))
        positions = _int_field(cfg, "max_position_embeddings", _DEFAULT_POSITIONS[family])
        rope_theta, scaling = _rope(cfg, positions)
        eos = cfg.get("eos_token_id")
        eos_list = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        if any(isinstance(e, bool) or not isinstance(e, int) for e in eos_list):
            raise CheckpointError(
                f"config.json field 'eos_token_id' must be a token id or a list of them, got {eos!r}"
            )
        eos_ids = list(eos_list)
        bos = cfg.get("bos_token_id")
        if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
            raise CheckpointError(f"config.json field 'bos_token_id' must be a token id or null, got {bos!r}")
        if heads % kv_heads:
            raise CheckpointError(
                f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        sliding = _sliding_window(cfg, family, layers)
        # the projections' biases as transformers builds each family: Llama's follow attention_bias
        # (q/k/v and o) and mlp_bias; Qwen2 always has q/k/v biases and no others; Qwen3's q/k/v and
        # o follow attention_bias; Mistral has none. A field a family ignores is ignored here too.
        if family == "llama":
            qkv_bias = o_bias = _bool_field(cfg, "attention_bias", False)
            mlp_bias = _bool_field(cfg, "mlp_bias", False)
        elif family == "qwen3":
            qkv_bias = o_bias = _bool_field(cfg, "attention_bias", False)
            mlp_bias = False
        else:
            qkv_bias, o_bias, mlp_bias = family == "qwen2", False, False
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
            max_position_embeddings=positions,
            rms_norm_eps=_float_field(cfg, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=_bool_field(cfg, "tie_word_embeddings", False),
            attention_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=family == "qwen3",
            sliding_window=sliding,
            bos_token_id=bos,
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


def _rope(cfg: dict[str, Any], max_positions: int) -> tuple[float, dict[str, Any] | None]:
    """``rope_theta`` and the rope scaling (None: plain rotary) as transformers reads them: the
    parameters are ``rope_scaling`` (the transformers 4 layout) or else ``rope_parameters``; their
    ``rope_theta`` wins over a top-level one, and a top-level ``original_max_position_embeddings``
    over theirs (llama3); without either, llama3's ``original_max_position_embeddings`` is
    ``max_position_embeddings`` (transformers 5 fills it in so; 4 raised)."""
    rope_params = cfg.get("rope_parameters") or {}
    if not isinstance(rope_params, dict):
        raise CheckpointError(f"config.json field 'rope_parameters' must be an object, got {rope_params!r}")
    scaling = cfg.get("rope_scaling") or None
    if scaling is not None and not isinstance(scaling, dict):
        raise CheckpointError(f"config.json field 'rope_scaling' must be an object or null, got {scaling!r}")
    where = "rope_scaling" if scaling is not None else "rope_parameters"
    params = dict(scaling if scaling is not None else rope_params)
    # NOTE: a top-level rope_theta beside rope_parameters' own is ignored by transformers
    if params.get("rope_theta") is not None:
        theta = _float_field(params, "rope_theta", ..., f"config.json field '{where}.rope_theta'")
    else:
        theta = _float_field(cfg, "rope_theta", 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        field = f"{where}.{'rope_type' if params.get('rope_type') else 'type'}"
        raise UnsupportedArchitectureError(
            f"config.json field '{field}' is {kind!r}: that rope scaling type is not supported by "
            "the embedded engine (supported: default, linear, llama3); run this model through an "
            "Endpoint/OpenAI backend instead"
        )
    if kind == "default":
        return theta, None
    if kind == "llama3" and cfg.get("original_max_position_embeddings") is not None:
        params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        where_ctx = "original_max_position_embeddings"
    else:
        where_ctx = f"{where}.original_max_position_embeddings"
        if kind == "llama3" and params.get("original_max_position_embeddings") is None:
            params["original_max_position_embeddings"] = max_positions
    # transformers raises on a missing key; a factor of 0 made every logit NaN here
    for key in _ROPE_KEYS[kind]:
        name = where_ctx if key == "original_max_position_embeddings" else f"{where}.{key}"
        _float_field(params, key, ..., f"config.json field '{name}' ({kind} rope scaling)")
    return theta, params


def _sliding_window(cfg: dict[str, Any], family: str, layers: int) -> int | None:
    """The attention window of any layer, as transformers builds each family (None: no layer has
    one). Mistral windows every layer (MistralConfig's default window: 4096; null or 0 is none).
    Qwen2 / Qwen3 window only with ``use_sliding_window``, and then only the layers that
    ``layer_types`` marks ``sliding_attention`` (without it: the layers from ``max_window_layers``,
    default 28, on), with the same 4096 default. Llama has none."""
    if family == "llama":
        return None
    window = _int_field(cfg, "sliding_window", None) if cfg.get("sliding_window") else None
    if "sliding_window" not in cfg:
        window = 4096
    if family == "mistral" or window is None:
        return window
    if not _bool_field(cfg, "use_sliding_window", False):
        return None
    types = cfg.get("layer_types")
    if types is None:
        first = cfg.get("max_window_layers")
        first = 28 if first is None else first
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise CheckpointError(
                f"config.json field 'max_window_layers' must be a layer count (>= 0), got {first!r}"
            )
        return window if first < layers else None
    if not isinstance(types, list) or len(types) != layers:
        raise CheckpointError(
            f"config.json field 'layer_types' must list one attention type per layer ({layers}), "
            f"got {types!r}"
        )
    return window if "sliding_attention" in types else None


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


def _float_field(cfg: dict[str, Any], name: str, default: Any, what: str | None = None) -> float:
    """``cfg[name]`` as a positive finite float (``default`` when absent or null; ``...``:
    required). ``what`` names the field in messages (default: the config.json field ``name``)."""
    what = what or f"config.json field {name!r}"
    v = cfg.get(name)
    if v is None:
        if default is ...:
            raise CheckpointError(f"{what} is missing; the checkpoint's config.json is incomplete")
        return float(default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise CheckpointError(f"{what} must be a positive number, got {v!r}")
    return float(v)


def _bool_field(cfg: dict[str, Any], name: str, default: bool) -> bool:
    """``cfg[name]`` as a bool (``default`` when absent or null). A string such as ``"false"``
    is a CheckpointError, not ``bool("false") == True`` (tied embeddings, biases that are not
    there); transformers refuses it too."""
    v = cfg.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise CheckpointError(f"config.json field {name!r} must be true or false, got {v!r}")
    return v


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
