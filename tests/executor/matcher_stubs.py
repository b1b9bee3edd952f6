"""A constraint stub for tests of a request whose own processing fails
(``test_request_isolation.py``, ``test_engine_counters.py``)."""

from __future__ import annotations

import torch

from llmir_lang.executor.constraints.matcher import Matcher


class BrokenMatcher(Matcher):
    """Allows every token until ``after`` tokens were advanced; then the hook named ``where``
    raises, as a constraint implementation with a bug would."""

    engine = "test"
    eos_token_ids = ()

    def __init__(self, vocab_size: int, where: str, after: int = 0):
        self.vocab_size, self.where, self.after, self.n = vocab_size, where, after, 0

    def _maybe_raise(self, hook: str) -> None:
        if self.where == hook and self.n >= self.after:
            raise RuntimeError(f"matcher bug in {hook}")

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._maybe_raise("fill")
        bitmask[row] = -1

    def advance(self, token_id: int) -> bool:
        self._maybe_raise("advance")
        self.n += 1
        return True

    def is_accepting(self) -> bool:
        return True

    def is_terminated(self) -> bool:
        return False

    def forced_tokens(self) -> list[int]:
        return []

    def forced_text(self) -> str:
        return ""

    def rollback(self, n: int) -> None:
        self.n -= n

    def error(self) -> str | None:
        return None
