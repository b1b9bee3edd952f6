"""Streaming a state's text as it is produced: ``text_iter`` and ``text_async_iter``.

A ``StreamLog`` is an append-only list of ``(variable names, text)`` events plus a condition
variable. The state writes events in text order (constant text when every piece before it is
known, gen text as the engine streams it); readers block on the condition (``text_iter``) or
await a future of their event loop that the writer resolves (``call_soon_threadsafe``) with the
next event (``text_async_iter``), so the loop never blocks. ``close`` ends every reader.

``AsyncStream`` is what ``text_async_iter`` returns: a task reading it that is cancelled stops the
program, wherever the cancel lands (in the wait for a chunk, or in the ``async for`` body: a web
handler cancelled while it writes a chunk to a client that went away), as the iterator it drops
tells. A reader that stops for any other reason (``break``, an exception, one ``anext``) leaves
the program running: its state stays readable, and ``state.cancel()`` stops it.

``aiter`` used to poll every 20 ms: each chunk came up to 20 ms late (a token-by-token stream was
delivered in 20 ms bursts), and every idle stream woke its loop 50 times a second (200 streams
waiting on slow requests took about 10% of a core doing nothing).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator


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


class AsyncStream:
    """An async iterator over ``chunks`` that calls ``stop()`` (on the reader's event loop) when it
    is closed or dropped before its end while the task that last read it is cancelled (see the
    module docstring). Only a cancel of that task counts: ``break`` or ``anext`` once, then
    dropping the iterator, stops nothing."""

    __slots__ = ("_chunks", "_stop", "_reader", "_ended", "__weakref__")

    def __init__(self, chunks: AsyncGenerator[str, None], stop: Callable[[], None]) -> None:
        self._chunks = chunks
        self._stop = stop
        self._reader: weakref.ref[asyncio.Task[object]] | None = None
        self._ended = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str:
        task = asyncio.current_task()
        self._reader = weakref.ref(task) if task is not None else None
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            self._ended = True
            raise

    async def aclose(self) -> None:
        self._left()
        self._ended = True
        await self._chunks.aclose()

    def __del__(self) -> None:
        self._left()

    def _left(self) -> None:
        reader = self._reader() if self._reader is not None else None
        self._reader = None
        if reader is None or self._ended:
            return
        # a dropped iterator is unwound with the CancelledError that ends its reader, before a
        # timeout (asyncio.timeout, TaskGroup) takes the cancel back: ``cancelling()`` says so
        # now; else (Python 3.10, or an aclose() that runs later) the reader has ended cancelled
        cancelling = getattr(reader, "cancelling", None)
        now = bool(cancelling()) if cancelling is not None else False
        try:
            # NOTE: not here: a dropped iterator may be collected on any thread, one that holds
            # the locks ``stop`` takes among them
            reader.get_loop().call_soon_threadsafe(_stop_if_cancelled, reader, now, self._stop)
        except RuntimeError:  # its loop is closed: the program stops at its next segment
            pass


def _stop_if_cancelled(reader: asyncio.Task[object], cancelling: bool, stop: Callable[[], None]) -> None:
    if cancelling or (reader.done() and reader.cancelled()):
        stop()
