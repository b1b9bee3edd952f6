"""The bytes each token id spells, built once per tokenizer and shared by both engines.

Invariants of a ``TokenizerInfo``:

- ``token_bytes[i]`` is the exact byte string token ``i`` appends to the output, or ``None`` when
  the token can never be produced under a constraint (special / control tokens, ids the tokenizer
  does not define, tokens that spell nothing).
- ``len(token_bytes) == vocab_size``, the model's vocabulary size, which may exceed the
  tokenizer's (embedding rows padded to a multiple of 64 or 128): the padding ids are ``None``.
- ``eos_token_ids`` is non-empty; EOS ids are special (their bytes are ``None``) and are allowed by
  a mask only in accepting states.

Byte-level BPE (GPT-2 / Llama-3 / Qwen) spells bytes through a printable-unicode alphabet; the
SentencePiece scheme (Llama-2 / Mistral) spells a space as ``▁`` and raw bytes as ``<0xNN>``
tokens. Tokens are read from the tokenizer's own model vocabulary and decoder description, never
by decoding tokens one at a time (which drops SentencePiece's leading spaces).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from llmir_lang.executor.constraints.errors import TokenizerVocabularyError

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SP_SPACE = "\u2581"


def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level table, inverted: printable stand-in character -> byte value.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in order, to
    code points from 256 upwards so that every byte has a visible, whitespace-free character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    table: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_alphabet()


def _decoder_types(node: Any) -> list[dict[str, Any]]:
    """All decoder descriptions in a (possibly nested ``Sequence``) decoder JSON tree."""
    if not isinstance(node, dict):
        return []
    found = [node]
    for child in node.get("decoders", []) or []:
        found.extend(_decoder_types(child))
    return found


def _detect_scheme(spec: dict[str, Any]) -> tuple[str, bool]:
    """(scheme, byte_fallback) from a tokenizer.json; scheme in byte_level | sentencepiece | plain."""
    decoders = _decoder_types(spec.get("decoder"))
    kinds = {d.get("type") for d in decoders}
    model = spec.get("model") or {}
    byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in kinds
    if "ByteLevel" in kinds:
        return "byte_level", byte_fallback
    replaces_space = any(
        d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == _SP_SPACE for d in decoders
    )
    if "Metaspace" in kinds or replaces_space:
        return "sentencepiece", byte_fallback
    if spec.get("decoder") is None or kinds <= {"Fuse", "Strip"}:
        return "plain", byte_fallback
    raise TokenizerVocabularyError(
        f"unsupported tokenizer decoder {sorted(k for k in kinds if k)}: the constraint compiler reads "
        "byte-level BPE (ByteLevel decoder) and SentencePiece-style (Metaspace / Replace '▁', "
        "ByteFallback) vocabularies; build TokenizerInfo(token_bytes=...) yourself for other schemes"
    )


def _token_to_bytes(token: str, scheme: str, byte_fallback: bool) -> bytes | None:
    if byte_fallback:
        m = _BYTE_FALLBACK.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
    if scheme == "byte_level":
        try:
            return bytes(_BYTE_LEVEL[c] for c in token)
        except KeyError:
            return token.encode("utf-8")  # an added (non-special) token holds raw text
    if scheme == "sentencepiece":
        return token.replace(_SP_SPACE, " ").encode("utf-8")
    return token.encode("utf-8")


class TokenizerInfo:
    """Bytes per token id, special ids, EOS ids and vocab size of one tokenizer (see module doc).

    Engine-specific vocabularies (outlines-core ``Vocabulary``, llguidance ``LLTokenizer``) are
    built lazily from this object and cached on it, so both engines agree on every token.
    """

    __slots__ = (
        "token_bytes",
        "eos_token_ids",
        "special_ids",
        "vocab_size",
        "scheme",
        "encode",
        "_raw_encode",
        "fingerprint",
        "_lock",
        "_engine_cache",
    )

    def __init__(
        self,
        token_bytes: Sequence[bytes | None],
        eos_token_ids: Sequence[int],
        encode: Callable[[str], list[int]] | None = None,
        special_ids: Sequence[int] = (),
        scheme: str = "custom",
    ) -> None:
        eos = tuple(sorted({int(e) for e in eos_token_ids}))
        if not eos:
            raise TokenizerVocabularyError(
                "the tokenizer has no EOS token; pass eos_token_ids=[...] so constrained generation can end"
            )
        if any(e < 0 or e >= len(token_bytes) for e in eos):
            raise TokenizerVocabularyError(
                f"EOS ids {list(eos)} fall outside the vocabulary of {len(token_bytes)} tokens"
            )
        specials = frozenset(int(s) for s in special_ids) | frozenset(eos)
        self.token_bytes: tuple[bytes | None, ...] = tuple(
            None if (i in specials or not b) else bytes(b) for i, b in enumerate(token_bytes)
        )
        self.eos_token_ids = eos
        self.special_ids = specials
        self.vocab_size = len(self.token_bytes)
        self.scheme = scheme
        self._raw_encode = encode
        self.encode = self._exact_encode
        h = hashlib.sha256()
        for b in self.token_bytes:
            h.update(b"\x00" if b is None else len(b).to_bytes(2, "little") + b)
        h.update(repr(eos).encode())
        self.fingerprint = h.hexdigest()[:24]
        # Re-entrant: building the llguidance tokenizer calls encode, which may build the
        # greedy index through the same cache.
        self._lock = threading.RLock()
        self._engine_cache: dict[str, Any] = {}

    @classmethod
    def from_hf(
        cls, tokenizer: Any, vocab_size: int | None = None, eos_token_ids: Sequence[int] = ()
    ) -> TokenizerInfo:
        """Build from a HF fast tokenizer, a ``tokenizers.Tokenizer``, the engine's ``Tokenizer``,
        or an object with ``.hf``.

        ``vocab_size`` is the model's vocabulary size (>= the tokenizer's; extra ids are padding).
        ``eos_token_ids`` defaults to the tokenizer's ``eos_token_id``.
        """
        backend, hf = _backend_of(tokenizer)
        spec = json.loads(backend.to_str())
        scheme, byte_fallback = _detect_scheme(spec)
        vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        special = {i for i, t in added.items() if t.special}
        n_tok = max(vocab.values(), default=-1) + 1
        size = n_tok if vocab_size is None else int(vocab_size)
        if size < n_tok:
            raise TokenizerVocabularyError(
                f"vocab_size={size} is smaller than the tokenizer's {n_tok} tokens; pass the model's "
                "embedding size (config.vocab_size)"
            )
        token_bytes: list[bytes | None] = [None] * size
        for text, i in vocab.items():
            if i in special:
                continue
            if i in added and not _BYTE_FALLBACK.match(text):
                token_bytes[i] = text.encode("utf-8")  # added tokens hold raw text in every scheme
            else:
                token_bytes[i] = _token_to_bytes(text, scheme, byte_fallback)
        eos = list(eos_token_ids)
        if not eos and hf is not None and getattr(hf, "eos_token_id", None) is not None:
            eos = [int(hf.eos_token_id)]

        def encode(text: str) -> list[int]:
            return list(backend.encode(text, add_special_tokens=False).ids)

        return cls(token_bytes, eos, encode=encode, special_ids=sorted(special), scheme=scheme)

    def _exact_encode(self, text: str) -> list[int]:
        """Token ids spelling exactly ``text``: the tokenizer's own segmentation when it does
        (SentencePiece prepends a space to a text's start), else a longest-match segmentation."""
        data = text.encode("utf-8")
        if self._raw_encode is not None:
            ids = self._raw_encode(text)
            if self.decode_bytes(ids) == data:
                return ids
        return greedy_tokenize(self, data)

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """Per-tokenizer cache of engine vocabularies (built once, under a lock)."""
        with self._lock:
            if key not in self._engine_cache:
                self._engine_cache[key] = build()
            return self._engine_cache[key]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes[i] or b"" for i in ids)

    def __repr__(self) -> str:
        return (
            f"TokenizerInfo(scheme={self.scheme!r}, vocab_size={self.vocab_size}, "
            f"eos={list(self.eos_token_ids)}, fingerprint={self.fingerprint!r})"
        )


def _backend_of(tokenizer: Any) -> tuple[Any, Any]:
    """(tokenizers.Tokenizer, transformers tokenizer or None) for the accepted tokenizer types."""
    # NOTE: ``backend_tokenizer`` first: the engine's Tokenizer has one without loading its
    # ``hf`` (transformers), which a look at ``.hf`` would load
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend, tokenizer
    inner = getattr(tokenizer, "hf", None)
    if inner is not None and hasattr(inner, "backend_tokenizer"):
        tokenizer = inner
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend, tokenizer
    if hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_vocab"):
        return tokenizer, None
    raise TokenizerVocabularyError(
        f"cannot read a vocabulary from {type(tokenizer).__name__}: pass a fast (Rust) HF tokenizer or "
        "a tokenizers.Tokenizer; slow tokenizers can be converted with AutoTokenizer(use_fast=True)"
    )


def greedy_tokenize(info: TokenizerInfo, data: bytes) -> list[int]:
    """Longest-match tokenization over ``info``'s byte vocabulary (raises if a byte cannot be spelled).

    Not the tokenizer's own segmentation: used to walk constraints where the canonical
    segmentation would add text (SentencePiece's leading ``▁``) and as the encoder of last resort.
    """
    index: dict[bytes, int] = info.cached("greedy_index", lambda: _first_ids(info))
    longest = max((len(b) for b in index), default=1)
    out: list[int] = []
    pos = 0
    while pos < len(data):
        for n in range(min(longest, len(data) - pos), 0, -1):
            tid = index.get(data[pos : pos + n])
            if tid is not None:
                out.append(tid)
                pos += n
                break
        else:
            raise TokenizerVocabularyError(f"byte {data[pos]:#04x} has no token in this vocabulary")
    return out


def _first_ids(info: TokenizerInfo) -> dict[bytes, int]:
    index: dict[bytes, int] = {}
    for i, b in enumerate(info.token_bytes):
        if b is not None and b not in index:
            index[b] = i
    return index
