"""The FastAPI application: routes, error handlers, the API-key and body-size guard, lifespan.

``create_app(config, engine=None)`` builds the app. With ``engine=None`` the engine is loaded at
startup (and shut down at exit); ``llmir serve`` loads it first instead, so that a bad checkpoint
fails before the port opens. Graceful shutdown is uvicorn's: on SIGTERM/SIGINT it stops
accepting connections, lets in-flight requests (streams included) finish for up to
``shutdown_timeout_s``, then the lifespan exit shuts the engine down.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmir_lang import __version__
from llmir_lang.server import program, routes_native, routes_openai
from llmir_lang.server.config import ServerConfig
from llmir_lang.server.errors import error_body, error_headers, install_error_handlers, log
from llmir_lang.server.service import EngineService

# Paths that answer without an API key (load balancers probe them).
OPEN_PATHS = frozenset({"/health"})
# A body declared larger than the limit is read and dropped up to this much, so the client, which
# sends its whole body before it reads the answer, gets the 413 instead of a broken pipe.
_DRAIN_CAP = 64 * 2**20


class GuardMiddleware:
    """Checks the API key, then reads the body whole, refusing it (413) past ``max_bytes``.

    Reading the body here (requests are JSON, small) bounds memory per request before any parsing,
    whatever the client declares; the route then gets the buffered body, and later ``receive``
    calls go to the server, so disconnects are still seen.

    Every body is JSON, whatever its ``Content-Type`` says: ``curl -d '{...}'`` sends
    ``application/x-www-form-urlencoded``, so a body declared as anything but JSON is handed on
    declared as JSON (malformed JSON is then a 400 that says so).
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope.get("path") not in OPEN_PATHS and not self._authorized(headers):
            await _reply(
                send,
                401,
                "missing or wrong API key; send 'Authorization: Bearer <key>'",
                "authentication_error",
                "invalid_api_key",
            )
            return
        declared = headers.get(b"content-length")
        too_big = f"the request body is larger than this server's limit of {self.max_bytes} bytes; send less"
        try:
            declared_n = int(declared) if declared is not None else 0
        except ValueError:
            await _reply(send, 400, "the Content-Length header is not a number")
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes or declared_n > self.max_bytes:
                await _drain(receive, more, len(body))
                await _reply(send, 413, too_big, "request_too_large")
                return
        if body and not _declares_json(headers.get(b"content-type")):
            scope = {
                **scope,
                "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                + [(b"content-type", b"application/json")],
            }
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked)
        except Exception as exc:
            # a bug, not bad input (those are typed errors, answered inside): answered here, not
            # re-raised, so the server keeps the client's connection (Starlette's handler for
            # Exception answers and re-raises, and uvicorn then drops the keep-alive connection:
            # the client's next request on it failed with a reset). Mid-stream nothing can be sent.
            if started:
                raise
            log.exception("unexpected error while serving a request")
            await _reply(send, 500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self.api_key is not None
        key = self.api_key.encode()
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), key):
            return True
        return hmac.compare_digest(headers.get(b"x-api-key", b""), key)


def _declares_json(content_type: bytes | None) -> bool:
    if not content_type:
        return False
    kind = content_type.split(b";", 1)[0].strip().lower()
    return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))


async def _drain(receive: Receive, more: bool, seen: int) -> None:
    while more and seen < _DRAIN_CAP:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        seen += len(message.get("body", b""))
        more = message.get("more_body", False)


async def _reply(
    send: Send, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
) -> None:
    payload = json.dumps(error_body(message, kind, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *((k.encode(), v.encode()) for k, v in error_headers(status).items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def create_app(
    config: ServerConfig | None = None, engine: Any = None, *, owns_engine: bool = False
) -> FastAPI:
    """The server app. ``engine``: an ``Engine`` to serve, shut down at exit only if
    ``owns_engine``; None: load ``config.model`` at startup and shut it down at exit."""
    config = config or ServerConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is None:
            import asyncio

            loaded = await asyncio.to_thread(load_engine, config)
            app.state.service = EngineService(loaded, config, owns_engine=True)
        else:
            app.state.service = EngineService(engine, config, owns_engine=owns_engine)
        try:
            yield
        finally:
            app.state.service.close()

    app = FastAPI(title="llmir server", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    install_error_handlers(app)
    app.include_router(routes_native.router)
    app.include_router(routes_openai.router)
    app.include_router(program.router)
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_bytes=config.max_request_bytes)
    return app


def load_engine(config: ServerConfig) -> Any:
    """The engine ``config`` describes (the bundled model when ``config.model`` is None)."""
    from llmir_lang.executor.engine import Engine

    return Engine(
        config.model,
        device=config.device,
        kv_memory=config.kv_memory,
        max_running_requests=config.max_running_requests,
    )
