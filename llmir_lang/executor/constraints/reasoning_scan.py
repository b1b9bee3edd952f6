"""Where a reasoning model's output stands, read byte by byte: the part of ``reasoning_gate``
that knows the tags and the split, and nothing of matchers.

The phases follow ``ir.reasoning.split_reasoning`` (SGLang's split), so that the text the gate
hands to the constraint is exactly the answer the split gives:

- ``PRE`` (a format whose model writes its own start tag, ``qwen3``): the output so far is
  whitespace and the beginning of the start tag. Once it is something else, the output will have
  no start tag up front, the split takes the whole output, untouched, as the answer, and so the
  constraint covers all of it (``INNER``, the answer being the whole text so far).
- ``THINK``: inside the reasoning; tokens run free until the text holds the end tag.
- ``WS``: the end tag was seen; whitespace after it is skipped (the split strips the answer).
- ``INNER``: the answer has begun; every byte goes to the constraint.

Whitespace is what ``str.strip`` removes among ASCII characters (``WHITESPACE``); a tag counts as
written when its bytes are in the output, whatever tokens spell them (the bundled model has no
``</think>`` token: ``<``, ``/``, ``th``, ``in``, ``k``, ``>``), so a tag may span tokens and one
token may hold the end of the tag and the beginning of the answer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from llmir_lang.executor.constraints.tokenizer_info import TokenizerInfo

PRE, THINK, WS, INNER = range(4)
PHASE_NAMES = ("before the start tag", "inside the reasoning", "after the end tag", "in the answer")

# the ASCII characters str.strip() removes (bytes.strip() knows only the first six)
WHITESPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


class Step(NamedTuple):
    """Where the output stands after some bytes: ``phase``; ``buf`` (PRE: the text so far;
    THINK: its end that may begin the end tag); ``answer``: the bytes the constraint must take
    (INNER only); ``whole``: the answer is the whole output (PRE became INNER)."""

    phase: int
    buf: bytes
    answer: bytes = b""
    whole: bool = False


def partial_tag(text: bytes, tag: bytes) -> bytes:
    """The longest end of ``text`` that begins ``tag`` (never all of it)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return tag[:k]
    return b""


def scan(start: bytes, end: bytes, phase: int, buf: bytes, data: bytes) -> Step:
    """The phase after ``data`` is appended to an output in ``phase`` / ``buf``."""
    if phase == INNER:
        return Step(INNER, b"", data)
    if phase == PRE:
        text = buf + data
        rest = text.lstrip(WHITESPACE)
        if len(rest) < len(start) and start.startswith(rest):
            return Step(PRE, text)
        if not rest.startswith(start):
            return Step(INNER, b"", text, whole=True)
        phase, buf, data = THINK, b"", rest[len(start) :]
    if phase == THINK:
        window = buf + data
        j = window.find(end)
        if j < 0:
            return Step(THINK, partial_tag(window, end))
        data = window[j + len(end) :]
    rest = data.lstrip(WHITESPACE)
    return Step(INNER, b"", rest) if rest else Step(WS, b"")


class VocabTables:
    """Token sets of one tokenizer for one pair of tags, read once (``TokenizerInfo.cached``).

    ``by_first[b]``: ids of the tokens whose first byte is ``b``; ``holds_end``: tokens that hold
    the whole end tag; ``pre_start``: tokens that, after whitespace only, keep the output a
    candidate for the start tag (whitespace and the beginning of it, or all of it and more);
    ``first_ws`` / ``pure_ws``: boolean rows of tokens that begin with / are only whitespace."""

    def __init__(self, info: TokenizerInfo, start: bytes, end: bytes) -> None:
        by_first: dict[int, list[int]] = {}
        holds_end: list[int] = []
        pre_start: list[int] = []
        self.first_ws = np.zeros(info.vocab_size, dtype=bool)
        self.pure_ws = np.zeros(info.vocab_size, dtype=bool)
        for i, b in enumerate(info.token_bytes):
            if not b:
                continue
            by_first.setdefault(b[0], []).append(i)
            if end in b:
                holds_end.append(i)
            rest = b.lstrip(WHITESPACE)
            if len(rest) < len(b):
                self.first_ws[i] = True
                self.pure_ws[i] = not rest
            if start.startswith(rest) or rest.startswith(start):
                pre_start.append(i)
        self.by_first = {k: np.asarray(v, dtype=np.int64) for k, v in by_first.items()}
        self.holds_end = np.asarray(holds_end, dtype=np.int64)
        self.pre_start = np.asarray(pre_start, dtype=np.int64)

    @staticmethod
    def of(info: TokenizerInfo, start: bytes, end: bytes) -> VocabTables:
        key = f"reasoning-gate:{start!r}:{end!r}"
        return info.cached(key, lambda: VocabTables(info, start, end))

    def starting(self, byte: int) -> np.ndarray:
        return self.by_first.get(byte, np.zeros(0, dtype=np.int64))


def end_candidates(tables: VocabTables, end: bytes, tail: bytes) -> np.ndarray:
    """Ids of the tokens that may complete the end tag after an output ending in ``tail`` (a
    beginning of the tag): those holding all of it, and those beginning with what an end of
    ``tail`` leaves of it. A superset: ``scan`` decides."""
    parts = [tables.holds_end]
    for k in range(1, len(tail) + 1):
        if tail.endswith(end[:k]):
            parts.append(tables.starting(end[k]))
    return np.unique(np.concatenate(parts))


def pre_candidates(tables: VocabTables, start: bytes, pre: bytes) -> np.ndarray:
    """Ids of the tokens that may keep an output ``pre`` (PRE) on its way to the start tag."""
    begun = pre.lstrip(WHITESPACE)
    if not begun:
        return tables.pre_start
    return tables.starting(start[len(begun)])
