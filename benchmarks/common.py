"""Helpers shared by the benchmarks: random-weight checkpoints of real shapes, result files."""

from __future__ import annotations

import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BUNDLED = Path(__file__).resolve().parent.parent / "llmir_lang" / "models" / "llmir-tiny"

SHAPES = {
    # a few-layer Llama for host-overhead profiles (benchmarks/gpu/profile_step.py)
    "cpu-tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    ),
    # CPU-sized Llama for the CPU benchmarks
    "cpu-small": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


def save_tokenizer(folder: Path) -> None:
    """The tokenizer of random-weight checkpoints: the bundled model's (one builder for tests and
    benchmarks: ``llmir_lang.dsl.testing.write_tokenizer``)."""
    from llmir_lang.dsl.testing import write_tokenizer

    write_tokenizer(folder)


def random_checkpoint(shape: str, folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Save a random Llama of ``shape`` (HF format) to ``folder``; return the HF model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(max_position_embeddings=32768, rope_theta=500000.0, eos_token_id=0, **SHAPES[shape])
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    save_tokenizer(folder)
    return model


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    dev = device_name().replace(" ", "_")
    path = RESULTS / f"{name}_{dev}_{date.today().isoformat()}.json"
    payload = {
        "benchmark": name,
        "device": device_name(),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "unix_time": time.time(),
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
