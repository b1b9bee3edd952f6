"""llguidance engine: lark grammars, JSON schemas outlines-core cannot take, regex fallback.

One ``LLTokenizer`` per ``TokenizerInfo`` is built from the same bytes-per-token table the
outlines-core engine uses (special tokens marked, EOS ids passed), so both engines agree on every
token. A compiled grammar is kept as a template matcher; each request gets a ``deep_copy``, which
skips re-parsing the grammar.

Every ``LLMatcher`` made here runs under ``PARSER_LIMITS``: a mask computation that would run away
(an ambiguous grammar's Earley items, a regex's lexer states) ends the matcher in an error that
``error()`` calls too expensive. llguidance 1.x has no limit on its forced-bytes loop, so a lark
grammar's matcher also has a ``forcing_guard.ForcingGuard``, which walks the forced text first
and ends the request past ``forcing_guard.MAX_FORCED_BYTES``. The state where a bound was passed
is remembered: speculation rolls its draft back and takes it again, and the request must end
there with the bound named, without computing that mask again.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints.errors import limit_of, too_expensive_message
from llmir_lang.executor.constraints.forced import forced_boundary
from llmir_lang.executor.constraints.forcing_guard import (
    NO_FORCING,
    ForcingGuard,
    GuardLayout,
    byte_tokenizer,
    guard_layout,
)
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
        self.guard = _guard_template(info, grammar) if lark else None

    def compile_error(self) -> str | None:
        return self.template.get_error() if self.template.is_error() else None

    def warnings(self) -> list[str]:
        return list(self.template.get_grammar_warnings())

    def new_matcher(self) -> LLGuidanceMatcher:
        guard = None
        if self.guard is not None:
            template, layout = self.guard
            guard = ForcingGuard(template.deep_copy(), layout, self.info.token_bytes)
        return LLGuidanceMatcher(self.template.deep_copy(), self.info, self.template, guard)


def _guard_template(info: TokenizerInfo, grammar: str) -> tuple[Any, GuardLayout] | None:
    """The template of a lark grammar's ``ForcingGuard`` copy and how it reads text, or None
    where the copy cannot be made. The no-forcing option goes last: a later %llguidance line
    overrides an earlier one's keys, and the grammar's own may say "no_forcing": false."""
    layout = guard_layout(info, grammar)
    text = grammar + "\n" + NO_FORCING
    if not layout.model_ids:
        template = _byte_template(text)
    else:
        template = new_llmatcher(layout.tokenizer, text)
        template = None if template.is_error() else template
    return None if template is None else (template, layout)


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
        "_spent",
        "_at_spent",
    )

    def __init__(
        self, native: Any, info: TokenizerInfo, template: Any = None, guard: ForcingGuard | None = None
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
        # the tokens after which a mask passed a bound, its error() and over_budget(): that state
        # stays a dead end across rollbacks (speculation's verify takes its draft back, then its
        # tokens again), and its mask is not computed again
        self._spent: tuple[list[int], str, str] | None = None
        self._at_spent = False

    def can_fill_in_batch(self, bitmask: torch.Tensor) -> bool:
        """Whether llguidance's batch call may compute this row: not after EOS, nor where its
        forced-bytes loop would not return, nor where a bound was passed (``fill_bitmask``
        writes the empty row)."""
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
            self._eos_done, self._eos_counted, self._at_spent = True, counted, False
            return True
        if self.native.try_consume_tokens([token_id]) != 1:
            if self.native.is_error():  # a limit passed taking it (a row of too many items)
                self._refused = self._native_error()[0]
                self._rebuild(self._tokens)
            return False
        self._tokens.append(token_id)
        if self._guard is not None and not self._guard.advance(token_id):
            # the copy reads the token otherwise than llguidance did (a max_tokens= lexeme
            # counts the copy's tokens, which are bytes): it cannot guard from here
            self._guard = None
        self._at_spent = self._is_spent_state()
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
        self._at_spent = self._is_spent_state()

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
        """Whether no mask is to be computed here: a bound was passed here before, or
        llguidance's forced-bytes loop would never return (``error()`` then says why)."""
        if self._at_spent:
            return True
        if self._guard is None or not self._guard.endless():
            return False
        detail = f"more than {self._guard.limit} bytes with no choice"
        self._spend(too_expensive_message(detail, endless=True), "forced text")
        return True

    def _spend(self, why: str, limit: str) -> None:
        """Remember that a mask here passed ``limit`` (see ``__init__``)."""
        if not self._eos_done:
            self._spent = (list(self._tokens), why, limit)
            self._at_spent = True

    def _is_spent_state(self) -> bool:
        return self._spent is not None and not self._eos_done and self._spent[0] == self._tokens

    def note_dead_end(self) -> None:
        if self._dead is None:
            self._dead = "the constraint allows no further token here (and the output is not complete)"

    def over_budget(self) -> str | None:
        if self.native.is_error():
            return limit_of(self.native.get_error())
        if self._at_spent and self._spent is not None:
            return self._spent[2]
        return limit_of(self._refused) if self._refused else None

    def error(self) -> str | None:
        if self.native.is_error():  # a mask (or forced text) computed here passed a limit
            why, limit = self._native_error()
            if limit is not None and not self._at_spent:
                self._spend(why, limit)
            return why
        if self._at_spent and self._spent is not None:
            return self._spent[1]
        return self._dead or self._refused

    def _native_error(self) -> tuple[str, str | None]:
        """What to say of llguidance's error, and the limit it reports passing (or None)."""
        lines = self.native.get_error().strip().splitlines()
        detail = f"llguidance: {lines[0] if lines else 'error'}"
        limit = limit_of(detail)
        return (detail if limit is None else too_expensive_message(detail)), limit


# --- whole-text checks, independent of any model's tokenizer ----------------------------------
@functools.lru_cache(maxsize=64)
def _byte_template(grammar: str) -> Any:
    matcher = new_llmatcher(byte_tokenizer(), grammar)
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
