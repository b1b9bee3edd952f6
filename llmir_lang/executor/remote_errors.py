"""What the remote backends raise when a server fails them: ``RemoteBackendError`` (and
``ChainAborted``), an llmir server's typed input errors as the library's own classes, and
``_ServerErrors``, the backends' part that turns an HTTP answer (a status, a body not of the API's
shape, a network failure) into an error that says what the server did and what to do."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from llmir_lang.errors import LLMIRError


class RemoteBackendError(LLMIRError):
    """A server refused or failed a request, or could not be reached; the message has the URL, the
    status and the server's words (or the network error). ``status`` is the HTTP status (None when
    no usable answer came back: none at all, a broken one, one that is not the API's), ``detail``
    the server's own message, for callers that branch on them, and ``retry_after`` the seconds a
    429 / 503 asked to wait (its ``Retry-After``; None when it gave none)."""

    retry_after: float | None = None

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class ChainAborted(RemoteBackendError):
    """A chain stopped by ``abort_requests`` (an interrupted or cancelled program)."""


class ReasoningParserMismatchError(RemoteBackendError):
    """A constrained gen that the server would constrain otherwise than the program says, found
    before anything is sent (``remote_reasoning``): a gen inside ``separate_reasoning``, whose
    constraint starts after the reasoning, on a server started without a matching
    ``--reasoning-parser`` (it would constrain the whole output, and the model could not reason);
    or a gen constrained over its whole output on a server whose parser applies every constraint
    after the reasoning. ``server_parser``: the server's ``reasoning_parser`` (None: none);
    ``wanted``: the format the gen's constraint starts after (None: none, the whole output)."""

    def __init__(self, message: str, server_parser: str | None = None, wanted: str | None = None) -> None:
        super().__init__(message)
        self.server_parser = server_parser
        self.wanted = wanted


# The input errors an llmir server names in its ``x-llmir-error`` header on a 400 (see
# ``llmir_lang.server.errors``): the remote backends raise them as those classes, with the server's
# message, so a program fails alike on a server and on the embedded engine (the same error type
# and text), and the error is still a ``RemoteBackendError`` (with ``status``, ``detail``, ``url``).
_ERROR_CLASS_HEADER = "x-llmir-error"
_TYPED_REMOTE: dict[str, type[RemoteBackendError]] = {}


def _input_error_classes() -> dict[str, type[LLMIRError]]:
    from llmir_lang import errors
    from llmir_lang.executor.constraints import errors as constraint_errors

    classes: list[type[LLMIRError]] = [
        errors.InvalidRequestError, errors.PromptTooLongError, errors.EmptyPromptError,
        errors.OutOfKVMemoryError, errors.ConstraintError,
    ]  # fmt: skip
    classes += [
        c
        for c in vars(constraint_errors).values()
        if isinstance(c, type) and issubclass(c, errors.ConstraintError)
    ]
    return {c.__name__: c for c in classes}


def _typed_error(name: str, url: str, status: int, detail: str) -> RemoteBackendError | None:
    """A ``RemoteBackendError`` that is also the library error ``name`` (one the engine raises for
    bad input), named as that class and with the server's message; None for another name."""
    cls = _TYPED_REMOTE.get(name)
    if cls is None:
        base = _input_error_classes().get(name)
        if base is None:
            return None

        def init(self: RemoteBackendError, message: str, status: int | None = None, detail: str = "") -> None:
            RemoteBackendError.__init__(self, message, status, detail)

        attrs: dict[str, Any] = {"__init__": init, "__module__": base.__module__}
        if name == "GrammarSyntaxError":
            attrs |= {"line": 0, "column": 0}  # the server's message has them; 0 means unknown
        cls = type(name, (RemoteBackendError, base), attrs)
        _TYPED_REMOTE[name] = cls
    err = cls(detail, status, detail)
    err.url = url  # type: ignore[attr-defined]
    return err


# The status a server gives an error of each type outside a stream (llmir's types and OpenAI's
# server_error), for an error event inside one, whose ``code`` is OpenAI's string or null
_STREAM_ERROR_STATUSES = {
    "invalid_request_error": 400,
    "not_implemented": 501,
    "internal_error": 500,
    "server_error": 500,
    "server_shutting_down": 503,
}


def _stream_error_status(err: Any) -> int | None:
    """The HTTP status behind an ``{"error": ...}`` event of a stream (whose own status was 200):
    SGLang's and vLLM's put it in ``code``; llmir's and OpenAI's ``code`` is a string or null, and
    their ``type`` says it. None where neither does."""
    if not isinstance(err, dict):
        return None
    code = err.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    kind = err.get("type")
    return _STREAM_ERROR_STATUSES.get(kind) if isinstance(kind, str) else None


# What a read of a server's answer raises when the answer is not of the API's shape (a field
# missing, of another type); the backends turn them into a ``RemoteBackendError`` saying so
_SHAPE_ERRORS = (KeyError, IndexError, TypeError, AttributeError, ValueError)


def _excerpt(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _retry_after(response: httpx.Response) -> float | None:
    """A 429's or 503's ``Retry-After`` in seconds (given as seconds or as an HTTP date)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


class _ServerErrors:
    """The errors a backend reports about a server's answer, each naming the URL. Needs of the
    backend: ``_url(path)``, ``_timeout`` (seconds) and ``_api`` (what it speaks, for errors about
    answers not of its shape)."""

    _api: str
    _timeout: float
    _url: Callable[[str], str]

    def _fail(self, path: str, response: httpx.Response) -> RemoteBackendError:
        try:
            body = response.json()
            error = body.get("error") if isinstance(body, dict) else None
            detail = (error.get("message") if isinstance(error, dict) else error) or (
                body.get("detail") if isinstance(body, dict) else None
            )
            detail = detail or response.text
        except (ValueError, AttributeError):
            detail = response.text
        detail = str(detail)[:500] or response.reason_phrase
        typed = response.headers.get(_ERROR_CLASS_HEADER) if response.status_code == 400 else None
        err = _typed_error(typed, self._url(path), 400, detail) if typed else None
        if err is not None:
            return err
        message, status = f"{self._url(path)}: HTTP {response.status_code}: {detail}", response.status_code
        retry_after = _retry_after(response) if status in (429, 503) else None
        if status == 429:
            message += "; the server limits the rate of requests: send fewer at once (max_workers=), or later"
        elif status == 503:
            message += "; the server cannot take requests now (overloaded, starting or stopping): send it again later"
        if retry_after is not None:
            message += f" (Retry-After: {retry_after:g} s)"
        err = RemoteBackendError(message, status, detail)
        err.retry_after = retry_after
        return err

    def _unreachable(self, path: str, exc: Exception) -> RemoteBackendError:
        """A request that got no (complete) HTTP answer: server down, wrong host or port, timeout,
        a connection that broke mid-answer."""
        url, cause = self._url(path), f"{type(exc).__name__}: {exc}"
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return RemoteBackendError(
                f"{url}: no answer from the server within timeout={self._timeout:g} s ({cause}); it may be "
                "overloaded, or the generation longer than that: give the backend a larger timeout=, "
                "or ask for fewer tokens"
            )
        if isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)):
            return RemoteBackendError(
                f"{url}: the connection broke before the server's answer was complete ({cause}); the "
                "server may have crashed or restarted, or a proxy cut the connection: check the "
                "server's log, then run the program again"
            )
        return RemoteBackendError(
            f"{url}: no answer from the server ({cause}); check that it is running and that the URL is right"
        )

    def _answer(self, path: str, r: httpx.Response) -> Any:
        """The JSON of a successful answer. A body that is not JSON, or a 200 that carries an
        ``{"error": ...}`` (as some servers and proxies answer), is a ``RemoteBackendError``."""
        try:
            out = r.json()
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            raise RemoteBackendError(
                f"{self._url(path)}: HTTP {r.status_code} with a body that is not JSON ({_excerpt(r.text)}); "
                f"check that the URL is that of a server speaking {self._api}, and that no proxy answers "
                "in its place",
                None,
                r.text[:500],
            ) from None
        if isinstance(out, dict) and out.get("error"):
            raise self._error_body(path, r.status_code, out["error"])
        return out

    def _error_body(self, path: str, status: int, err: Any) -> RemoteBackendError:
        message = err.get("message", err) if isinstance(err, dict) else err
        return RemoteBackendError(
            f"{self._url(path)}: HTTP {status} with an error: {message}",
            _stream_error_status(err),
            str(message),
        )

    def _text_of(self, path: str, out: Any) -> str:
        """The ``text`` of an answer that must have one (``/apply_chat_template``)."""
        text = out.get("text") if isinstance(out, dict) else None
        if not isinstance(text, str):
            raise self._malformed(path, "no text", out)
        return text

    def _malformed(self, path: str, what: Any, answer: Any) -> RemoteBackendError:
        """An answer that is JSON but not of the API's shape (a field missing, of another type)."""
        what = f"{type(what).__name__}: {what}" if isinstance(what, BaseException) else what
        return RemoteBackendError(
            f"{self._url(path)}: the server's answer has an unexpected shape ({what}) in {_excerpt(answer)}; "
            f"check that the server speaks {self._api}"
        )

    def _not_events(self, path: str, status: int, text: str) -> RemoteBackendError:
        """A stream request answered with something else: the server's error if it is one."""
        try:
            out = json.loads(text)
        except ValueError:
            out = None
        if isinstance(out, dict) and out.get("error"):
            return self._error_body(path, status, out["error"])
        return RemoteBackendError(
            f"{self._url(path)}: HTTP {status} to a stream request with a body that is not server-sent "
            f"events ({_excerpt(text)}); check that the URL is that of a server speaking {self._api}"
        )

    def _unfinished(self, path: str, last: Any) -> RemoteBackendError:
        """A stream that ended without the event that finishes its generation."""
        return RemoteBackendError(
            f"{self._url(path)}: the stream ended before its last event (no finish_reason; the last "
            f"event was {_excerpt(last)}): the server closed it early; check the server's log, then "
            "run the program again"
        )
