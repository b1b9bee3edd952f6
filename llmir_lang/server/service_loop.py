"""The server's ``EngineService`` for plain Python callers: SGLang's offline ``Engine`` runs the
``/generate`` route's code (``offline_engine.py``) through a ``ServiceLoop``.

The service is loop-bound (it awaits the engine's futures, aborts on cancellation), so it lives
on an asyncio loop of its own, on a daemon thread; ``call`` waits for a coroutine there from any
thread, ``acall`` from another event loop. What the route would answer with an HTTP error comes out
as the library's typed error (``typed_error``). ``close`` shuts the service down (what still runs
is aborted, and its callers get ``EngineClosedError``) and stops the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import CancelledError, Future
from typing import Any

from llmir_lang.dsl.errors import FeatureNotSupportedError
from llmir_lang.errors import EngineClosedError, EngineError, InvalidRequestError

CLOSED = "the Engine was shut down; create a new one"


class ServiceLoop:
    """An ``EngineService`` over ``engine`` on a loop thread of its own. ``owns_engine``: its
    ``close`` shuts the engine down too."""

    def __init__(self, engine: Any, owns_engine: bool) -> None:
        from llmir_lang.server.config import ServerConfig
        from llmir_lang.server.service import EngineService

        self.service = EngineService(engine, ServerConfig(), owns_engine=owns_engine)
        self.closed = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="llmir-sglang-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # stopped (close): end what is left, so that no caller waits for it forever
        left = asyncio.all_tasks(self.loop)
        for task in left:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future:
        """``coro`` started on the loop; cancelling the future cancels its task (which aborts the
        engine requests it waits for)."""
        self.check_open(coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """``coro``'s result, waited for on this thread; an interrupt (Ctrl-C) cancels it."""
        fut = self.submit(coro)
        try:
            return fut.result()
        except Exception as e:
            raise typed_error(e) from None
        except BaseException:
            fut.cancel()
            raise

    async def acall(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """``coro``'s result, awaited from another event loop; cancelling the awaiting task
        cancels it."""
        fut = self.submit(coro)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if self.closed and fut.cancelled():  # the close cancelled it, not the caller
                raise EngineClosedError(CLOSED) from None
            raise
        except Exception as e:
            raise typed_error(e) from None

    def check_open(self, coro: Any = None) -> None:
        if self.closed:
            if coro is not None:
                coro.close()  # (never awaited: no warning)
            raise EngineClosedError(CLOSED)

    def close(self) -> None:
        """Shut the service down on its loop (it aborts what runs), then stop the loop.
        Idempotent."""
        if self.closed:
            return
        if self.loop.is_closed() or not self.thread.is_alive():
            self.closed = True
            self.service.close()
            return

        async def close_service() -> None:
            self.service.close()

        try:
            if threading.current_thread() is self.thread:
                # the finalizer of an Engine dropped in a reference cycle, run by a garbage
                # collection that happened on this loop: waiting for the loop would never end
                self.service.close()
            else:
                self.call(close_service())
        finally:
            self.closed = True
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:  # closed meanwhile
                return
            if threading.current_thread() is not self.thread:
                self.thread.join(30)


def typed_error(exc: BaseException) -> BaseException:
    """What a Python caller gets for the route's error: a typed library error as it is, an HTTP
    error as the library error of its status (``param`` kept: 400 ``InvalidRequestError``, 501
    ``FeatureNotSupportedError``, 503 ``EngineClosedError``), a call cancelled by ``close`` as
    ``EngineClosedError``."""
    from llmir_lang.server.errors import ServerHTTPError

    if isinstance(exc, CancelledError):
        return EngineClosedError(CLOSED)
    if not isinstance(exc, ServerHTTPError):
        return exc
    message = exc.message.replace("this server", "this engine")
    if exc.status == 400:
        return named(InvalidRequestError(message), exc.param)
    if exc.status == 501:
        return named(FeatureNotSupportedError(message), exc.param)
    if exc.status == 503:  # (the server's words for it are about servers)
        return EngineClosedError("the Engine was shut down before the request finished; create a new one")
    return named(EngineError(message), exc.param)


def named(exc: BaseException, param: str | None) -> BaseException:
    """``exc`` naming ``param`` as the argument at fault (as the server's errors do)."""
    exc.param = param  # type: ignore[attr-defined]
    return exc
