"""Jump-forward boundaries: how many tokens of a forced text can be committed before the model
writes what follows.

The forced text ``F`` is spelled by its canonical tokens ``T``. Committing all of ``T`` is wrong
only where the tokenizer would spell ``F`` followed by the model's continuation differently, i.e.
where some token straddles the boundary: ``w = s + p`` with ``s`` a suffix of ``F`` and ``p`` a
start of the continuation. Such a merge needs three things at once, and each is checked:

1. ``w`` is in the vocabulary (byte-level BPE and most tokenizers never put a token across a
   pre-tokenizer split, so ``"name"`` followed by ``":"`` has none);
2. the constraint allows ``p`` after ``F`` (the caller's ``continues``: after ``"age":`` only a
   digit or ``-`` may follow, so a token ``":x`` would not matter);
3. the tokenizer really uses it: ``encode(F + p)`` no longer starts with ``T``.

Only the tokens overlapping the longest suffix ``s`` that passes all three are held back. The
previous rule (always hold back the last token) left a forced token per field on the table.

Check 3 looks at ``p`` alone, not at every longer continuation; a merge that only a longer
continuation would trigger is possible in principle for BPE, and is what the engine's re-tokenization
of the tail (``engine_jump_forward._jump_forward``) repairs at the next jump. Text that is not valid
UTF-8 on its own counts as a merge (conservative).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from llmir_lang.executor.constraints.tokenizer_info import TokenizerInfo

_MERGE_CACHE_LIMIT = 1 << 16


class ForcedBoundary:
    """Vocabulary index and merge cache of one tokenizer (get it with ``forced_boundary(info)``).

    Thread-safe for its use here: the caches are only ever filled with the same value for a key.
    """

    __slots__ = ("info", "_sorted", "_max_len", "_single", "_ext", "_merge")

    def __init__(self, info: TokenizerInfo) -> None:
        self.info = info
        self._sorted = sorted({b for b in info.token_bytes if b})
        self._max_len = max((len(b) for b in self._sorted), default=1)
        single: dict[int, int] = {}
        for i, b in enumerate(info.token_bytes):
            if b is not None and len(b) == 1 and b[0] not in single:
                single[b[0]] = i
        self._single = single
        self._ext: dict[bytes, tuple[bytes, ...]] = {}
        self._merge: dict[tuple[bytes, bytes, tuple[int, ...]], bool] = {}

    def extensions(self, s: bytes) -> tuple[bytes, ...]:
        """The rests ``w[len(s):]`` of every vocabulary token ``w`` that starts with ``s`` and is longer."""
        hit = self._ext.get(s)
        if hit is None:
            out: list[bytes] = []
            i = bisect.bisect_right(self._sorted, s)  # s itself (if a token) sorts just before
            while i < len(self._sorted) and self._sorted[i].startswith(s):
                out.append(self._sorted[i][len(s) :])
                i += 1
            hit = tuple(out)
            if len(self._ext) >= _MERGE_CACHE_LIMIT:  # keyed by forced texts' tails: bounded too
                self._ext.clear()
            self._ext[s] = hit
        return hit

    def byte_token(self, byte: int) -> int | None:
        """A token spelling exactly this one byte, if the vocabulary has one."""
        return self._single.get(byte)

    def merges(self, forced: bytes, tokens: Sequence[int], rest: bytes) -> bool:
        """Would the tokenizer spell ``forced + rest`` other than ``tokens`` + something?"""
        key = (forced, rest, tuple(tokens))
        hit = self._merge.get(key)
        if hit is None:
            try:
                text = (forced + rest).decode("utf-8")
            except UnicodeDecodeError:
                hit = True
            else:
                ids = self.info.encode(text)
                hit = ids[: len(tokens)] != list(tokens)
            if len(self._merge) >= _MERGE_CACHE_LIMIT:
                self._merge.clear()
            self._merge[key] = hit
        return hit

    def committable(self, forced: bytes, tokens: Sequence[int], continues: Callable[[bytes], bool]) -> int:
        """How many leading ``tokens`` (which spell ``forced``) can be committed now.

        ``continues(p)`` says whether the constraint allows the bytes ``p`` right after ``forced``.
        Returns ``len(tokens)`` when no token can straddle the end of the forced text.
        """
        n = len(forced)
        cut = n  # bytes of `forced` that are safe to commit
        for j in range(min(n, self._max_len - 1), 0, -1):  # longest suffix first: it cuts deepest
            suffix = forced[n - j :]
            if any(self.merges(forced, tokens, p) and continues(p) for p in self.extensions(suffix)):
                cut = n - j
                break
        if cut == n:
            return len(tokens)
        keep, pos = 0, 0
        tb = self.info.token_bytes
        for t in tokens:
            pos += len(tb[t] or b"")
            if pos > cut:
                break
            keep += 1
        return keep


def forced_boundary(info: TokenizerInfo) -> ForcedBoundary:
    """The ``ForcedBoundary`` of ``info`` (built once per tokenizer)."""
    return info.cached("forced_boundary", lambda: ForcedBoundary(info))
