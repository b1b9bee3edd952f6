"""The forcing guard: a lark grammar's parser read over bytes, without forcing, beside its matcher.

llguidance 1.x computes the text a grammar forces (in every mask, ``compute_ff_bytes`` and
``compute_ff_tokens``) in a loop that runs while one byte is allowed, and no ``LLParserLimits``
bounds it: it never returns where a terminal swallows what must follow it (``A: /[ab]c+/`` before
``"c"``: after ``a`` only ``c`` is ever allowed). Before llguidance's loop runs, ``ForcingGuard``
walks the same forced text on its own copy of the parser, at most ``MAX_FORCED_BYTES`` of it;
past that the request ends (``LLGuidanceMatcher`` says why).

The copy follows every token the matcher takes. It reads text byte by byte, and a grammar that
names the model's tokens (``<[123]>``, ``<|special_7|>``: llguidance's special-token syntax) also
keeps the model's token ids, so that a special token is taken as the one token it is
(``_ModelIdLayout``); other grammars get the 257-token byte vocabulary (``_ByteLayout``), whose
masks cost half as much or less. llguidance's loop also walks through a special token where it
is the only thing allowed (it spells it ``\\xff[123]``); so does the guard's walk.

The walk cannot tell text that never ends from long text: llguidance's Python API shows neither
the parser's state (a repeated state would prove a loop) nor where lexemes end. So past the
bound the text is taken for endless; a grammar that does force more text than that needs
``MAX_FORCED_BYTES`` raised (read when a request's matcher is made), and the error says so.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints.tokenizer_info import TokenizerInfo

# Forced text longer than this is taken for text that never ends. No grammar seen forces this
# much; walking it all takes about 70 ms with the byte vocabulary, 0.2 s with the model's ids.
MAX_FORCED_BYTES = 32768
NO_FORCING = '%llguidance {"no_forcing": true}\n'
# llguidance's syntax for the model's tokens: token ids and ranges, and special tokens by name
# (the only names the matcher's tokenizer gives, ``llguidance_backend._TokenizerAdapter``). Found
# inside a string or a regex too, where it means text: that grammar just gets the wider layout.
_NAMES_MODEL_TOKENS = re.compile(r"<\[|<\|special_\d+\|>")


def max_forced_bytes() -> int:
    """``MAX_FORCED_BYTES``, checked: a request's guard keeps the value it was made with."""
    n = MAX_FORCED_BYTES
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConstraintError(
            f"forcing_guard.MAX_FORCED_BYTES must be an int >= 1 (the bytes of forced text walked "
            f"before it is taken for endless), got {n!r}"
        )
    return n


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
def byte_tokenizer() -> Any:
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()), n_vocab=257, eos_token=[256])


class _ByteLayout:
    """Byte ``b`` is token ``b``, EOS is 256: for grammars that name none of the model's tokens."""

    model_ids = False

    @property
    def tokenizer(self) -> Any:
        return byte_tokenizer()

    def spell(self, data: bytes) -> list[int]:
        return list(data)

    def scratch(self) -> None:
        return None

    def forced(self, matcher: Any, scratch: None) -> tuple[int, int] | None:
        byte = _forced_byte(matcher)
        return None if byte is None else (byte, 1)


def _forced_byte(matcher: Any) -> int | None:
    """The one byte a byte-level matcher allows, where it allows one and is not complete."""
    bias = matcher.compute_logit_bias()
    if matcher.is_error() or bias[256] or bias.count(0, 0, 256) != 255:
        return None
    return len(bias[:256].rstrip(b"\0")) - 1


class _ModelTokens:
    """What ``llguidance.TokenizerWrapper`` reads for ``_ModelIdLayout``: the model's ids (and a
    few more, up to a multiple of 32) as special tokens, then the 256 bytes, then EOS."""

    bos_token_id = None

    def __init__(self, info: TokenizerInfo, base: int) -> None:
        # the names the matcher's tokenizer gives the model's special tokens resolve the same
        self.tokens = [b"<|special_%d|>" % i for i in range(base)] + [bytes([b]) for b in range(256)]
        self.tokens.append(b"<|guard_eos|>")
        self.eos_token_id = base + 256
        self.special_token_ids = [*range(base), base + 256]
        self._base = base

    def __call__(self, data: bytes) -> list[int]:
        return [self._base + b for b in data]


class _ModelIdLayout:
    """The model's token ids are the copy's own (every one special, never spelled), so a token
    that a token-range lexeme takes is taken whole, as llguidance takes it; byte ``b`` is token
    ``base + b`` (``base``: the vocabulary size rounded up to whole mask words); EOS follows.
    Masks are read from a word buffer: the bytes' 8 words, EOS's bit, and only where one byte or
    none is allowed, the model's ids."""

    model_ids = True

    def __init__(self, info: TokenizerInfo) -> None:
        import llguidance

        self.base = -(-info.vocab_size // 32) * 32
        self.words = self.base // 32 + 9
        wrapper = llguidance.TokenizerWrapper(_ModelTokens(info, self.base))
        self.tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=self.base + 257, eos_token=[self.base + 256])

    def spell(self, data: bytes) -> list[int]:
        base = self.base
        return [base + b for b in data]

    def scratch(self) -> np.ndarray:
        return np.zeros(self.words, dtype=np.int32)

    def forced(self, matcher: Any, scratch: np.ndarray) -> tuple[int, int] | None:
        """The token llguidance's loop forces next, and the bytes it stands for: a lone byte, or
        a lone special token where no byte is allowed (spelled ``\\xff[id]``)."""
        matcher.unsafe_compute_mask_ptr(scratch.ctypes.data, scratch.nbytes)
        if matcher.is_error():
            return None
        at = self.base // 32
        *byte_words, eos_word = scratch[at:].tolist()
        if eos_word & 1:  # complete here: llguidance forces nothing
            return None
        allowed = [(i, w & 0xFFFFFFFF) for i, w in enumerate(byte_words) if w]
        if allowed:
            i, word = allowed[0]
            # one byte, and none of the model's tokens (a token-range lexeme) beside it
            if len(allowed) > 1 or word & (word - 1) or scratch[:at].any():
                return None
            return self.base + 32 * i + word.bit_length() - 1, 1
        ids = np.flatnonzero(scratch[:at])
        if len(ids) != 1:
            return None
        word = int(scratch[ids[0]]) & 0xFFFFFFFF
        if word & (word - 1):
            return None
        token = 32 * int(ids[0]) + word.bit_length() - 1
        return token, len(b"\xff[%d]" % token)


GuardLayout = _ByteLayout | _ModelIdLayout
_BYTES = _ByteLayout()


def guard_layout(info: TokenizerInfo, grammar: str) -> GuardLayout:
    """How ``grammar``'s guard reads text: with the model's token ids where the grammar names
    the model's tokens, else over bytes alone."""
    if _NAMES_MODEL_TOKENS.search(grammar) is None:
        return _BYTES
    return info.cached("forcing_guard_layout", lambda: _ModelIdLayout(info))


class ForcingGuard:
    """One request's copy of its grammar's parser, without forcing, in step with its matcher:
    ``endless`` walks the forced text from the current state, at most ``limit`` bytes of it
    (about 3 us a byte). Where the walk ends (a choice, or a complete text), llguidance's loop
    does too; the stretch walked is not walked again, nor after a rollback that stays inside it
    (speculation rolls its draft back every step). ``read`` counts the bytes taken (a special
    token as its spelling ``\\xff[id]``)."""

    __slots__ = (
        "native",
        "layout",
        "token_bytes",
        "limit",
        "taken",
        "sizes",
        "read",
        "walked_from",
        "safe_until",
        "_scratch",
    )

    def __init__(self, native: Any, layout: GuardLayout, token_bytes: tuple[bytes | None, ...]) -> None:
        self.native = native
        self.layout = layout
        self.token_bytes = token_bytes
        self.limit = max_forced_bytes()
        self.taken: list[int] = []  # the copy's tokens for each of the matcher's
        self.sizes: list[int] = []  # the bytes of each
        self.read = 0
        # the forced text walked from the state at byte walked_from ends at byte safe_until: every
        # state in between is on it, so its loop ends there too (-1: nothing walked)
        self.walked_from = 0
        self.safe_until = -1
        self._scratch = layout.scratch()

    def advance(self, token: int) -> bool:
        """Take the matcher's ``token``; False where the copy cannot (it is then of no use)."""
        native = self.native
        if self.layout.model_ids and native.try_consume_tokens([token]) == 1:
            # llguidance gives a token to a token-range lexeme that allows it before it reads
            # the token's bytes: a special token, or any token the grammar names by id
            self._took(1, len(b"\xff[%d]" % token))
            return True
        data = self.token_bytes[token] if 0 <= token < len(self.token_bytes) else None
        if not data:
            return False
        spelled = self.layout.spell(data)
        if native.try_consume_tokens(spelled) != len(spelled):
            return False
        self._took(len(spelled), len(data))
        return True

    def _took(self, tokens: int, size: int) -> None:
        self.taken.append(tokens)
        self.sizes.append(size)
        self.read += size

    def rollback(self, n: int) -> bool:
        """Undo the copy's part of the matcher's last ``n`` tokens."""
        if n == 0:
            return True
        tokens = sum(self.taken[-n:])
        self.read -= sum(self.sizes[-n:])
        del self.taken[-n:], self.sizes[-n:]
        if self.read < self.walked_from:  # before the walk: what follows may differ from here on
            self.safe_until = -1
        return bool(self.native.rollback(tokens))

    def endless(self) -> bool:
        """Whether the text forced from here runs past ``limit`` bytes (llguidance's loop would
        not return)."""
        if self.walked_from <= self.read <= self.safe_until:
            return False  # on forced text already walked: llguidance's loop ends where it did
        layout, scratch = self.layout, self._scratch
        probe = self.native
        walked = 0
        while True:
            step = layout.forced(probe, scratch)
            if step is None:
                self.walked_from, self.safe_until = self.read, self.read + walked
                return False
            if walked >= self.limit:
                return True
            if probe is self.native:
                probe = probe.deep_copy()
            if not probe.consume_token(step[0]):
                return False  # not llguidance's loop: it stops where a byte is refused
            walked += step[1]
