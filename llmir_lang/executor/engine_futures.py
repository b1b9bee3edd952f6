"""What a submission hands back: a request's future, and the iterator of its chunks that
``Engine.generate(stream=True)`` returns. Both refuse a blocking wait on the engine thread, and
both abort their request once nobody wants its result."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED
from typing import TYPE_CHECKING, Any

from llmir_lang.errors import EngineError
from llmir_lang.executor.engine_loop import STOPPED_MESSAGE, engine_thread_error
from llmir_lang.executor.request import StreamChunk

if TYPE_CHECKING:
    from llmir_lang.executor.engine import Engine


class _RequestFuture(Future):
    """A request's future. Waiting on it from the engine thread (in a stream callback) raises
    EngineError instead of deadlocking the engine: that thread is the one that resolves it.
    A wait with ``timeout=0`` only polls, and is allowed anywhere.

    ``cancel()`` (any thread; also what ``asyncio.wrap_future`` does when the awaiting task is
    cancelled) aborts the request, which would otherwise run on to ``max_new_tokens`` for nobody.
    A cancel that lands between the engine's ``done()`` check and its ``set_result`` is not an
    error: the engine thread raised ``InvalidStateError`` there, which failed the request and, with
    deferred text work (CUDA), the other requests of its step."""

    def __init__(self, engine_thread: threading.Thread, abort: Any = None):
        super().__init__()
        self._engine_thread = engine_thread
        self._abort = abort  # called with no argument once the future is cancelled

    def cancel(self) -> bool:
        if not super().cancel():  # (runs the done callbacks: not under the lock below)
            return False
        with self._condition:  # a second cancel() must not notify again (that raises)
            first = self._state == CANCELLED
            if first:
                # NOTE: what an executor does when it drops a cancelled item: without it
                # ``concurrent.futures.wait`` / ``as_completed`` never count the future as done
                # (they wait for CANCELLED_AND_NOTIFIED) and a batch waiting on them hung
                self.set_running_or_notify_cancel()
        if first and self._abort is not None:
            self._abort()
        return True

    def set_result(self, result: Any) -> None:
        try:
            super().set_result(result)
        except InvalidStateError:
            if not self.cancelled():
                raise  # resolved twice: an engine bug
            # cancelled by another thread since the engine checked done(): nobody wants it

    def set_exception(self, exception: BaseException | None) -> None:
        try:
            super().set_exception(exception)
        except InvalidStateError:
            if not self.cancelled():
                raise

    def result(self, timeout: float | None = None) -> Any:
        self._check_thread(timeout, "Future.result()")
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._check_thread(timeout, "Future.exception()")
        return super().exception(timeout)

    def _check_thread(self, timeout: float | None, what: str) -> None:
        if (timeout is None or timeout > 0) and not self.done():
            if threading.current_thread() is self._engine_thread:
                raise engine_thread_error(what)


class _ChunkStream(Iterator[StreamChunk]):
    """What ``generate(stream=True)`` returns: the request's StreamChunks as they come.

    It ends like the request's future: after a final chunk whose future holds an exception (the
    engine failed the request, or was shut down) it raises that exception, as ``generate`` without
    streaming does, instead of ending quietly with finish_reason "error" or "abort". Closing it
    (``close()``, leaving a ``with`` block) before the final chunk, or dropping it, aborts the
    request, which otherwise would run on to ``max_new_tokens`` for nobody."""

    def __init__(self, engine: Engine, fut: Future, chunks: queue.Queue[StreamChunk]):
        self._engine = engine
        self._fut = fut
        self._chunks = chunks
        self._done = False
        self.rid: int = fut.rid  # type: ignore[attr-defined]

    def __iter__(self) -> _ChunkStream:
        return self

    def __next__(self) -> StreamChunk:
        if self._done:
            raise StopIteration
        eng = self._engine
        on_engine_thread = threading.current_thread() is eng._thread
        while True:
            try:
                chunk = self._chunks.get_nowait() if on_engine_thread else self._chunks.get(timeout=0.5)
                break
            except queue.Empty:
                pass
            if self._fut.done():
                if not self._chunks.empty():  # its final chunk is queued before the future resolves
                    continue
                self._done = True  # resolved without a final chunk: it raises or ends here
                eng._wait(self._fut)
                raise StopIteration from None
            if on_engine_thread:
                raise engine_thread_error("iterating a generate(stream=True) iterator")
            if not eng._thread.is_alive():
                self._done = True
                raise EngineError(STOPPED_MESSAGE)
        if chunk.finished:
            self._done = True
            eng._wait(self._fut)  # resolved right after its final chunk: raises what the request raised
        return chunk

    def close(self) -> None:
        """Stop reading; a request still running is aborted."""
        if not self._done:
            self._done = True
            self._engine._abort_soon(self.rid)

    def __enter__(self) -> _ChunkStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class EngineCall:
    """An item of ``Engine.call_in_engine_thread``: ``fn`` to run on the engine thread between
    steps, and the future its caller waits on. One still queued when the loop stops is failed with
    EngineClosedError at once (``EngineLoop._abort_all``): dropped, its caller waited for the
    dead-thread check and got a plain EngineError about a second later."""

    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.future: Future = Future()

    def __call__(self) -> None:
        try:
            self.future.set_result(self.fn())
        except Exception as e:
            self.future.set_exception(e)

    def fail(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
