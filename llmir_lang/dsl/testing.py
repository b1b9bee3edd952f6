"""Random-weight checkpoints for DSL tests and benchmarks (nothing is downloaded).

``random_checkpoint(folder, ...)`` writes a Llama model with random weights in Hugging Face format,
with the bundled model's tokenizer files when they exist (so prompts tokenize as in production),
else a small byte-level BPE trained here on the bundled model's synthetic task corpus, with the
same ChatML chat template. Such a model produces nonsense, so tests on it assert structure only;
its speed and its prefix reuse are real, which is what a benchmark measures.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from llmir_lang.models import TINY_MODEL_DIR

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")


def bundled_model_available() -> bool:
    """True when the trained bundled model (weights and tokenizer) is installed."""
    return (TINY_MODEL_DIR / "config.json").is_file() and (TINY_MODEL_DIR / "tokenizer.json").is_file()


def write_tokenizer(folder: Path, seed: int = 0, docs: int = 400, vocab_size: int = 600) -> None:
    """A byte-level BPE tokenizer for ``folder``: the bundled one's files, or one trained on
    ``docs`` synthetic documents of the bundled model's tasks."""
    folder.mkdir(parents=True, exist_ok=True)
    if (TINY_MODEL_DIR / "tokenizer.json").is_file():
        for name in _TOKENIZER_FILES:
            if (TINY_MODEL_DIR / name).is_file():
                shutil.copy(TINY_MODEL_DIR / name, folder / name)
        return
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmir_lang.models import tiny_tasks

    rng = random.Random(seed)
    corpus = [tiny_tasks.make_training_document(rng) for _ in range(docs)]
    tok = Tokenizer(models.BPE())
    # letters, single digits, single whitespace characters and punctuation runs are pre-tokens,
    # so text cut after a space tokenizes like the whole text
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}|\s|[^\s\p{L}\p{N}]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[3]
    )
    hf.chat_template = tiny_tasks.CHAT_TEMPLATE
    hf.save_pretrained(str(folder))


def random_checkpoint(
    folder: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama checkpoint (and a tokenizer) into ``folder``; return it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    folder = Path(folder)
    write_tokenizer(folder, seed=seed)
    tok = AutoTokenizer.from_pretrained(str(folder))
    eos = tok.convert_tokens_to_ids(SPECIAL_TOKENS[0])
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        eos_token_id=eos,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # wider than the default init, so greedy outputs vary with the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder
