"""Prefill bookkeeping: which prefixes are already in the backend's cache, and when a shared
prefix is worth a prefill request of its own."""

from __future__ import annotations

import threading

# A prefill is a request of its own; for a prefix this much longer than what an enclosing prefill
# already covers, computing it once beats computing it in every user side by side.
MIN_PREFILL_CHARS = 32


class PrefillMemory:
    """Texts recently put in the backend's cache (prefills, and the full text of every finished
    request), shared by the rounds of one run, so that a prefix already cached is not prefilled
    again. Bounded; a hint only."""

    def __init__(self, size: int = 256) -> None:
        self._texts: list[str] = []
        self._size = size
        self._lock = threading.Lock()

    def add(self, text: str) -> None:
        with self._lock:
            self._texts.append(text)
            del self._texts[: -self._size]

    def covered(self, text: str) -> int:
        """The length of the longest remembered prefix of ``text`` (0 if none)."""
        with self._lock:
            return max((len(t) for t in self._texts if text.startswith(t)), default=0)
