"""User checkpoints on CUDA (Triton attention, CUDA graphs, the fused one-row projections): head
dims other than 64 / 128, projection biases, GQA / MQA, each dtype, against transformers on the same
GPU. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import COMMON_CONFIG, build_hf_folder

from llmir_lang.executor.engine import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ([5, 17, 33, 2, 90, 101, 7], [250, 3, 3, 9, 60, 61, 62, 8, 8, 9, 10, 11, 12, 13])
STEPS = 8


def _hf_logprobs(hf, seq: list[int], start: int, dtype: torch.dtype) -> torch.Tensor:
    """transformers' log-softmax rows that predict ``seq[start:]`` (on the CPU, fp32)."""
    with torch.no_grad():
        logits = hf.to("cuda", dtype)(torch.tensor([seq], device="cuda")).logits[0].float()
    return torch.log_softmax(logits, -1)[start - 1 : len(seq) - 1].cpu()


def _variants():
    import transformers as tf

    c = COMMON_CONFIG
    return {
        "llama_hd32": tf.LlamaConfig(**c, head_dim=32),
        "llama_hd80": tf.LlamaConfig(
            **{**c, "hidden_size": 80, "num_attention_heads": 1, "num_key_value_heads": 1}
        ),
        "llama_hd96": tf.LlamaConfig(**c, head_dim=96),
        "llama_hd100": tf.LlamaConfig(**c, head_dim=100),
        "llama_hd128_mqa": tf.LlamaConfig(**{**c, "num_key_value_heads": 1}, head_dim=128),
        "llama_hd256": tf.LlamaConfig(**c, head_dim=256),
        "llama_biases": tf.LlamaConfig(**c, attention_bias=True, mlp_bias=True),
        "mistral_hd128": tf.MistralConfig(**c, head_dim=128, sliding_window=None),
        "qwen2_tied": tf.Qwen2Config(**{**c, "tie_word_embeddings": True}),
        "qwen3_hd128": tf.Qwen3Config(**c, head_dim=128),
        "qwen3_bias_hd64": tf.Qwen3Config(**c, head_dim=64, attention_bias=True),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(_variants()))
def test_a_checkpoint_on_cuda_matches_transformers(name, dtype, tmp_path) -> None:
    """Greedy tokens from the engine, scored by transformers (teacher-forced): each chosen token's
    logprob agrees and is within rounding of transformers' best at that position."""
    hf = build_hf_folder(_variants()[name], tmp_path)
    with Engine(str(tmp_path), device="cuda", dtype=dtype, kv_memory="64MB") as eng:
        results = eng.generate(
            [list(p) for p in PROMPTS],
            {"max_new_tokens": STEPS, "ignore_eos": True, "return_logprob": True},
        )
    tol = 2e-3 if dtype == torch.float32 else 6e-2
    for p, r in zip(PROMPTS, results):
        rows = _hf_logprobs(hf, [*p, *r.token_ids], len(p), dtype)
        chosen = rows[torch.arange(len(r.token_ids)), torch.tensor(r.token_ids)]
        got = torch.tensor(r.logprobs)
        assert torch.isfinite(got).all(), (name, r.logprobs)
        assert (got - chosen).abs().max() <= tol, (name, got.tolist(), chosen.tolist())
        assert (rows.max(-1).values - chosen).max() <= tol, (name, r.token_ids)
