"""Load a Hugging Face checkpoint folder (config.json + safetensors) into a CausalLM."""

from __future__ import annotations

import json
import warnings
from collections.abc import Collection, Iterable
from pathlib import Path

import torch

from llmir_lang.errors import CheckpointError, InvalidRequestError
from llmir_lang.executor.model import CausalLM
from llmir_lang.executor.model_config import ModelConfig, rope_inv_freq

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "llmir-tiny"


class UnusedCheckpointWeightsWarning(UserWarning):
    """A checkpoint holds weights that the model its config.json describes does not use; they were
    ignored, as transformers ignores them. Filter this category to silence it."""


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None picks fp32 on the CPU and bf16 on CUDA."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise InvalidRequestError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if not isinstance(dtype, str) or dtype.lower() not in _DTYPES:
        raise InvalidRequestError(
            f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or torch.float32 / bfloat16 / float16"
        )
    return _DTYPES[dtype.lower()]


def resolve_model_path(model: str | Path | None) -> Path:
    path = BUNDLED_MODEL if model is None else Path(model).expanduser()
    if path.is_file():
        raise CheckpointError(
            f"model {str(path)!r} is a file, not a folder; pass the checkpoint folder that holds "
            "config.json, the *.safetensors weights and the tokenizer files"
            + (f" ({str(path.parent)!r}?)" if (path.parent / "config.json").is_file() else "")
        )
    if not path.is_dir():
        hint = (
            " (the bundled model is missing from this install: reinstall llmir_lang)" if model is None else ""
        )
        raise CheckpointError(
            f"model folder {str(path)!r} does not exist{hint}; pass a local Hugging Face checkpoint folder"
        )
    return path


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files to load, as transformers picks them: ``model.safetensors``, else the
    shards its index names, else (a folder that names its one file otherwise) every
    ``*.safetensors``. Other safetensors beside a standard checkpoint (Mistral's
    ``consolidated.safetensors``, an adapter) are not part of it."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("'weight_map' must map each weight name to its shard's file name")
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(
                f"{index} is corrupt ({e!r}); restore it from the checkpoint's source"
            ) from None
        files = [folder / n for n in names]
        missing = [n for n, f in zip(names, files) if not f.is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {folder} lacks shard(s) {missing} named in its index")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
        found = (
            f" (it holds {bins[:3]}{'...' if len(bins) > 3 else ''}: .bin/.pth weights are not read)"
            if bins
            else ""
        )
        raise CheckpointError(
            f"no *.safetensors in {folder}{found}; convert .bin/.pth weights to safetensors first "
            "(transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            "safe_serialization=True))"
        )
    return files


# checkpoint dtypes that hold plain weights (cast to the engine's dtype on load); anything else
# (integers, fp8) is a quantized checkpoint, whose values mean nothing without their scales
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# fused parameter -> the checkpoint's parameters it concatenates (dim 0, in this order)
_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_projections(
    state: dict[str, torch.Tensor], cfg: ModelConfig, folder: Path, expected: Collection[str]
) -> dict[str, torch.Tensor]:
    """Replace each layer's q/k/v and gate/up weights (and biases) by their concatenation along dim 0,
    the model's ``qkv_proj`` / ``gate_up_proj``, where ``expected`` (the model's parameter names)
    has the fused weight. Each part's shape is checked against the config first, so a mismatch
    names the checkpoint's own weight; parts that are absent are left for the caller's
    missing-weight check, and parts of a fused weight the model lacks (biases the config turns
    off) stay under their own names, for the caller's unused-weight warning. ``state`` is changed
    in place (each part is dropped as its fused weight is made, so loading holds one copy of the
    weights, not two) and returned."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    rows = {
        "q_proj": cfg.num_heads * d,
        "k_proj": cfg.num_kv_heads * d,
        "v_proj": cfg.num_kv_heads * d,
        "gate_proj": i,
        "up_proj": i,
    }
    out = state
    for layer in range(cfg.num_layers):
        pre = f"model.layers.{layer}."
        for fused, parts in _FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"{pre}{p}.{kind}" for p in parts]
                # NOTE: an unused part is not shape-checked: transformers never looks at it either
                if f"{pre}{fused}.{kind}" not in expected or not all(n in out for n in names):
                    continue
                for n in names:
                    want = (rows[n.split(".")[-2]],) + ((h,) if kind == "weight" else ())
                    if tuple(out[n].shape) != want:
                        raise CheckpointError(
                            f"weight {n} in {folder} has shape {tuple(out[n].shape)}, config.json implies {want}"
                        )
                out[f"{pre}{fused}.{kind}"] = torch.cat([out.pop(n) for n in names], 0)
    return out


def _mismatch(expected: set[str], present: set[str]) -> tuple[list[str], list[str]]:
    """The checkpoint's missing and unexpected weights, by the checkpoint's own names: a fused weight
    is missing when one of its parts is, and then the part is what is named (``k_proj.weight``), not
    the fused weight, and the parts that are there are not called unexpected."""
    missing, unexpected = [], set(present - expected)
    for name in sorted(expected - present):
        parts = _parts_of(name)
        if parts is None:
            missing.append(name)
            continue
        missing += [p for p in parts if p not in present]
        unexpected -= set(parts)
    return sorted(missing), sorted(unexpected)


def _parts_of(name: str) -> list[str] | None:
    """The checkpoint weights a fused weight concatenates (None for a weight that is not fused)."""
    for fused, parts in _FUSED.items():
        for kind in ("weight", "bias"):
            suffix = f"{fused}.{kind}"
            if name.endswith(suffix):
                pre = name[: -len(suffix)]
                return [f"{pre}{p}.{kind}" for p in parts]
    return None


def _few(names: list[str], n: int = 5) -> str:
    return f"{names[:n]}{'...' if len(names) > n else ''}"


def _warn_unused(folder: Path, cfg: ModelConfig, unused: list[str]) -> None:
    """One warning for all of a checkpoint's unused weights, as transformers gives: a checkpoint with
    an extra head or biases its config turns off is still the model its config describes."""
    warnings.warn(
        f"checkpoint {folder} holds {len(unused)} weight{'s' if len(unused) != 1 else ''} that a "
        f"{cfg.architecture} built from its config.json does not use, ignored as transformers "
        f"ignores them: {_few(unused)}; if they matter, config.json does not describe the "
        "checkpoint (a bias that attention_bias / mlp_bias turns off, more layers than "
        "num_hidden_layers, a head this engine does not run): fix config.json, or use a checkpoint "
        "of a supported architecture; otherwise the model is the one transformers loads, and "
        "nothing needs doing",
        UnusedCheckpointWeightsWarning,
        stacklevel=3,  # the line that called load_model, not this helper or load_model itself
    )


def _shard_progress(files: list[Path]) -> Iterable[Path]:
    """``files``, with a progress bar on a terminal when there are several (an 8B checkpoint's four
    shards take tens of seconds to read, as transformers shows with its own bar)."""
    if len(files) < 2:
        return files
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a missing bar must not stop a load
        return files
    # disable=None: no bar where stderr is not a terminal (logs, CI, a redirected job)
    return tqdm(files, desc="Loading checkpoint shards", unit="shard", disable=None, leave=False)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of the checkpoint's safetensors files (on the CPU, as stored); a file that
    cannot be read, or a weight that is not a plain float, is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _shard_progress(_weight_files(folder)):
        try:
            state.update(load_file(str(f), device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {f} ({e}); the file is corrupt or truncated") from None
    for k, v in state.items():
        if v.dtype not in _WEIGHT_DTYPES:
            raise CheckpointError(
                f"weight {k} in {folder} is stored as {str(v.dtype).removeprefix('torch.')}; only "
                "unquantized float32 / bfloat16 / float16 checkpoints are supported (a quantized "
                "checkpoint's weights need their scales): load an unquantized checkpoint of this model"
            )
    return state


def tie_output_layer(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> None:
    """Settle a config's ``tie_word_embeddings`` against the weights, as transformers loads them:
    with both ``lm_head.weight`` and the embedding present and different (in ``dtype``), they are
    not tied (the checkpoint's own output layer is used; ``cfg`` is changed to say so); with only
    ``lm_head.weight``, it is the embedding too; otherwise the duplicate ``lm_head.weight`` is
    dropped. ``state`` is changed in place."""
    head = state.get("lm_head.weight")
    if not cfg.tie_word_embeddings or head is None:
        return
    emb = state.get("model.embed_tokens.weight")
    if emb is None:
        state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
    elif head.shape == emb.shape and (torch.equal(head, emb) or torch.equal(head.to(dtype), emb.to(dtype))):
        del state["lm_head.weight"]
    else:
        # NOTE: dropping it ran the embedding as the output layer: another model than transformers'
        cfg.tie_word_embeddings = False


def load_model(folder: Path, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """Build the model from ``folder`` and load its weights. A missing weight or a wrong shape is a
    CheckpointError; weights the model does not use are ignored with one
    UnusedCheckpointWeightsWarning, as transformers loads such a checkpoint."""
    cfg = ModelConfig.from_folder(folder)
    state = _read_weights(folder)
    tie_output_layer(state, cfg, dtype)
    with torch.device("meta"):
        # in the engine's dtype from the start: built in fp32 and cast after loading, a bf16 model
        # took its size three times over on the device while it loaded (fp32, then the bf16 copy)
        model = CausalLM(cfg).to(dtype)
    expected = dict(model.state_dict())
    # old Llama saves hold each layer's rotary table, a buffer the model recomputes (below):
    # dropped without a warning, as transformers drops it
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    state = fuse_projections(state, cfg, folder, expected)
    missing, unexpected = _mismatch(set(expected), set(state))
    if missing:
        # NOTE: transformers initialises a missing weight at random and runs: a different model
        # with no error, so here it is one
        raise CheckpointError(
            f"checkpoint {folder} does not match a {cfg.architecture}: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}; use a checkpoint whose weights its config.json describes "
            "(the architecture, num_hidden_layers, tie_word_embeddings, the bias flags)"
        )
    if unexpected:
        _warn_unused(folder, cfg, unexpected)
        for k in unexpected:
            del state[k]
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"weight {k} has shape {tuple(v.shape)}, config.json implies {tuple(expected[k].shape)}"
            )
    model = model.to_empty(device=device)
    # each checkpoint tensor is copied (and cast) into its parameter: no converted copy of the
    # whole checkpoint beside it
    model.load_state_dict(state, strict=False)
    del state
    # the rotary table is not a weight: recompute it in fp32 (the model was cast to ``dtype``)
    model.rotary.inv_freq = rope_inv_freq(cfg).to(device)
    if device.type == "cpu" and dtype == torch.float32:
        model.column_major_projections()  # faster few-row GEMMs on the CPU, same values
    return model.eval()
