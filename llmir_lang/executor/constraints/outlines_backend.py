r"""outlines-core engine: a regex compiled to a token-level DFA (``Index``) up front.

Masks are then a lookup (outlines-core writes the state's bitmask directly), and forced text is a
walk along states with a single byte continuation, cached per state.

NOTE: outlines-core 0.2.14 drops every transition that leaves a final state towards a non-final
one: for ``2(\.[0-9]+)?`` it forbids ``.`` after ``2``, for choices ``ab|abcd`` it forbids ``c``
after ``ab`` (see the regression test). So the regex handed to it is ``(?:R)`` followed by an
end marker character, U+10FFFD, spelled by one synthetic token id beyond the vocabulary. No state
reachable by real tokens is then final, nothing is dropped, and "R accepts here" becomes "the
marker token is allowed here", which the matcher turns into the EOS bits. Real tokens containing
byte 0xF4 (the marker's lead byte, used only by plane-16 private-use characters) are left out of
the outlines-core vocabulary so no real text can spell the marker.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from llmir_lang.executor.constraints.forced import forced_boundary
from llmir_lang.executor.constraints.matcher import Matcher, bitmask_words, complete_utf8_prefix, word_bit
from llmir_lang.executor.constraints.tokenizer_info import TokenizerInfo

ENGINE = "outlines-core"
_MAX_FORCED_STEPS = 512
_MAX_ROLLBACK = 1 << 20
END_MARKER = "\U0010fffd"


def marker_id(info: TokenizerInfo) -> int:
    """The synthetic token spelling ``END_MARKER`` (outlines-core's own EOS id is this + 1)."""
    return info.vocab_size


def wrap_regex(regex: str) -> str:
    """The regex outlines-core compiles: ``R`` then the end marker (see module NOTE)."""
    return f"(?:{regex})\\x{{10FFFD}}"


_PLANE16 = re.compile(r"[\U00100000-\U0010FFFF]|\\[xuU]\{0*10[0-9a-fA-F]{4}\}|\\U0010[0-9a-fA-F]{4}")


def names_plane16(regex: str) -> bool:
    """True if ``regex`` names a character of plane 16 (U+100000-U+10FFFF, lead byte 0xF4), as
    itself or as an escape. outlines-core never produces one (tokens with byte 0xF4 are left out of
    its vocabulary, see NOTE): the choice ``"a\U0010fffd"`` compiled there and could never be
    written, and the regex of U+10FFFD alone was refused as unspellable. Such regexes go to
    llguidance."""
    return _PLANE16.search(regex) is not None


def outlines_vocabulary(info: TokenizerInfo) -> Any:
    import outlines_core

    def build() -> Any:
        table: dict[bytes, list[int]] = {}
        for i, b in enumerate(info.token_bytes):
            if b is not None and 0xF4 not in b:
                table.setdefault(b, []).append(i)
        table[END_MARKER.encode("utf-8")] = [marker_id(info)]
        return outlines_core.Vocabulary(marker_id(info) + 1, table)

    return info.cached("outlines_vocabulary", build)


class OutlinesCompiled:
    """An outlines-core ``Index`` of ``wrap_regex(regex)`` plus per-state caches shared by matchers."""

    engine = ENGINE

    def __init__(self, info: TokenizerInfo, regex: str, index: Any) -> None:
        self.info = info
        self.regex = regex
        self.index = index
        self.marker = marker_id(info)
        self.scratch_words = bitmask_words(self.marker + 2)
        self._forced: dict[int, tuple[bytes, list[int]]] = {}
        self._forced_tokens: dict[int, tuple[int, ...]] = {}
        self._only_end: dict[int, bool] = {}
        self._boundary = forced_boundary(info)

    def new_matcher(self) -> OutlinesMatcher:
        return OutlinesMatcher(self)

    def accepts(self, state: int) -> bool:
        """R matches the text so far: the marker can end it. (R itself may also take the
        marker as an ordinary character, e.g. inside a JSON string; that leads to a
        non-final state.)"""
        after = self.index.get_next_state(state, self.marker)
        return after is not None and self.index.is_final_state(after)

    def only_end(self, state: int) -> bool:
        """True if the regex is complete here and no real token can follow."""
        hit = self._only_end.get(state)
        if hit is None:
            allowed = self.index.get_allowed_tokens(state) or []
            hit = all(t == self.marker for t in allowed) and self.accepts(state)
            self._only_end[state] = hit
        return hit

    def forced(self, state: int) -> tuple[bytes, list[int]]:
        """(forced bytes, one token path spelling them) from ``state``; cached."""
        hit = self._forced.get(state)
        if hit is not None:
            return hit
        tb = self.info.token_bytes
        out = bytearray()
        path: list[int] = []
        s = state
        for _ in range(_MAX_FORCED_STEPS):
            if self.accepts(s):
                break  # the regex may end here: nothing is forced
            allowed = [t for t in self.index.get_allowed_tokens(s) or [] if t != self.marker]
            lcp: bytes | None = None
            shortest = -1
            for t in allowed:
                b = tb[t]
                if lcp is None:
                    lcp = b
                else:
                    n = 0
                    limit = min(len(lcp), len(b))
                    while n < limit and lcp[n] == b[n]:
                        n += 1
                    lcp = lcp[:n]
                    if not lcp:
                        break
                if shortest < 0 or len(b) < len(tb[shortest]):
                    shortest = t
            if not lcp or tb[shortest] != lcp:
                break
            out += lcp
            path.append(shortest)
            s = self.index.get_next_state(s, shortest)
        hit = (bytes(out), path)
        self._forced[state] = hit
        return hit

    def forced_tokens(self, state: int) -> tuple[int, ...]:
        """The tokens jump-forward commits from ``state``: the canonical spelling of the forced
        text (else the walk's own path), less a tail that could merge with what follows
        (``forced.ForcedBoundary``). Cached per state, so a schema's keys cost one computation."""
        hit = self._forced_tokens.get(state)
        if hit is not None:
            return hit
        data, path = self.forced(state)
        tokens: list[int] = []
        if data:
            info = self.info
            tokens = info.encode(data.decode("utf-8", errors="replace"))
            end = self._walk(state, tokens) if info.decode_bytes(tokens) == data else None
            if end is None:
                tokens = list(path)
                end = self._walk(state, tokens)
            assert end is not None  # the walk's own path is walkable by construction
            keep = self._boundary.committable(data, tokens, lambda rest: self._continues(end, rest))
            tokens = tokens[:keep]
        hit = tuple(tokens)
        self._forced_tokens[state] = hit
        return hit

    def _walk(self, state: int, tokens: list[int]) -> int | None:
        for t in tokens:
            state = self.index.get_next_state(state, t)
            if state is None:
                return None
        return state

    def _continues(self, state: int, rest: bytes) -> bool:
        """Does the regex allow the bytes ``rest`` from ``state``? Walked byte by byte through
        single-byte tokens (the DFA is byte-level, so that is exact); a byte without such a token
        (or the marker's lead byte, kept out of the vocabulary) counts as allowed."""
        for byte in rest:
            t = self._boundary.byte_token(byte)
            if t is None or byte == 0xF4:
                return True
            nxt = self.index.get_next_state(state, t)
            if nxt is None:
                return False
            state = nxt
        return True


class OutlinesMatcher(Matcher):
    """``Matcher`` over an outlines-core ``Guide`` (see ``matcher.py`` for the contract)."""

    engine = ENGINE

    def __init__(self, compiled: OutlinesCompiled) -> None:
        import outlines_core

        self._c = compiled
        self._index = compiled.index
        self._guide = outlines_core.Guide(compiled.index, max_rollback=_MAX_ROLLBACK)
        # numpy, not torch: element access from Python is ~20x cheaper, and this is the hot path
        self._scratch = np.zeros(compiled.scratch_words, dtype=np.int32)
        self._scratch_ptr = self._scratch.ctypes.data
        marker = compiled.marker
        self._marker_word, self._marker_shift = marker >> 5, marker & 31
        self._marker_clear = np.int32(~word_bit(marker & 31))
        self._eos_bits = [(e >> 5, np.int32(word_bit(e & 31))) for e in compiled.info.eos_token_ids]
        self._history: list[bool] = []  # True marks the EOS step
        self._eos_done = False
        self._dead: str | None = None
        self.eos_token_ids = compiled.info.eos_token_ids
        self.vocab_size = compiled.info.vocab_size
        self._words = bitmask_words(self.vocab_size)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        target = bitmask[row]
        if target.numel() < self._words or not target.is_contiguous() or target.dtype != torch.int32:
            raise ValueError(
                f"bitmask row must be contiguous int32 with >= {self._words} words, got {tuple(target.shape)}"
            )
        self.fill_numpy_row(target.numpy())  # a view: writes go to the bitmask

    def fill_numpy_row(self, out: np.ndarray) -> None:
        """``fill_bitmask`` into one int32 row given as a numpy view (``fill_batch_bitmask``'s
        fast path; the row must hold at least ``ceil(vocab_size / 32)`` words)."""
        if self._eos_done:
            out[:] = 0
            return
        scratch = self._scratch
        scratch[:] = 0
        self._guide.write_mask_into(self._scratch_ptr, scratch.size, 4)
        words = self._words
        out[:words] = scratch[:words]
        out[words:] = 0
        if self._marker_word < words:  # the synthetic marker bit shares the last word: clear it
            out[self._marker_word] &= self._marker_clear
        if (scratch[self._marker_word] >> self._marker_shift) & 1 and self._c.accepts(
            self._guide.get_state()
        ):
            for word, bit in self._eos_bits:
                out[word] |= bit

    def advance(self, token_id: int) -> bool:
        if self._eos_done:
            return False
        token_id = int(token_id)
        state = self._guide.get_state()
        if token_id in self.eos_token_ids:
            if not self._c.accepts(state):
                return False
            self._eos_done = True
            self._history.append(True)
            return True
        if token_id >= self.vocab_size or self._index.get_next_state(state, token_id) is None:
            return False
        self._guide.advance(token_id, return_tokens=False)
        self._history.append(False)
        return True

    def is_accepting(self) -> bool:
        return self._eos_done or self._c.accepts(self._guide.get_state())

    def is_terminated(self) -> bool:
        return self._eos_done or self._c.only_end(self._guide.get_state())

    def forced_text(self) -> str:
        if self._eos_done:
            return ""
        data, _ = self._c.forced(self._guide.get_state())
        return complete_utf8_prefix(data)

    def forced_tokens(self) -> list[int]:
        if self._eos_done:
            return []
        return list(self._c.forced_tokens(self._guide.get_state()))

    def rollback(self, n: int) -> None:
        undone = self._pop_history(self._history, n)
        if not undone:
            return
        if undone[-1]:
            self._eos_done = False
        guide_steps = sum(1 for eos in undone if not eos)
        if guide_steps:
            self._guide.rollback_state(guide_steps)
        self._dead = None

    def note_dead_end(self) -> None:
        self._dead = "the regex allows no further token here (and the output is not complete)"

    def error(self) -> str | None:
        return self._dead
