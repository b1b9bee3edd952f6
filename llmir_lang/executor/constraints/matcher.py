"""The per-request matcher protocol, and batch-wide mask filling and application.

Bitmask layout (same as ``kernels/reference.py apply_token_bitmask``): int32 ``[B, ceil(V/32)]``,
token ``v`` of row ``b`` is allowed iff bit ``v % 32`` of ``bitmask[b, v // 32]`` is set.

Matcher invariants:

- ``fill_bitmask`` writes the full row (every word), so rows never need clearing between steps.
- a token whose bit is set is accepted by ``advance``; EOS bits are set exactly in accepting
  states, and ``advance(eos)`` there terminates the matcher. ``advance`` may also accept a token
  whose bit is clear: inside forced text llguidance masks all but the canonical spelling, yet
  ``advance`` takes any spelling of the same bytes (needed when the engine retokenizes).
- ``advance`` returning False leaves the state unchanged.
- ``rollback(n)`` undoes the last ``n`` successful ``advance`` calls, EOS included.
- once ``error()`` is set the row's bits mean nothing (llguidance sets the EOS bit when stuck);
  the engine ends that request with ``CONSTRAINT_ERROR_FINISH_REASON``.
- a step that passes a bound on the engine's work (llguidance's parser limits, forced text that
  never ends) sets ``error()`` too, in bounded time; ``over_budget()`` names the bound.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from llmir_lang.errors import ConstraintError


class Matcher(ABC):
    """State of one request under one compiled constraint (see module invariants)."""

    engine: str
    eos_token_ids: tuple[int, ...]
    vocab_size: int

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bits of the current state into ``bitmask[row]``."""

    @abstractmethod
    def advance(self, token_id: int) -> bool:
        """Consume one token; False (state unchanged) if the constraint does not allow it."""

    @abstractmethod
    def is_accepting(self) -> bool:
        """True if the text so far is a complete match (EOS would be allowed)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once EOS was consumed, or when no token other than EOS is possible."""

    @abstractmethod
    def forced_tokens(self) -> list[int]:
        """Tokens the constraint forces from here (jump-forward); [] if none.

        They spell a prefix of ``forced_text()``: a trailing token that could merge with the text
        after it is held back, so the list may be shorter than the forced text.
        """

    @abstractmethod
    def forced_text(self) -> str:
        """The text every continuation from here starts with (complete UTF-8 characters only)."""

    @abstractmethod
    def rollback(self, n: int) -> None:
        """Undo the last ``n`` successful advances."""

    @abstractmethod
    def error(self) -> str | None:
        """Why the matcher dead-ended (no token possible, not accepting), else None.

        The engine ends only that request, with ``finish_reason="constraint_error"``.
        """

    def note_dead_end(self) -> None:
        """Called by ``fill_batch_bitmask`` when the row came out empty while not accepting;
        afterwards ``error()`` must return a message (until a rollback)."""
        raise NotImplementedError

    def over_budget(self) -> str | None:
        """The bound on the engine's work (``ConstraintTooExpensiveError.limit``) that the
        matcher's last step passed, else None; ``error()`` then says so."""
        return None

    def _check_rollback(self, n: int, available: int) -> None:
        if n < 0 or n > available:
            raise ConstraintError(
                f"cannot roll back {n} tokens: only {available} were consumed by this matcher"
            )

    def _pop_history(self, history: list, n: int) -> list:
        """The last ``n`` entries of a per-advance ``history``, removed (checked as ``rollback``
        takes ``n``); ``[]`` for 0."""
        self._check_rollback(n, len(history))
        if n == 0:
            return []
        undone = history[-n:]
        del history[-n:]
        return undone


def complete_utf8_prefix(data: bytes) -> str:
    """Decode, dropping an incomplete trailing UTF-8 sequence (forced text is whole characters)."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="ignore")


def word_bit(i: int) -> int:
    """Bit ``i`` (0..31) of an int32 bitmask word as a Python int (bit 31 is the sign bit)."""
    return (1 << i) - (1 << 32 if i == 31 else 0)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """An int32 CPU bitmask ``[batch_size, ceil(vocab_size/32)]`` with every token allowed."""
    return torch.full((batch_size, bitmask_words(vocab_size)), -1, dtype=torch.int32)


_executor_lock = threading.Lock()
_executor = None


def _llg_executor():
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor()
        return _executor


def fill_batch_bitmask(matchers: Sequence[Matcher | None], bitmask: torch.Tensor) -> list[int]:
    """Fill row ``i`` of ``bitmask`` from ``matchers[i]``; rows of ``None`` get all ones.

    llguidance rows are computed in one call (parallel across its worker threads); the others
    row by row. Returns the rows whose matcher dead-ended (no token allowed and not accepting);
    those matchers now report ``error()``.
    """
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
        raise ConstraintError("the bitmask must be a contiguous int32 CPU tensor (see allocate_bitmask)")
    if bitmask.dim() != 2 or bitmask.shape[0] < len(matchers):
        raise ConstraintError(
            f"bitmask of shape {tuple(bitmask.shape)} has fewer rows than the {len(matchers)} matchers"
        )
    llg_type = _llg_matcher_type()
    words = bitmask.shape[1]
    rows_np = bitmask.numpy()  # a view; numpy calls cost a few us where torch calls cost ~10 us
    llg_rows: list[tuple[object, int]] = []
    checked: list[tuple[int, Matcher]] = []
    for row, m in enumerate(matchers):
        if m is None:
            rows_np[row] = -1
            continue
        fill_row = getattr(m, "fill_numpy_row", None)
        inner = m.batch_delegate() if hasattr(m, "batch_delegate") else m  # a reasoning gate's answer
        if type(inner) is llg_type and inner.can_fill_in_batch(bitmask):
            llg_rows.append((inner.native, row))
        elif fill_row is not None and words >= bitmask_words(m.vocab_size):
            fill_row(rows_np[row])
        else:
            m.fill_bitmask(bitmask, row)
        checked.append((row, m))
    if llg_rows:
        _llg_executor().unsafe_compute_mask_ptr(llg_rows, bitmask.data_ptr(), words * 4, bitmask.shape[0])
    if not checked:
        return []
    nonempty = rows_np[[r for r, _ in checked]].any(axis=1).tolist()
    dead: list[int] = []
    for (row, m), any_set in zip(checked, nonempty):
        if not any_set and not m.is_accepting():
            m.note_dead_end()
        if m.error() is not None:
            dead.append(row)
    return dead


_LLG_TYPE: list[type] = []


def _llg_matcher_type() -> type:
    # imported late (llguidance_backend imports this module), then kept: this runs every step
    if not _LLG_TYPE:
        from llmir_lang.executor.constraints.llguidance_backend import LLGuidanceMatcher

        _LLG_TYPE.append(LLGuidanceMatcher)
    return _LLG_TYPE[0]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: ``logits[b, v] = -inf`` where the bit of token ``v`` in row ``b`` is clear.

    One masked_fill over the whole batch (columns beyond ``32 * bitmask.shape[1]`` are masked
    too). On the CPU the bits are unpacked by numpy (``unpackbits`` over the little-endian bytes
    puts bit ``v`` at position ``v``), about 4x cheaper than the torch ops a step used to spend;
    elsewhere the bitmask moves to the logits' device and is unpacked by word shifts.
    """
    b, vocab = logits.shape
    words = bitmask.shape[1]
    if bitmask.shape[0] != b:
        raise ConstraintError(f"bitmask has {bitmask.shape[0]} rows but logits have {b}")
    if logits.device.type == "cpu" and bitmask.device.type == "cpu" and bitmask.dtype == torch.int32:
        bits = np.unpackbits(np.ascontiguousarray(bitmask.numpy()).view(np.uint8), axis=1, bitorder="little")
        blocked = torch.from_numpy(bits == 0)
    else:
        mask = bitmask.to(logits.device, non_blocking=True)
        shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
        blocked = ((mask.unsqueeze(-1) >> shifts) & 1).eq(0).view(b, words * 32)
    if words * 32 >= vocab:
        logits.masked_fill_(blocked[:, :vocab], float("-inf"))
    else:
        logits[:, words * 32 :] = float("-inf")
        logits[:, : words * 32].masked_fill_(blocked, float("-inf"))
