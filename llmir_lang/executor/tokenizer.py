"""The checkpoint's tokenizer and chat template, and incremental detokenization."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from llmir_lang.errors import ChatTemplateRefusedError, CheckpointError, InvalidRequestError
from llmir_lang.executor.chat_render import render_chat
from llmir_lang.executor.text_bytes import TextBytes, run_text
from llmir_lang.executor.tokenizer_files import bundled_tokenizer

__all__ = ["IncrementalDecoder", "TextBytes", "Tokenizer", "lone_surrogate", "run_text"]

# texts at least this long are encoded with the GIL released (see ``Tokenizer.encode``)
_LONG_TEXT = 256


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> re.Match[str] | None:
    """The first lone surrogate in ``text`` (a code point no tokenizer can encode: an unpaired
    ``\\ud8xx`` JSON escape, bytes decoded with ``errors='surrogateescape'``), or None."""
    return None if text.isascii() else _SURROGATE.search(text)


# files one of which a folder needs for AutoTokenizer to build a tokenizer from it
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class Tokenizer:
    """The checkpoint's tokenizer: transformers' ``AutoTokenizer``, or, for the bundled model's
    tokenizer files, the same tokenizer read with the ``tokenizers`` library alone
    (``tokenizer_files.py``: importing transformers costs about 1.5 s of start-up on a 2-core CPU).
    ``hf`` is transformers' tokenizer either way, loaded on first use in the second case; once it
    is loaded, its chat template and its Rust tokenizer are the ones in force (a caller may change
    them), as when it was loaded from the start.

    The chat template is the checkpoint's own (tokenizer_config.json's ``chat_template`` or a
    ``chat_template.jinja`` file); there is no fallback table.

    ``vocab_size`` is the model's (config.json's, read from the folder when not given): where the
    tokenizer has ids the model's embedding lacks, ``encode`` refuses text that holds them.
    ``use_transformers`` loads transformers' tokenizer from the start (tests compare the two).
    """

    def __init__(
        self,
        folder: str | Path,
        config_eos_ids: list[int] | None = None,
        vocab_size: int | None = None,
        *,
        use_transformers: bool = False,
    ):
        folder = Path(folder)
        if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
            raise CheckpointError(
                f"no tokenizer files in {folder} (none of {', '.join(_TOKENIZER_FILES)}); copy the "
                "tokenizer files (tokenizer.json and tokenizer_config.json) from the model's source "
                "into this folder"
            )
        self._folder = folder
        self._hf_lock = threading.Lock()
        files = None if use_transformers else bundled_tokenizer(folder)
        self._hf: Any = _load_transformers(folder) if files is None else None
        # what the facts below are read from: transformers' tokenizer or the same one from its files
        src: Any = self._hf if files is None else files
        self._files = files
        eos: set[int] = set(config_eos_ids or [])
        if src.eos_token_id is not None:
            eos.add(int(src.eos_token_id))
        gen_cfg = folder / "generation_config.json"
        if gen_cfg.is_file():
            eos.update(_generation_eos_ids(gen_cfg))
        self.eos_token_ids: list[int] = sorted(eos)
        self._eos_token_id: int | None = src.eos_token_id
        # NOTE: transformers' Python decode wrapper costs more than the Rust decode it calls; the
        # engine decodes every step, so call the Rust tokenizer directly when nothing else applies.
        rust = getattr(src, "_tokenizer", None)
        self._backend = rust
        cleanup = bool(getattr(src, "clean_up_tokenization_spaces", False))
        self._rust = rust if rust is not None and not cleanup else None
        # the same holds for encode (jump-forward encodes at every forced text: 27 us against 6 us
        # a call, measured) where the wrapper adds nothing: checked on probe texts, with and
        # without special tokens, once here (the bundled files' tokenizer is that Rust tokenizer)
        same = files is not None or (rust is not None and self._same_encode(rust))
        self._rust_encode = rust if same else None
        self.bos_token_id: int | None = src.bos_token_id
        self.all_special_ids: set[int] = set(src.all_special_ids)
        # what decode(skip_special_tokens=True) leaves out: the special tokens and every added token
        # marked special (a chat template's <|im_start|> is often only the latter)
        added = getattr(src, "added_tokens_decoder", None) or {}
        self.skipped_ids: frozenset[int] = frozenset(
            self.all_special_ids | {i for i, t in added.items() if getattr(t, "special", False)}
        )
        # A chat template that writes the BOS token itself (Llama 2 / 3, Mistral: ``{{ bos_token }}``)
        # renders text starting with it, and the tokenizer adds another: transformers'
        # apply_chat_template(tokenize=True) encodes without special tokens, so a rendered chat
        # starts with one BOS there. ``encode`` keeps one where the text's own BOS meets the added one.
        bos_text = src.bos_token if isinstance(src.bos_token, str) else None
        self._bos_text: str | None = None
        if self.bos_token_id is not None and bos_text:
            probe = "a"
            added_bos = self._encode(probe, True)[:1] == [self.bos_token_id]
            if added_bos and self._encode(probe, False)[:1] != [self.bos_token_id]:
                self._bos_text = bos_text
        self._model_vocab = _model_vocab_size(folder) if vocab_size is None else vocab_size
        self._len = len(src)
        ids_end = max(self._len, max(src.get_vocab().values(), default=-1) + 1)
        if self._model_vocab is not None and ids_end <= self._model_vocab:
            self._model_vocab = None  # every id the tokenizer makes is one the model has

    @property
    def hf(self) -> Any:
        """transformers' tokenizer of the checkpoint (loaded now if it was read from its files)."""
        if self._hf is None:
            with self._hf_lock:
                if self._hf is None:
                    hf = _load_transformers(self._folder)
                    # NOTE: from now on its Rust tokenizer is the one used (the same as the files',
                    # which tests check), so that a change a caller makes to it takes effect
                    rust = getattr(hf, "_tokenizer", None)
                    if rust is not None:
                        self._backend = rust
                        self._rust = rust if self._rust is not None else None
                        self._rust_encode = rust if self._rust_encode is not None else None
                    self._hf = hf
        return self._hf

    @property
    def backend_tokenizer(self) -> Any:
        """The Rust ``tokenizers.Tokenizer`` (transformers' ``backend_tokenizer``; None for a slow
        tokenizer), without loading transformers; ``TokenizerInfo.from_hf`` reads it."""
        return self._backend

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own EOS id (transformers' ``eos_token_id``; ``eos_token_ids`` adds the
        config's)."""
        return self._eos_token_id

    def _source(self) -> Any:
        # once transformers' tokenizer is loaded, it is the one in force (its chat_template may
        # have been changed)
        return self._hf if self._hf is not None else self._files

    @property
    def vocab_size(self) -> int:
        return len(self.hf) if self._hf is not None else self._len

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._source(), "chat_template", None))

    _PROBES = ("Hello world", " two  spaces\n\tand a tab", '{"key":"value"}', "héllo ✓ 日本", "")

    def _same_encode(self, rust: Any) -> bool:
        probes = [*self._PROBES, *(str(t) for t in self.hf.all_special_tokens[:4])]
        probes += [p + " " + probes[0] for p in probes[-4:]]  # special tokens inside text
        try:
            return all(
                list(self.hf.encode(t, add_special_tokens=sp)) == rust.encode(t, add_special_tokens=sp).ids
                for t in probes
                for sp in (False, True)
            )
        except Exception:
            return False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._encode(text, add_special_tokens)
        if (
            add_special_tokens
            and self._bos_text is not None
            and len(ids) > 1
            and ids[0] == ids[1] == self.bos_token_id
            and text.startswith(self._bos_text)
        ):
            ids = ids[1:]  # the text's own BOS (a rendered chat template) and the added one: keep one
        if self._model_vocab is not None and ids and max(ids) >= self._model_vocab:
            bad = sorted({i for i in ids if i >= self._model_vocab})
            raise InvalidRequestError(
                f"the text encodes to token id(s) {bad[:5]} "
                f"({', '.join(repr(self._source().convert_ids_to_tokens(i)) for i in bad[:5])}) "
                f"that the model's vocabulary (vocab_size {self._model_vocab} in config.json) lacks: the "
                f"tokenizer ({self.vocab_size} tokens) does not match this model; use the tokenizer "
                "files that came with the checkpoint, or remove those tokens from the text"
            )
        return ids

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._rust_encode is not None:
            if len(text) >= _LONG_TEXT:
                # the Rust ``encode`` holds the GIL throughout (0.4 ms for 500 tokens), and then
                # Python keeps it for up to a switch interval (5 ms): the engine thread, whose
                # every tensor op gives the GIL up, waited that long per op while a batch of
                # programs encoded its prompts. ``encode_batch`` releases the GIL while it works.
                return self._rust_encode.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
            return self._rust_encode.encode(text, add_special_tokens=add_special_tokens).ids
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._rust is not None:
            return self._rust.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kw: Any
    ) -> str:
        if not self.has_chat_template:
            raise InvalidRequestError(
                "this model's tokenizer has no chat template (neither tokenizer_config.json's "
                "'chat_template' nor a chat_template.jinja file in the checkpoint folder); send plain "
                "text prompts instead of chat messages, or add the template the model was trained with"
            )
        from jinja2 import TemplateError

        try:
            if self._hf is None and not kw:
                src = self._files
                text = render_chat(src.chat_template, messages, add_generation_prompt, src.special_tokens_map)
                if text is not None:
                    return text
            return self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw
            )
        except TemplateError as e:  # jinja's own error (a template's raise_exception) is no API
            raise ChatTemplateRefusedError(
                f"this model's chat template refuses these messages: {e}; send messages it takes "
                "(for many templates: roles alternating user / assistant, a system message only first)"
            ) from e

    def text_bytes(self) -> TextBytes | None:
        """How ``decode(ids, skip_special_tokens=False)`` builds text from each token's bytes (see
        ``TextBytes``), so the text length of every prefix of a sequence takes one pass over it
        instead of a decode per prefix. Checked once, on probe sequences (random ids, specials,
        characters split between tokens, malformed bytes); None where decode is not of that form
        (space clean-up, other decoders): callers decode prefixes instead."""
        if not hasattr(self, "_text_bytes"):
            try:
                self._text_bytes = self._build_text_bytes()
            except Exception:  # an unusual tokenizer: the caller decodes prefixes instead
                self._text_bytes = None
        return self._text_bytes

    def _build_text_bytes(self) -> TextBytes | None:
        import random

        from llmir_lang.executor.constraints.tokenizer_info import (
            _BYTE_FALLBACK,
            _detect_scheme,
            _token_to_bytes,
        )

        backend = self._backend
        if backend is None:
            return None
        scheme, byte_fallback = _detect_scheme(json.loads(backend.to_str()))
        added = backend.get_added_tokens_decoder()
        vocab = backend.get_vocab(with_added_tokens=True)
        table = [b""] * (max(vocab.values(), default=-1) + 1)
        fallback = set()
        for text, i in vocab.items():
            if byte_fallback and _BYTE_FALLBACK.match(text):
                fallback.add(i)
            raw = i in added and not _BYTE_FALLBACK.match(text)  # added tokens hold raw text
            b = text.encode("utf-8") if raw else _token_to_bytes(text, scheme, byte_fallback)
            if b is None:
                return None
            table[i] = b
        rng = random.Random(0)
        n = len(table)
        probes = [[rng.randrange(n) for _ in range(rng.randrange(1, 12))] for _ in range(64)]
        for text in (*self._PROBES[:-1], " lead", "a , b . c ' d n't", "日本語 é"):
            ids = self.encode(text, add_special_tokens=False)
            probes += [ids[:k] for k in range(1, len(ids) + 1)]  # characters split between tokens
        probes += [[i, *p] for i in sorted(self.all_special_ids) for p in probes[:2]]
        high = [i for i, b in enumerate(table) if len(b) == 1 and b[0] >= 0x80]  # lone bytes
        if high:  # malformed and cut-off UTF-8: U+FFFD the same way
            probes += [[rng.choice(high) for _ in range(rng.randrange(1, 6))] for _ in range(64)]
            probes += [[*p, rng.choice(high), *p] for p in probes[:8]]
        decoded = [self.decode(p, skip_special_tokens=False) for p in probes]
        for strip in (False, True):
            tb = TextBytes(table, frozenset(fallback if scheme == "sentencepiece" else ()), strip)
            if all(d == tb.text(p) for d, p in zip(decoded, probes)):
                return tb
        return None


def _load_transformers(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types here
        raise CheckpointError(
            f"cannot load the tokenizer from {folder} ({type(e).__name__}: {e}); its tokenizer "
            "files (tokenizer.json or tokenizer.model, with tokenizer_config.json) are corrupt, "
            "incomplete or of a kind this install cannot read"
        ) from None


def _generation_eos_ids(path: Path) -> list[int]:
    """``eos_token_id`` of ``generation_config.json`` (a token id or a list of them). A file that
    cannot be read is a CheckpointError: ignoring it would drop end-of-turn ids the model stops at
    (Llama 3's ``<|eot_id|>``), and generation would run on past them."""
    try:
        gen = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(gen, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(gen).__name__}, not an object of generation settings; "
            "the checkpoint is corrupt"
        )
    g = gen.get("eos_token_id")
    ids = [] if g is None else (g if isinstance(g, list) else [g])
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise CheckpointError(f"{path} field 'eos_token_id' must be a token id or a list of them, got {g!r}")
    return ids


def _model_vocab_size(folder: Path) -> int | None:
    """config.json's ``vocab_size`` in ``folder`` (None where there is none to read)."""
    try:
        v = json.loads((folder / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


class IncrementalDecoder:
    """Turns a growing list of token ids into text chunks, holding back incomplete UTF-8.

    Decodes only a short window before the new tokens, so each step costs O(window), not O(length):
    byte-level BPE needs the neighbours to decide spaces and multi-byte characters. The window
    grows by the new tokens each step and slides forward (keeping 4 tokens of left context) once it
    is longer than ``WINDOW``; while it grows, the text of the window before the new tokens is the
    previous step's decode, so a step costs one decode call, not two.
    """

    WINDOW = 16

    __slots__ = ("tok", "skip_special", "prefix_offset", "read_offset", "text", "_prev_ids", "_prev_text")

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip_special = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self._prev_ids: list[int] | None = None  # the last decoded window and its text
        self._prev_text = ""

    def step(self, ids: list[int]) -> str:
        """Given all output ids so far, return the newly completed text (maybe empty)."""
        start = self.prefix_offset
        before = ids[start : self.read_offset]
        # NOTE: compared by value, so a caller that moves the offsets or rewrites tokens (jump-forward)
        # never gets a stale prefix text
        if before == self._prev_ids:
            prefix_text = self._prev_text
        else:
            prefix_text = self.tok.decode(before, self.skip_special)
        window = ids[start:]
        full_text = self.tok.decode(window, self.skip_special)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            new = full_text[len(prefix_text) :]
            if len(window) > self.WINDOW:  # slide, keeping a few tokens of left context
                self.prefix_offset = max(len(ids) - 4, 0)
                self._prev_ids = None
            else:
                self._prev_ids, self._prev_text = window, full_text
            self.read_offset = len(ids)
            self.text += new
            return new
        return ""

    def flush(self, ids: list[int]) -> str:
        """At the end: whatever is left, even an incomplete character."""
        full = self.tok.decode(ids, self.skip_special)
        new = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += new
        return new
