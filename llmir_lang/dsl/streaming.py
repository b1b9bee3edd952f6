"""Streaming a state's text as it is produced: ``text_iter`` and ``text_async_iter``.

A ``StreamLog`` is an append-only list of ``(variable names, text)`` events plus a condition
variable. The state writes events in text order (constant text when every piece before it is
known, gen text as the engine streams it); readers block on the condition (``text_iter``) or poll
it from an event loop without blocking the loop (``text_async_iter``). ``close`` ends every reader.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator


class StreamLog:
    """Events of one state, in text order; thread-safe."""

    def __init__(self) -> None:
        # (the variables the text belongs to: its gen / select and the var_scopes around it, text)
        self._events: list[tuple[tuple[str, ...], str]] = []
        self._closed = False
        self._cond = threading.Condition()

    def emit(self, names: tuple[str, ...], text: str) -> None:
        if not text:
            return
        with self._cond:
            self._events.append((names, text))
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def _wait(self, start: int, timeout: float | None) -> tuple[list[tuple[tuple[str, ...], str]], bool]:
        with self._cond:
            if len(self._events) <= start and not self._closed:
                self._cond.wait(timeout)
            return self._events[start:], self._closed

    def iter(self, var: str | None = None) -> Iterator[str]:
        """Yield text as it arrives until the log is closed; ``var`` keeps one variable's text."""
        seen = 0
        while True:
            events, closed = self._wait(seen, None)
            seen += len(events)
            for names, text in events:
                if var is None or var in names:
                    yield text
            if closed and not events:
                return

    async def aiter(self, var: str | None = None, poll: float = 0.02) -> AsyncIterator[str]:
        """``iter`` for ``async for``: waits in short slices so the event loop keeps running."""
        seen = 0
        while True:
            events, closed = self._wait(seen, 0)
            seen += len(events)
            for names, text in events:
                if var is None or var in names:
                    yield text
            if closed and not events:
                return
            if not events:
                await asyncio.sleep(poll)
