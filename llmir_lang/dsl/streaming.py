"""Streaming a state's text as it is produced: ``text_iter`` and ``text_async_iter``.

A ``StreamLog`` is an append-only list of ``(variable names, text)`` events plus a condition
variable. The state writes events in text order (constant text when every piece before it is
known, gen text as the engine streams it); readers block on the condition (``text_iter``) or
await a future of their event loop that the writer resolves (``call_soon_threadsafe``) with the
next event (``text_async_iter``), so the loop never blocks. ``close`` ends every reader.

``aiter`` used to poll every 20 ms: each chunk came up to 20 ms late (a token-by-token stream was
delivered in 20 ms bursts), and every idle stream woke its loop 50 times a second (200 streams
waiting on slow requests took about 10% of a core doing nothing).
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
        # async readers waiting for the next event: (their loop, a future of it to resolve)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def emit(self, names: tuple[str, ...], text: str) -> None:
        if not text:
            return
        with self._cond:
            self._events.append((names, text))
            self._cond.notify_all()
            self._wake_async()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._wake_async()

    def _wake_async(self) -> None:
        """Under ``_cond``: resolve every waiting async reader's future, on its own loop."""
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that loop is closed: nobody reads there any more
                pass

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

    async def aiter(self, var: str | None = None) -> AsyncIterator[str]:
        """``iter`` for ``async for``: between events it awaits a future the writer resolves, so
        the event loop keeps running and a chunk is read as soon as it is written."""
        loop = asyncio.get_running_loop()
        seen = 0
        while True:
            waiter: asyncio.Future[None] | None = None
            with self._cond:
                events, closed = self._events[seen:], self._closed
                if not events and not closed:
                    waiter = loop.create_future()
                    self._waiters.append((loop, waiter))
            seen += len(events)
            for names, text in events:
                if var is None or var in names:
                    yield text
            if closed and not events:
                return
            if waiter is not None:
                try:
                    await waiter
                finally:  # cancelled: stop waiting (a resolved waiter was taken off already)
                    with self._cond:
                        if (loop, waiter) in self._waiters:
                            self._waiters.remove((loop, waiter))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
