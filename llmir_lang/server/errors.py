"""HTTP errors of the server: one JSON shape for every failure, and the handlers that produce it.

Every error response is ``{"error": {"message": str, "type": str, "param": str | None, "code":
str | None}}`` (the OpenAI shape, which SGLang clients read too; ``param`` names the request field
at fault where one is; ``code`` is OpenAI's string where one applies, ``model_not_found``,
``context_length_exceeded``, ``invalid_api_key``, else null, never the HTTP status, which is the
response's). The message says what was wrong and what to send instead. Errors that the
same request would get again (every 4xx but 408 / 409 / 429, and 501) carry
``x-should-retry: false``, which the official OpenAI clients obey instead of retrying them (they
retry every 5xx by default).
Typed library errors map to status codes here, so routes just raise them:

- bad input (``InvalidRequestError``, ``ConstraintError``, IR parse / verify errors, unknown or
  mistyped fields, malformed JSON): 400
- a feature this server does not implement (``NotYetSupportedError``, ``not_implemented``): 501
- the server is shutting down, or shut down before the request finished: 503
- the client went away before its answer (``ClientDisconnectedError``): 499, never read
- anything else: 500 (logged; the server keeps serving)

A 400 raised as a library error also names its class in the ``x-llmir-error`` header, which the
remote backends turn back into that class.

``param``: a ``ServerHTTPError`` is given its field where the route raises it; a library error
(``InvalidRequestError``, ``ConstraintError``, ``IRError``, raised by the engine, the constraint
compiler or the IR parser, which know nothing of the request) gets the request field it came from
where the route hands that field's value on (``with_param`` / ``blame``). The name is the field
as the client sent it, a nested one as a dotted path as for the validation errors
(``sampling_params.temperature``, ``messages.0.content``); of two fields that conflict, the second
one the message names. An error that is not about one field keeps ``param`` null.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from llmir_lang.errors import (
    ConstraintError,
    EngineClosedError,
    InvalidRequestError,
    IRError,
    LLMIRError,
    NotYetSupportedError,
    OutOfKVMemoryError,
    PromptTooLongError,
)

log = logging.getLogger("llmir.server")


class ServerHTTPError(LLMIRError):
    """An error with its HTTP status; raised by routes and middleware."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code


class ClientDisconnectedError(LLMIRError):
    """The client went away before its response was ready; its request was aborted."""


E = TypeVar("E", bound=BaseException)

# the library errors that are bad input (400) and may be pinned on one request field
INPUT_ERRORS: tuple[type[LLMIRError], ...] = (InvalidRequestError, ConstraintError, IRError)


def with_param(exc: E, param: str | None) -> E:
    """``exc`` naming ``param`` as the request field at fault (the ``param`` of its error body).
    A copy, not ``exc`` itself: the constraint compiler caches its errors and raises the same
    instance again, for requests that may name the field otherwise. An error that already names
    its field (or a ``param`` of None) is returned as it is."""
    if param is None or getattr(exc, "param", None) is not None:
        return exc
    try:
        named = copy.copy(exc)
    except Exception:  # an exception class that cannot be rebuilt from its args
        named = exc
    named.param = param  # type: ignore[attr-defined]
    return named


@contextmanager
def blame(param: str | None, *classes: type[BaseException]) -> Iterator[None]:
    """Errors of ``classes`` (default ``INPUT_ERRORS``) raised inside name ``param`` (see
    ``with_param``): wrap the call that hands one request field's value to library code."""
    caught = classes or INPUT_ERRORS
    try:
        yield
    except caught as e:
        named = with_param(e, param)
        if named is e:
            raise
        raise named.with_traceback(e.__traceback__) from e.__cause__


def not_implemented(feature: str, instead: str, param: str | None = None) -> ServerHTTPError:
    """The 501 for a well-formed request that asks for something this server does not do
    (``n > 1``, tools, images, ...); ``instead`` says what to send."""
    return ServerHTTPError(
        501, f"{feature} is not implemented by this server; {instead}", "not_implemented", param
    )


def shutting_down(detail: str = "") -> ServerHTTPError:
    """The 503 for a request the server cannot finish because it is stopping."""
    return ServerHTTPError(
        503,
        f"the server is shutting down{detail}; send the request again (to another server)",
        "server_shutting_down",
    )


# Statuses a client may rightly retry (OpenAI's clients retry these, and every 5xx, by default).
RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504})


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_headers(status: int) -> dict[str, str]:
    """``x-should-retry: false`` where sending the request again cannot succeed."""
    return {} if status in RETRYABLE else {"x-should-retry": "false"}


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, kind, param, code),
        status_code=status,
        headers={**error_headers(status), **(headers or {})},
    )


# The header naming the library error class behind a 400 (``EmptyPromptError``,
# ``InvalidRegexError``, ...), so that the remote backends raise the class the embedded engine
# raises for the same input (``llmir_lang.executor.remote``); the body keeps the OpenAI shape.
ERROR_CLASS_HEADER = "x-llmir-error"


def status_of(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error type) for a library exception."""
    if isinstance(exc, ServerHTTPError):
        return exc.status, exc.kind
    if isinstance(exc, ClientDisconnectedError):
        return 499, "client_closed_request"  # nobody reads it; keeps the logs honest
    if isinstance(exc, NotYetSupportedError):
        return 501, "not_implemented"
    if isinstance(exc, EngineClosedError):
        return 503, "server_shutting_down"
    # OutOfKVMemoryError here means the request alone is larger than the pool: retrying cannot help
    if isinstance(exc, (InvalidRequestError, ConstraintError, IRError, OutOfKVMemoryError)):
        return 400, "invalid_request_error"
    return 500, "internal_error"


def code_of(exc: BaseException) -> str | None:
    """OpenAI's ``code`` string for a library exception, or None (most errors have none)."""
    if isinstance(exc, ServerHTTPError):
        return exc.code
    if isinstance(exc, PromptTooLongError):
        return "context_length_exceeded"
    return None


def describe_validation(exc: RequestValidationError) -> str:
    """One readable line per problem: where in the body, what is wrong, what was sent."""
    # A union field (``str | list[str]``) reports one error per alternative, with the alternative's
    # name in ``loc``: keep field names only, one error per field, and drop an error on a field
    # when a more precise one exists inside it.
    errors: dict[str, dict[str, Any]] = {}
    for err in exc.errors():
        names = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_branch_name(x)]
        errors.setdefault(".".join(names) or "body", err)
    locs = list(errors)
    parts = []
    for loc, err in errors.items():
        if any(other.startswith(loc + ".") for other in locs) and err.get("type") != "extra_forbidden":
            continue
        kind = err.get("type", "")
        if kind == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(
                f"the body is not valid JSON ({ctx.get('error', 'parse error')}); send a JSON object "
                "(with curl: -H 'Content-Type: application/json' -d '{\"text\": ...}')"
            )
        elif kind == "extra_forbidden":
            parts.append(f"unknown field {loc!r}; remove it (see the API reference for the known fields)")
        elif loc == "body" and kind == "missing":
            parts.append("the request has no body; send a JSON object")
        elif loc == "body" and kind in ("model_attributes_type", "dict_type", "model_type"):
            parts.append(f"the body must be a JSON object, got {type(err.get('input')).__name__}")
        elif kind == "missing":
            parts.append(f"missing required field {loc!r}")
        else:
            got = err.get("input")
            shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
            parts.append(f"field {loc!r}: {err.get('msg', 'invalid value')} (got {shown})")
    return "invalid request: " + "; ".join(parts[:8]) + ("; ..." if len(parts) > 8 else "")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, describe_validation(exc), param=validation_param(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.url.path!r}; see the server README for the routes"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path!r}"
        elif exc.status_code == 400 and "parsing the body" in message:
            if isinstance(exc.__cause__, RecursionError):
                message = "the body's JSON is nested too deeply to read; send a flatter JSON object"
            else:
                message = "the body could not be read as JSON (is it UTF-8?); send a JSON object"
        headers = {**error_headers(exc.status_code), **(exc.headers or {})}
        return JSONResponse(error_body(message, "invalid_request_error"), exc.status_code, headers)

    @app.exception_handler(LLMIRError)
    async def _library(_: Request, exc: LLMIRError) -> JSONResponse:
        status, kind = status_of(exc)
        if status >= 500:
            log.warning("request failed: %s: %s", type(exc).__name__, exc)
        typed = status == 400 and not isinstance(exc, ServerHTTPError)
        headers = {ERROR_CLASS_HEADER: type(exc).__name__} if typed else None
        return error_response(status, str(exc), kind, getattr(exc, "param", None), headers, code_of(exc))

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        # library code raises typed errors; a bare ValueError still means the input was bad
        return error_response(400, f"invalid request: {exc}")

    # anything else is a bug: app.GuardMiddleware answers it with a 500 and keeps the connection


def validation_param(exc: RequestValidationError) -> str | None:
    """The body field of the first problem (``messages.0.content``), for the error's ``param``:
    the first field ``describe_validation`` reports (of a union's errors, the most precise one:
    ``sampling_params.1.top_k``, not the ``sampling_params`` that is no object); None for a
    problem of the body as a whole (not JSON, whose ``loc`` is the character position where
    parsing failed; not an object; missing)."""
    fields: list[tuple[str, str]] = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return None
        names = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_branch_name(x)]
        if names:
            fields.append((".".join(names), err.get("type", "")))
    for field, kind in fields:
        if kind == "extra_forbidden" or not any(other.startswith(field + ".") for other, _ in fields):
            return field
    return None


def _is_branch_name(part: object) -> bool:
    """A ``loc`` part naming a union alternative (``SGLangSamplingParams``, ``list[str]``, ``str``)."""
    if not isinstance(part, str):
        return False  # list indices are real positions
    return (
        "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "dict", "list", "none")
    )
