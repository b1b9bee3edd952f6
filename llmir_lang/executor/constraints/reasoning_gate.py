"""A constraint that starts after a reasoning model's reasoning (SGLang's reasoner grammar, done
over bytes): ``ConstraintSpec.reasoning`` (``spec.gated_by_reasoning``) compiles to a
``GatedConstraint``, whose matchers let every token through until the output holds the end tag
(``</think>``), then hand the answer to the constraint's own matcher.

What the gate guarantees: the text its inner matcher takes is exactly the answer
``ir.reasoning.split_reasoning`` splits off the output (``reasoning_scan`` reads the output as
the split does). So:

- whitespace right after the end tag is let through and not given to the constraint (the split
  strips the answer): a JSON schema works after ``</think>\\n\\n``. Tokens that are only
  whitespace are allowed there, and so are tokens of leading whitespace and a beginning of the
  answer the constraint takes (checked once per constraint; past ``_MIXED_CHECKS`` of those that
  need a matcher's walk, the rest stay masked: the model then writes them in two tokens);
- a token may end the tag and begin the answer (``k>{``): the bytes after the tag are spelled in
  tokens and given to the constraint. Before the tag is complete, the mask already leaves out the
  tokens whose answer bytes the constraint refuses, so a sampled token never dead-ends there;
- a format whose model writes its own start tag (``qwen3``): an output that does not begin with
  it (after whitespace) has no reasoning to the split, which takes all of it as the answer; the
  constraint then covers the output from its first byte, whitespace included;
- EOS is masked until the end tag, unlike SGLang (whose grammar leaves EOS allowed inside the
  reasoning): a constrained generation that ends ``"stop"`` holds a complete value (the matcher
  protocol: the EOS bit is set exactly where ``is_accepting()``), so the model closes its
  reasoning and answers, or ``max_tokens`` cuts it (``"length"``, no answer, as in SGLang);
- ``forced_tokens()`` / ``forced_text()`` are empty, ``is_accepting()`` / ``is_terminated()``
  False, until the end tag: jump-forward and speculation's checks never act on the reasoning.

Not covered (the split would then differ from the constrained text): a tag that is a special
token (its bytes are not in ``TokenizerInfo.token_bytes``: the gate never sees it; the split
would not either, as detokenizing drops special tokens); non-ASCII whitespace after the tag; an
answer that itself holds the start tag (the split removes every one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmir_lang.executor.constraints.errors import TokenizerVocabularyError, UnsatisfiableConstraintError
from llmir_lang.executor.constraints.matcher import Matcher, allocate_bitmask, bitmask_words
from llmir_lang.executor.constraints.reasoning_scan import (
    INNER,
    PHASE_NAMES,
    PRE,
    THINK,
    WHITESPACE,
    WS,
    VocabTables,
    end_candidates,
    pre_candidates,
    scan,
)
from llmir_lang.executor.constraints.spec import ReasoningTags
from llmir_lang.executor.constraints.tokenizer_info import TokenizerInfo, greedy_tokenize

_MIXED_CHECKS = 256  # tokens of whitespace + answer checked by a matcher's walk, per constraint
_PRE_CACHE = 64  # rows kept for outputs before the start tag (whitespace, "<th", ...)


def _pack(allowed: np.ndarray, words: int) -> np.ndarray:
    """Boolean per token -> int32 bitmask words (bit ``v % 32`` of word ``v // 32``)."""
    bits = np.zeros(words * 32, dtype=bool)
    bits[: allowed.size] = allowed
    return np.packbits(bits, bitorder="little").view(np.int32)


def _unpack(row: np.ndarray, vocab_size: int) -> np.ndarray:
    return np.unpackbits(np.ascontiguousarray(row).view(np.uint8), bitorder="little")[:vocab_size].astype(
        bool
    )


def _feed(m: Matcher, ids: list[int]) -> int:
    """Advance ``m`` over ``ids``: how many, or -1 (``m`` left as it was) if it refuses one."""
    for k, tid in enumerate(ids):
        if not m.advance(tid):
            m.rollback(k)
            return -1
    return len(ids)


class GatedConstraint:
    """A compiled constraint (``inner``) applied after the reasoning of ``tags``; shared by every
    request that uses it. The masks of the phases before the answer depend on the output only
    through a few bytes (the start of a tag, the whitespace before it), and the constraint then
    stands at its start, so they are computed once here and copied into each request's row."""

    def __init__(self, inner: Any, tags: ReasoningTags, info: TokenizerInfo) -> None:
        self.inner = inner
        self.tags = tags
        self.info = info
        self.engine: str = inner.engine
        self.start, self.end = tags.start.encode("utf-8"), tags.end.encode("utf-8")
        self.tables = VocabTables.of(info, self.start, self.end)
        self.words = bitmask_words(info.vocab_size)
        self._accepted: dict[bytes, bool] = {}
        self._think_rows: dict[bytes, np.ndarray] = {}
        self._pre_rows: dict[bytes, tuple[np.ndarray, bool]] = {}
        self.ws_row = self._whitespace_row()
        self.think_row(b"")
        if not tags.forced:
            self.pre_row(b"")

    def new_matcher(self) -> ReasoningGateMatcher:
        return ReasoningGateMatcher(self, self.inner.new_matcher())

    # --- the answer's first bytes -----------------------------------------------------------
    def spell(self, data: bytes) -> list[int] | None:
        """Token ids spelling exactly ``data`` (the tokenizer's own where it does), or None."""
        try:
            return self.info.encode(data.decode("utf-8"))
        except UnicodeDecodeError:  # a token ended inside a character: spelled byte-wise
            pass
        except TokenizerVocabularyError:
            return None
        try:
            return greedy_tokenize(self.info, data)
        except TokenizerVocabularyError:
            return None

    def accepts(self, answer: bytes) -> bool:
        """Whether the constraint, from its start, takes ``answer`` as the beginning of a match."""
        hit = self._accepted.get(answer)
        if hit is None:
            ids = self.spell(answer)
            m = self.inner.new_matcher()
            hit = ids is not None and _feed(m, ids) >= 0 and m.error() is None
            self._accepted[answer] = hit
        return hit

    def _start_mask(self, prefix: bytes = b"") -> tuple[np.ndarray, bool]:
        """The constraint's allowed tokens (and whether it accepts) after ``prefix``; none if it
        refuses ``prefix``."""
        m = self.inner.new_matcher()
        ids = self.spell(prefix) if prefix else []
        none = np.zeros(self.info.vocab_size, dtype=bool)
        if ids is None or _feed(m, ids) < 0:
            return none, False
        mask = allocate_bitmask(1, self.info.vocab_size)
        m.fill_bitmask(mask, 0)
        if m.error() is not None:
            return none, False
        return _unpack(mask[0].numpy(), self.info.vocab_size), m.is_accepting()

    # --- the rows of the phases before the answer --------------------------------------------
    def _whitespace_row(self) -> np.ndarray:
        """After the end tag: whitespace, or the constraint's first token, or both in one token."""
        t = self.tables
        at_start, accepting = self._start_mask()
        allowed = (at_start & ~t.first_ws) | t.pure_ws
        first_bytes = {b[0] for i in np.flatnonzero(at_start).tolist() if (b := self.info.token_bytes[i])}
        checks = 0
        for tid in np.flatnonzero(t.first_ws & ~t.pure_ws).tolist():
            rest = self.info.token_bytes[tid].lstrip(WHITESPACE)  # type: ignore[union-attr]
            if rest[0] not in first_bytes:
                continue
            ids = self.spell(rest)
            if ids is not None and len(ids) == 1:
                allowed[tid] = at_start[ids[0]]
            elif checks < _MIXED_CHECKS:
                checks += 1
                allowed[tid] = self.accepts(rest)
        if not accepting and not (allowed & ~t.pure_ws).any():
            # the answer is stripped (the split strips it), so such a constraint never starts:
            # the model would write whitespace up to max_tokens
            raise UnsatisfiableConstraintError(
                f"after the reasoning's end tag {self.tags.end!r} the answer is stripped of leading "
                "whitespace (as the reasoning split strips it), and every match of this constraint "
                "begins with whitespace; drop the leading whitespace from the constraint "
                "(choices=['yes', 'no'], not [' yes', ' no'])"
            )
        return _pack(allowed, self.words)

    def think_row(self, tail: bytes) -> np.ndarray:
        """Inside the reasoning, the output ending in ``tail`` (a beginning of the end tag): every
        token but EOS and those ending the tag with answer bytes the constraint refuses."""
        row = self._think_rows.get(tail)
        if row is None:
            allowed = np.ones(self.info.vocab_size, dtype=bool)
            allowed[list(self.info.eos_token_ids)] = False
            for tid in end_candidates(self.tables, self.end, tail).tolist():
                st = scan(self.start, self.end, THINK, tail, self.info.token_bytes[tid])  # type: ignore[arg-type]
                if st.phase == INNER and not self.accepts(st.answer):
                    allowed[tid] = False
            row = self._think_rows[tail] = _pack(allowed, self.words)
        return row

    def pre_row(self, pre: bytes) -> tuple[np.ndarray, bool]:
        """Before a start tag, the output being ``pre``: tokens on the way to the start tag, and
        those the constraint takes after ``pre`` (the output is then all answer); and whether
        the constraint accepts ``pre`` as it is."""
        hit = self._pre_rows.get(pre)
        if hit is not None:
            return hit
        allowed, accepting = self._start_mask(pre)
        for tid in pre_candidates(self.tables, self.start, pre).tolist():
            st = scan(self.start, self.end, PRE, pre, self.info.token_bytes[tid])  # type: ignore[arg-type]
            if st.phase != INNER or (not st.whole and self.accepts(st.answer)):
                allowed[tid] = True
        hit = (_pack(allowed, self.words), accepting)
        if len(pre) <= 32 and len(self._pre_rows) < _PRE_CACHE:
            self._pre_rows[pre] = hit
        return hit


class ReasoningGateMatcher(Matcher):
    """One request's state under a ``GatedConstraint`` (the contract of ``matcher.py``)."""

    def __init__(self, gate: GatedConstraint, inner: Matcher) -> None:
        self._g = gate
        self._inner = inner
        self.engine = gate.engine
        self.eos_token_ids = inner.eos_token_ids
        self.vocab_size = inner.vocab_size
        self._phase = THINK if gate.tags.forced else PRE
        self._buf = b""
        # per successful advance: the phase and buffer before it, and how many tokens it gave the
        # inner matcher (0 inside the reasoning; several where one token ended the tag)
        self._history: list[tuple[int, bytes, int]] = []
        self._dead: str | None = None

    @property
    def phase(self) -> str:
        """Where the output stands (for messages and tests)."""
        return PHASE_NAMES[self._phase]

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self._phase == INNER:
            self._inner.fill_bitmask(bitmask, row)
            return
        target = bitmask[row]
        if target.numel() < self._g.words or not target.is_contiguous() or target.dtype != torch.int32:
            raise ValueError(
                f"bitmask row must be contiguous int32 with >= {self._g.words} words, got {tuple(target.shape)}"
            )
        self.fill_numpy_row(target.numpy())

    def fill_numpy_row(self, out: np.ndarray) -> None:
        """``fill_bitmask`` into one int32 row given as a numpy view (``fill_batch_bitmask``)."""
        g, phase = self._g, self._phase
        if phase == INNER:
            fill = getattr(self._inner, "fill_numpy_row", None)
            if fill is not None:
                fill(out)
            else:
                self._inner.fill_bitmask(torch.from_numpy(out[None]), 0)
            return
        if phase == WS:
            row = g.ws_row
        elif phase == THINK:
            row = g.think_row(self._buf)
        else:
            row = g.pre_row(self._buf)[0]
        out[: g.words] = row
        out[g.words :] = 0

    def advance(self, token_id: int) -> bool:
        token = int(token_id)
        phase, buf, g = self._phase, self._buf, self._g
        if phase == INNER:
            if not self._inner.advance(token):
                return False
            return self._took(INNER, b"", 1, INNER, b"")
        data = g.info.token_bytes[token] if 0 <= token < len(g.info.token_bytes) else None
        if data is None:  # EOS, or a token that spells nothing
            if phase == THINK:
                return token not in self.eos_token_ids and self._took(THINK, buf, 0, THINK, buf)
            ids = g.spell(buf) if phase == PRE and buf else []
            return ids is not None and self._give(phase, buf, [*ids, token], INNER, b"")
        st = scan(g.start, g.end, phase, buf, data)
        if st.phase != INNER:
            return self._took(phase, buf, 0, st.phase, st.buf)
        if st.whole:  # no start tag up front: the whole output is the answer
            ids = g.spell(buf) if buf else []
            ids = None if ids is None else [*ids, token]
        else:
            ids = [token] if st.answer == data else g.spell(st.answer)
        return ids is not None and self._give(phase, buf, ids, INNER, b"")

    def _give(self, phase: int, buf: bytes, ids: list[int], new_phase: int, new_buf: bytes) -> bool:
        n = _feed(self._inner, ids)
        return n >= 0 and self._took(phase, buf, n, new_phase, new_buf)

    def _took(self, phase: int, buf: bytes, n_inner: int, new_phase: int, new_buf: bytes) -> bool:
        self._history.append((phase, buf, n_inner))
        self._phase, self._buf, self._dead = new_phase, new_buf, None
        return True

    def rollback(self, n: int) -> None:
        undone = self._pop_history(self._history, n)
        if not undone:
            return
        given = sum(k for _, _, k in undone)
        if given:
            self._inner.rollback(given)
        self._phase, self._buf = undone[0][0], undone[0][1]
        self._dead = None

    def is_accepting(self) -> bool:
        if self._phase == PRE:
            return self._g.pre_row(self._buf)[1]
        return self._phase != THINK and self._inner.is_accepting()

    def is_terminated(self) -> bool:
        return self._phase in (WS, INNER) and self._inner.is_terminated()

    def forced_tokens(self) -> list[int]:
        return self._inner.forced_tokens() if self._phase in (WS, INNER) else []

    def forced_text(self) -> str:
        return self._inner.forced_text() if self._phase in (WS, INNER) else ""

    def batch_delegate(self) -> Matcher | None:
        """The matcher whose row this one's is (the constraint's own, once the answer began), for
        ``fill_batch_bitmask`` to fill with llguidance's batch call; None before."""
        return self._inner if self._phase == INNER else None

    def error(self) -> str | None:
        if self._dead is not None:
            return self._dead
        return self._inner.error() if self._phase in (WS, INNER) else None

    def note_dead_end(self) -> None:
        if self._phase == INNER:
            self._inner.note_dead_end()
            return
        self._dead = (
            f"no token can follow the output {PHASE_NAMES[self._phase]} (reasoning tags "
            f"{self._g.tags.start!r} / {self._g.tags.end!r}) under the constraint"
        )

    def over_budget(self) -> str | None:
        return self._inner.over_budget() if self._phase in (WS, INNER) else None
