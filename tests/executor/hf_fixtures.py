"""Random-weight tiny checkpoints of every supported architecture, saved in Hugging Face format."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 384  # model vocab; the tokenizer has fewer entries (a padded vocab, like real checkpoints)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the quick brown fox jumps over the lazy dog", "name: Ada, age: 36, city: Paris"] * 20
    tok.train_from_iterator(text, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(str(folder))


# the transformers config fields every test checkpoint shares (a tiny random model)
COMMON_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    eos_token_id=0,
    bos_token_id=None,
    tie_word_embeddings=False,
)


def make_config(arch: str):
    import transformers as tf

    common = dict(COMMON_CONFIG)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "llama3":
        return tf.LlamaConfig(
            **{**common, "tie_word_embeddings": True},
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        )
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**{**common, "tie_word_embeddings": True})
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32)
    raise ValueError(arch)


ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


def build_checkpoint(arch: str, folder: Path, seed: int = 0):
    """Save a random model of ``arch`` plus a tokenizer into ``folder``; return the HF model (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = make_config(arch)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # bigger weights than the default init make logits far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.normal_(1.0, 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    save_tokenizer(folder)
    return model


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation by full recomputation (no cache): tokens and their logprobs."""
    out, lps = [], []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            tok = int(logits.argmax())
            lps.append(float(torch.log_softmax(logits, -1)[tok]))
            out.append(tok)
            seq.append(tok)
    return out, lps


def build_hf_folder(cfg, folder: Path, **save_kw):
    """A random model of ``cfg`` (biases random too, so a dropped one shows) saved with the test
    tokenizer into ``folder``; returns the HF model (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(1.0, 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), **save_kw)
    save_tokenizer(folder)
    return model


def greedy_matches(folder: Path, hf, prompts, n: int) -> None:
    """The engine on ``folder`` (fp32, CPU) gives transformers' greedy tokens for ``prompts``, and
    their logprobs within 1e-4."""
    from llmir_lang.executor.engine import Engine

    with Engine(str(folder), device="cpu", kv_memory="4MB") as eng:
        results = eng.generate(
            [list(p) for p in prompts], {"max_new_tokens": n, "ignore_eos": True, "return_logprob": True}
        )
    for p, r in zip(prompts, results):
        tokens, lps = hf_greedy(hf, list(p), n)
        assert r.token_ids == tokens
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) <= 1e-4


def edit_config(folder: Path, **fields) -> None:
    """Set fields of ``folder``'s config.json (``...`` removes one)."""
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in fields.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))
