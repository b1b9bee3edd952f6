"""llguidance engine: lark grammars, JSON schemas outlines-core cannot take, regex fallback.

One ``LLTokenizer`` per ``TokenizerInfo`` is built from the same bytes-per-token table the
outlines-core engine uses (special tokens marked, EOS ids passed), so both engines agree on every
token. A compiled grammar is kept as a template matcher; each request gets a ``deep_copy``, which
skips re-parsing the grammar.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints.forced import forced_boundary
from llmir_lang.executor.constraints.matcher import Matcher, bitmask_words, complete_utf8_prefix
from llmir_lang.executor.constraints.tokenizer_info import TokenizerInfo

ENGINE = "llguidance"


class _TokenizerAdapter:
    """What ``llguidance.TokenizerWrapper`` reads: tokens as bytes, EOS/BOS, special ids, encode."""

    def __init__(self, info: TokenizerInfo) -> None:
        self.eos_token_id = info.eos_token_ids[0]
        self.bos_token_id = None
        specials = sorted(info.special_ids)
        tokens = [b if b is not None else b"" for b in info.token_bytes]
        for i in specials:
            tokens[i] = b"<|special_%d|>" % i  # a name only; marked special below, never spelled
        self.tokens = tokens
        self.special_token_ids = specials
        self._encode = info.encode

    def __call__(self, data: bytes) -> list[int]:
        return self._encode(data.decode("utf-8", errors="replace"))


def ll_tokenizer(info: TokenizerInfo) -> Any:
    import llguidance

    def build() -> Any:
        wrapper = llguidance.TokenizerWrapper(_TokenizerAdapter(info))
        return llguidance.LLTokenizer(wrapper, n_vocab=info.vocab_size, eos_token=list(info.eos_token_ids))

    return info.cached("llguidance_tokenizer", build)


class LLGuidanceCompiled:
    """A grammar accepted by llguidance for one tokenizer; ``new_matcher`` copies a template."""

    engine = ENGINE

    def __init__(self, info: TokenizerInfo, grammar: str) -> None:
        import llguidance

        self.info = info
        self.grammar = grammar
        self.template = llguidance.LLMatcher(ll_tokenizer(info), grammar, log_level=0)

    def compile_error(self) -> str | None:
        return self.template.get_error() if self.template.is_error() else None

    def warnings(self) -> list[str]:
        return list(self.template.get_grammar_warnings())

    def new_matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self.template.deep_copy(), self.info)


class LLGuidanceMatcher(Matcher):
    """``Matcher`` over an ``llguidance.LLMatcher`` (see ``matcher.py`` for the contract)."""

    engine = ENGINE
    __slots__ = (
        "native",
        "eos_token_ids",
        "vocab_size",
        "_words",
        "_dead",
        "_tokens",
        "_eos_done",
        "_info",
        "_boundary",
    )

    def __init__(self, native: Any, info: TokenizerInfo) -> None:
        self.native = native
        self.eos_token_ids = info.eos_token_ids
        self.vocab_size = info.vocab_size
        self._words = bitmask_words(info.vocab_size)
        self._dead: str | None = None
        self._tokens: list[int] = []  # consumed tokens, EOS excluded (llguidance does not stack it)
        self._eos_done = False
        self._info = info
        self._boundary = forced_boundary(info)

    def can_fill_in_batch(self, bitmask: torch.Tensor) -> bool:
        return bitmask.shape[1] == self._words and not self._eos_done

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        target = bitmask[row]
        if target.numel() < self._words or not target.is_contiguous() or target.dtype != torch.int32:
            raise ValueError(
                f"bitmask row must be contiguous int32 with >= {self._words} words, got {tuple(target.shape)}"
            )
        if self._eos_done:  # llguidance keeps allowing EOS after it; the contract is: nothing
            target.zero_()
            return
        self.native.unsafe_compute_mask_ptr(target.data_ptr(), self._words * 4)
        if target.numel() > self._words:
            target[self._words :].zero_()

    def advance(self, token_id: int) -> bool:
        # try_consume_tokens leaves the matcher usable on refusal (consume_token would poison it).
        token_id = int(token_id)
        if self._eos_done:
            return False
        if token_id in self.eos_token_ids:
            # once stopped, llguidance's try/validate refuse EOS even when accepting
            if not self.native.is_accepting() or not self.native.consume_token(token_id):
                return False
            self._eos_done = True
            return True
        if self.native.try_consume_tokens([token_id]) != 1:
            return False
        self._tokens.append(token_id)
        return True

    def is_accepting(self) -> bool:
        return bool(self.native.is_accepting())

    def is_terminated(self) -> bool:
        return self._eos_done or bool(self.native.is_stopped())

    def forced_tokens(self) -> list[int]:
        """The canonical tokens of llguidance's forced bytes, less a tail that could merge with
        what follows (``forced.ForcedBoundary``). llguidance's own ``compute_ff_tokens`` holds
        back a token whenever a longer token starting with its last bytes is allowed, whether or
        not the tokenizer would ever use it (``":"`` before a string, for ``","``); it is the
        fallback when the canonical spelling is not one the matcher takes."""
        native = self.native
        if self._eos_done or native.is_stopped():
            return []
        data = bytes(native.compute_ff_bytes())
        if not data:
            return []
        info = self._info
        tokens = info.encode(data.decode("utf-8", errors="replace"))
        n = len(tokens)
        if info.decode_bytes(tokens) != data or native.validate_tokens(tokens) != n:
            return list(native.compute_ff_tokens())
        boundary = self._boundary

        def continues(rest: bytes) -> bool:
            spelled: list[int] = []
            for byte in rest:
                t = boundary.byte_token(byte)
                if t is None:
                    return True  # cannot ask the matcher: assume the constraint allows it
                spelled.append(t)
            return native.validate_tokens(tokens + spelled) == n + len(spelled)

        return tokens[: boundary.committable(data, tokens, continues)]

    def forced_text(self) -> str:
        if self.native.is_stopped():
            return ""
        return complete_utf8_prefix(self.native.compute_ff_bytes())

    def rollback(self, n: int) -> None:
        self._check_rollback(n, len(self._tokens) + self._eos_done)
        if n == 0:
            return
        real = n - self._eos_done
        ok = True
        if real > 0:
            # after EOS, llguidance's rollback(k) undoes k real tokens and the stop together
            ok = bool(self.native.rollback(real))
            del self._tokens[-real:]
        elif self._tokens:  # undo EOS alone: step back one token and take it again
            ok = bool(self.native.rollback(1)) and bool(self.native.consume_token(self._tokens[-1]))
        else:  # EOS was the only token
            ok = bool(self.native.reset())
        if not ok:
            raise ConstraintError(f"llguidance could not roll back {n} tokens: {self.error()}")
        self._eos_done = False
        self._dead = None

    def note_dead_end(self) -> None:
        self._dead = "the constraint allows no further token here (and the output is not complete)"

    def error(self) -> str | None:
        if self.native.is_error():
            lines = self.native.get_error().strip().splitlines()
            return f"llguidance: {lines[0] if lines else 'error'}"
        return self._dead


# --- whole-text checks, independent of any model's tokenizer ----------------------------------
class _ByteTokenizer:
    """A vocabulary of the 256 bytes plus EOS: a text is its UTF-8 bytes, so a matcher over it
    answers "is this text a complete match" for any tokenizer's output."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<|eos|>"]
    special_token_ids = [256]

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


@functools.lru_cache(maxsize=1)
def _byte_tokenizer() -> Any:
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()), n_vocab=257, eos_token=[256])


@functools.lru_cache(maxsize=64)
def _byte_template(grammar: str) -> Any:
    import llguidance

    matcher = llguidance.LLMatcher(_byte_tokenizer(), grammar, log_level=0)
    return None if matcher.is_error() else matcher


def grammar_forced_text(grammar: str) -> str | None:
    """The text every match of an llguidance ``grammar`` starts with (its forced bytes from the
    start), or None when the grammar does not compile without a model's tokenizer."""
    template = _byte_template(grammar)
    if template is None:
        return None
    return complete_utf8_prefix(template.deep_copy().compute_ff_bytes())


def text_matches(grammar: str, text: str) -> bool | None:
    """Whether ``text`` is a complete match of an llguidance ``grammar`` (from
    ``grammar_from_regex`` / ``grammar_from_lark``), checked byte by byte; None when the grammar
    does not compile without a model's tokenizer (it names special tokens, say)."""
    template = _byte_template(grammar)
    if template is None:
        return None
    matcher = template.deep_copy()
    data = list(text.encode("utf-8"))
    return matcher.try_consume_tokens(data) == len(data) and bool(matcher.is_accepting())
