"""llguidance engine: lark grammars, JSON schemas outlines-core cannot take, regex fallback.

One ``LLTokenizer`` per ``TokenizerInfo`` is built from the same bytes-per-token table the
outlines-core engine uses (special tokens marked, EOS ids passed), so both engines agree on every
token. A compiled grammar is kept as a template matcher; each request gets a ``deep_copy``, which
skips re-parsing the grammar.

Every ``LLMatcher`` made here runs under ``PARSER_LIMITS``: a mask computation that would run away
(an ambiguous grammar's Earley items, a regex's lexer states) ends the matcher in an error that
``error()`` calls too expensive. llguidance 1.x has no limit on its forced-bytes loop (in every
mask, ``compute_ff_bytes`` and ``compute_ff_tokens``), which runs while one byte is allowed:
forever where a terminal swallows what must follow it (``A: /[ab]c+/`` before ``"c"``). So a lark
grammar's matcher has a ``_ForcingGuard``, which walks the forced text first on a byte-level copy
of the parser without forcing, and ends the request past ``MAX_FORCED_BYTES``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints.errors import limit_of, too_expensive_message
from llmir_lang.executor.constraints.forced import forced_boundary
from llmir_lang.executor.constraints.matcher import Matcher, bitmask_words, complete_utf8_prefix
from llmir_lang.executor.constraints.tokenizer_info import TokenizerInfo

ENGINE = "llguidance"

# llguidance's bounds on one matcher's work (LLParserLimits), explicit so that a release with
# other defaults changes nothing here; past one, a step ends the matcher in an error. They are
# llguidance 1.9's defaults: JSONSchemaBench's schemas need up to 30,000-50,000 Earley items in a
# step and 750-1,000 in a row, and a rule of 1,500 literals needs 1,501 in a row, so tighter ones
# refuse real constraints. An ambiguous grammar (e: e e | "a") grows to about 1.3 s a mask on a
# 2-core CPU before max_items_in_row ends it (after about 280 tokens).
PARSER_LIMITS: dict[str, int] = {
    "step_max_items": 50_000,
    "max_items_in_row": 2_000,
    "step_lexer_fuel": 200_000,
    "initial_lexer_fuel": 1_000_000,
    "max_lexer_states": 250_000,
    "max_grammar_size": 500_000,
}
# A lark grammar's forced text longer than this is taken for one that never ends (below).
MAX_FORCED_BYTES = 32768  # no real grammar forces 32 KiB; walking it takes about 80 ms
_NO_FORCING = '%llguidance {"no_forcing": true}\n'


@functools.lru_cache(maxsize=1)
def parser_limits() -> Any:
    import llguidance

    return llguidance.LLParserLimits(**PARSER_LIMITS)


def new_llmatcher(tokenizer: Any, grammar: str) -> Any:
    """An ``llguidance.LLMatcher`` under ``PARSER_LIMITS``: every one this project makes."""
    import llguidance

    return llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=parser_limits())


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

    def __init__(self, info: TokenizerInfo, grammar: str, lark: bool = False) -> None:
        self.info = info
        self.grammar = grammar
        self.template = new_llmatcher(ll_tokenizer(info), grammar)
        # None where the grammar cannot be read over bytes (it names the model's special tokens).
        # The option goes last: a later %llguidance line overrides an earlier one's keys, and the
        # grammar's own may say "no_forcing": false
        self.guard = _byte_template(grammar + "\n" + _NO_FORCING) if lark else None

    def compile_error(self) -> str | None:
        return self.template.get_error() if self.template.is_error() else None

    def warnings(self) -> list[str]:
        return list(self.template.get_grammar_warnings())

    def new_matcher(self) -> LLGuidanceMatcher:
        guard = None if self.guard is None else _ForcingGuard(self.guard.deep_copy(), self.info.token_bytes)
        return LLGuidanceMatcher(self.template.deep_copy(), self.info, self.template, guard)


class LLGuidanceMatcher(Matcher):
    """``Matcher`` over an ``llguidance.LLMatcher`` (see ``matcher.py`` for the contract)."""

    engine = ENGINE
    __slots__ = (
        "native",
        "eos_token_ids",
        "vocab_size",
        "_words",
        "_dead",
        "_refused",
        "_tokens",
        "_eos_done",
        "_eos_counted",
        "_info",
        "_boundary",
        "_template",
        "_guard",
    )

    def __init__(
        self, native: Any, info: TokenizerInfo, template: Any = None, guard: _ForcingGuard | None = None
    ) -> None:
        self.native = native
        self.eos_token_ids = info.eos_token_ids
        self.vocab_size = info.vocab_size
        self._words = bitmask_words(info.vocab_size)
        self._dead: str | None = None
        self._refused: str | None = None  # why the last advance failed, where llguidance said
        self._tokens: list[int] = []  # consumed tokens, EOS excluded (``_eos_done`` says it)
        self._eos_done = False
        # llguidance holds the EOS as one of its tokens (where text could still have followed it,
        # not where the text was complete): its rollback(k) then counts it among the k
        self._eos_counted = False
        self._info = info
        self._boundary = forced_boundary(info)
        self._template = template  # the compiled grammar's matcher, to rebuild a failed one from
        self._guard = guard

    def can_fill_in_batch(self, bitmask: torch.Tensor) -> bool:
        """Whether llguidance's batch call may compute this row: not after EOS, nor where its
        forced-bytes loop would not return (``fill_bitmask`` writes the empty row)."""
        self._refused = None
        return bitmask.shape[1] == self._words and not self._eos_done and not self._stuck()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        target = bitmask[row]
        if target.numel() < self._words or not target.is_contiguous() or target.dtype != torch.int32:
            raise ValueError(
                f"bitmask row must be contiguous int32 with >= {self._words} words, got {tuple(target.shape)}"
            )
        self._refused = None
        if self._eos_done or self._stuck():  # after EOS llguidance keeps allowing EOS; here: nothing
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
        # a limit passed computing the last mask (a refused token's rebuilds at once) says nothing
        # of this token: speculation's verify advances through its draft whatever the masks were,
        # and rolls all of it back, so refusing here would undo tokens before the draft
        if self.native.is_error() and not self._rebuild(self._tokens):
            return False
        if token_id in self.eos_token_ids:
            # once stopped, llguidance's try/validate refuse EOS even when accepting
            if not self.native.is_accepting():
                return False
            counted = not self.native.is_stopped()
            if not self.native.consume_token(token_id):
                return False
            self._eos_done, self._eos_counted = True, counted
            return True
        if self.native.try_consume_tokens([token_id]) != 1:
            if self.native.is_error():  # a limit passed taking it (a row of too many items)
                self._refused = self.error()
                self._rebuild(self._tokens)
            return False
        self._tokens.append(token_id)
        if self._guard is not None and not self._guard.advance(token_id):
            self._guard = None  # the byte-level copy cannot follow (a special token): no guard
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
        if self._eos_done or native.is_stopped() or self._stuck():
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
        if self.native.is_stopped() or self._stuck():
            return ""
        return complete_utf8_prefix(self.native.compute_ff_bytes())

    def rollback(self, n: int) -> None:
        self._check_rollback(n, len(self._tokens) + self._eos_done)
        if n == 0:
            return
        real = n - self._eos_done
        ok = True
        if self.native.is_error():  # a limit passed: llguidance rolls back nothing, so rebuild
            ok = self._rebuild(self._tokens[: len(self._tokens) - real])
        elif self._eos_counted:  # the EOS is one of llguidance's n tokens
            ok = bool(self.native.rollback(n))
        elif real > 0:
            # after an EOS that ended a complete text, llguidance's rollback(k) undoes k real
            # tokens and the stop together
            ok = bool(self.native.rollback(real))
        elif self._tokens:  # undo EOS alone: step back one token and take it again
            ok = bool(self.native.rollback(1)) and bool(self.native.consume_token(self._tokens[-1]))
        else:  # EOS was the only token
            ok = bool(self.native.reset())
        if not ok:
            raise ConstraintError(f"llguidance could not roll back {n} tokens: {self.error()}")
        if real > 0:
            del self._tokens[-real:]
            if self._guard is not None and not self._guard.rollback(real):
                self._guard = None
        self._eos_done = self._eos_counted = False
        self._dead = self._refused = None

    def _rebuild(self, tokens: list[int]) -> bool:
        """Replace a matcher a limit stopped by the template's copy after ``tokens`` (the state
        before the failed step: no limit was passed reaching it)."""
        if self._template is None:
            return False
        native = self._template.deep_copy()
        if native.try_consume_tokens(tokens) != len(tokens):
            return False
        self.native = native
        return True

    def _stuck(self) -> bool:
        """Whether llguidance's forced-bytes loop would never return from here; ``error()`` then
        says why."""
        if self._guard is None or not self._guard.endless():
            return False
        detail = f"more than {MAX_FORCED_BYTES} bytes with no choice"
        self._dead = too_expensive_message(detail, endless=True)
        return True

    def note_dead_end(self) -> None:
        if self._dead is None:
            self._dead = "the constraint allows no further token here (and the output is not complete)"

    def over_budget(self) -> str | None:
        if self.native.is_error():
            return limit_of(self.native.get_error())
        if self._guard is not None and self._guard.flagged():
            return "forced text"
        return limit_of(self._refused) if self._refused else None

    def error(self) -> str | None:
        if self.native.is_error():
            lines = self.native.get_error().strip().splitlines()
            detail = f"llguidance: {lines[0] if lines else 'error'}"
            return too_expensive_message(detail) if limit_of(detail) else detail
        return self._dead or self._refused


class _ForcingGuard:
    """A request's lark grammar read over bytes, without forcing, beside its matcher: before a
    mask or forced text makes llguidance run its forced-bytes loop, ``endless`` walks the forced
    bytes here, at most ``MAX_FORCED_BYTES`` of them (about 5 us a byte). Where the walk ends
    (a choice, or a complete text), the loop does too; the stretch walked is not walked again,
    nor after a rollback that stays inside it (speculation rolls its draft back every step)."""

    __slots__ = ("native", "token_bytes", "sizes", "read", "walked_from", "safe_until", "endless_at")

    def __init__(self, native: Any, token_bytes: list[bytes | None]) -> None:
        self.native = native
        self.token_bytes = token_bytes
        self.sizes: list[int] = []  # bytes of each consumed token
        self.read = 0  # bytes consumed
        # the forced text walked from the state at byte walked_from ends at byte safe_until: every
        # state in between is on it, so its loop ends there too (-1: nothing walked)
        self.walked_from = 0
        self.safe_until = -1
        self.endless_at = -1  # the byte where the forced text was found not to end

    def advance(self, token: int) -> bool:
        data = self.token_bytes[token] if 0 <= token < len(self.token_bytes) else None
        if not data or self.native.try_consume_tokens(list(data)) != len(data):
            return False
        self.sizes.append(len(data))
        self.read += len(data)
        return True

    def rollback(self, n: int) -> bool:
        undo = sum(self.sizes[len(self.sizes) - n :])
        del self.sizes[len(self.sizes) - n :]
        self.read -= undo
        if self.read < self.walked_from:  # before the walk: what follows may differ from here on
            self.safe_until = -1
        if self.read < self.endless_at:
            self.endless_at = -1
        return undo == 0 or bool(self.native.rollback(undo))

    def flagged(self) -> bool:
        return self.endless_at == self.read

    def endless(self) -> bool:
        if self.endless_at == self.read:
            return True
        if self.walked_from <= self.read <= self.safe_until:
            return False  # on forced text already walked: llguidance's loop ends where it did
        probe = self.native
        for walked in range(MAX_FORCED_BYTES + 1):
            byte = _forced_byte(probe)
            if byte is None:
                self.walked_from, self.safe_until = self.read, self.read + walked
                return False
            if probe is self.native:
                probe = probe.deep_copy()
            if not probe.consume_token(byte):
                return False  # not llguidance's loop: it stops where a byte is refused
        self.endless_at = self.read
        return True


def _forced_byte(matcher: Any) -> int | None:
    """The one byte a byte-level matcher allows, where it allows one and is not complete."""
    bias = matcher.compute_logit_bias()
    if matcher.is_error() or bias[256] or bias.count(0, 0, 256) != 255:
        return None
    return len(bias[:256].rstrip(b"\0")) - 1


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
    matcher = new_llmatcher(_byte_tokenizer(), grammar)
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
