"""The bundled model's tokenizer read with the ``tokenizers`` library alone.

``transformers.AutoTokenizer`` costs about 1.5 s of every process that starts an engine on a
2-core CPU (mostly importing transformers, which imports half of torch's distributed and dynamo
packages, whose teardown costs again at exit), and the engine uses it only for what its Rust
tokenizer and ``tokenizer_config.json`` already say. For the bundled model's tokenizer files
(``llmir_lang/models/llmir-tiny``, and byte-identical copies of them: the random-weight
checkpoints of tests and benchmarks), ``bundled_tokenizer`` builds the part of transformers'
``TokenizersBackend`` that ``Tokenizer`` reads, as transformers builds it for these files.
Every other folder (a checkpoint of one's own) is None: transformers decides how its files load
(the class it picks depends on its version, the model type and the files present), and
``Tokenizer`` loads it there. ``tests/executor/test_tokenizer_files.py`` compares the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmir_lang.executor.chat_render import render_chat
from llmir_lang.models import TINY_MODEL_DIR

# the files transformers compares byte for byte with the bundled model's
_SAME_FILES = ("tokenizer.json", "tokenizer_config.json")
# files (or folders) that change what transformers loads: with any of them, transformers loads
_OTHER_FILES = (
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order (all_special_tokens follows it)
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# the tokenizer_config.json keys whose meaning FileTokenizer reproduces (the rest only matter to
# transformers' own encode / pad / truncate, which the engine does not call)
_KNOWN_KEYS = {
    *_SPECIAL_ATTRS,
    "tokenizer_class",
    "add_bos_token",
    "add_eos_token",
    "clean_up_tokenization_spaces",
    "model_max_length",
    "padding_side",
    "truncation_side",
    "chat_template",
}


def bundled_tokenizer(folder: Path) -> FileTokenizer | None:
    """The tokenizer of ``folder`` read without transformers, where its tokenizer files are the
    bundled model's (and its config.json names the same model type); None otherwise."""
    try:
        if any((folder / name).exists() for name in _OTHER_FILES):
            return None
        if folder.resolve() != TINY_MODEL_DIR.resolve():
            for name in _SAME_FILES:
                if (folder / name).read_bytes() != (TINY_MODEL_DIR / name).read_bytes():
                    return None
            if _model_type(folder) != _model_type(TINY_MODEL_DIR) or _model_type(folder) is None:
                return None
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        tok = FileTokenizer(folder, config) if _plain_config(config) else None
    except Exception:  # a file missing or unreadable (tokenizers raises its own types)
        return None  # transformers reports it
    return tok if tok is not None and tok.as_transformers_builds_it() else None


def _plain_config(config: Any) -> bool:
    """Whether FileTokenizer reproduces what transformers makes of this tokenizer_config.json (the
    bundled one is; the check keeps a changed bundled tokenizer from being read wrongly)."""
    return (
        isinstance(config, dict)
        and set(config) <= _KNOWN_KEYS
        and config.get("tokenizer_class") in ("PreTrainedTokenizerFast", "TokenizersBackend")
        and not config.get("add_bos_token")
        and not config.get("add_eos_token")
        and config.get("clean_up_tokenization_spaces") is False
        and all(config.get(a) is None or isinstance(config.get(a), str) for a in _SPECIAL_ATTRS)
        and isinstance(config.get("chat_template"), (str, type(None)))
    )


def _model_type(folder: Path) -> str | None:
    """config.json's ``model_type`` (transformers' tokenizer class choice reads it), or None
    where config.json names its own tokenizer class or code, or cannot be read."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or "tokenizer_class" in cfg or "auto_map" in cfg:
        return None
    kind = cfg.get("model_type")
    return kind if isinstance(kind, str) else None


class FileTokenizer:
    """The attributes of transformers' ``TokenizersBackend`` that ``Tokenizer`` reads, under the
    same names, for the bundled model's files: a ``PreTrainedTokenizerFast`` config with named
    special tokens that tokenizer.json already holds as special added tokens, no BOS or EOS added
    (``add_bos_token`` / ``add_eos_token`` false), no space clean-up, one chat template, and no
    truncation, padding or post-processor in tokenizer.json."""

    def __init__(self, folder: Path, config: dict[str, Any]):
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import processors

        rust = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        self._json_plain = rust.truncation is None and rust.padding is None
        # NOTE: transformers rebuilds the post-processor where the config names add_bos_token or
        # add_eos_token (false here) or there is none: a template that adds nothing. The same
        # here, so that the backend (which TokenizerInfo serializes) is transformers' to the byte.
        if "add_bos_token" in config or "add_eos_token" in config or rust.post_processor is None:
            rust.post_processor = processors.TemplateProcessing(
                single="$A:0", pair="$A:0 $B:1", special_tokens=[]
            )
        rust.encode_special_tokens = False  # transformers' split_special_tokens (false)
        self._tokenizer = rust
        self.name_or_path = str(folder)
        self._special: dict[str, str] = {
            attr: config[attr] for attr in _SPECIAL_ATTRS if isinstance(config.get(attr), str)
        }
        self.chat_template: str | None = config.get("chat_template")
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))

    def as_transformers_builds_it(self) -> bool:
        """Whether tokenizer.json holds what the class docstring says (else transformers would
        change the backend: add missing special tokens, set truncation or padding, patch a large
        vocabulary's pre-tokenizer)."""
        rust = self._tokenizer
        added = rust.get_added_tokens_decoder()
        specials = {t.content for t in added.values() if t.special}
        return (
            self._json_plain and len(self) <= 100_000 and all(t in specials for t in self._special.values())
        )

    @property
    def backend_tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._special)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self._special.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._id(t) for t in self.all_special_tokens]

    @property
    def bos_token(self) -> str | None:
        return self._special.get("bos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self._special.get("eos_token"))

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        return self._tokenizer.get_added_tokens_decoder()

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, index: int) -> str | None:
        return self._tokenizer.id_to_token(int(index))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, conversation: Any, tokenize: bool = True, add_generation_prompt: bool = False, **kw: Any
    ) -> Any:
        """transformers' ``apply_chat_template``: rendered here for text (``tokenize=False``) of a
        plain conversation (``chat_render.py``), by transformers' own tokenizer otherwise."""
        if not tokenize and not kw:
            special = self.special_tokens_map
            text = render_chat(self.chat_template, conversation, add_generation_prompt, special)
            if text is not None:
                return text
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(self.name_or_path, local_files_only=True)
        return hf.apply_chat_template(
            conversation, tokenize=tokenize, add_generation_prompt=add_generation_prompt, **kw
        )
