"""Remote backends: programs run on a server instead of the embedded engine.

- ``Endpoint(url)`` speaks SGLang's ``/generate`` API, so programs run unchanged on an SGLang
  server or router. Against an llmir server (detected from ``/health``) it also scores with
  ``/score`` (the engine's exact scoring), renders the model's own chat template with
  ``/apply_chat_template``, and ``run_program`` sends whole programs to ``/program``.
- ``RuntimeEndpoint(base_url, api_key=None, verify=None)`` is ``Endpoint`` under SGLang's name and
  constructor, for programs that move over from SGLang.
- ``OpenAI(base_url, model)`` speaks ``/v1/completions`` of any OpenAI-compatible server;
  constraints go as vLLM's ``guided_*`` fields (default) or as ``response_format`` (JSON schema
  only); ``score`` uses ``echo`` + ``logprobs``. SGLang's form ``OpenAI("model-name",
  base_url=..., api_key=...)`` works too (with ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` as the
  openai client reads them).

``score`` (what ``select`` uses) has the embedded engine's semantics on every server: the prompt and
each choice are tokenized separately (the prompt with the tokenizer's special tokens, the choice
without), and the logprobs are those of the choice's tokens after the prompt's tokens. Servers get
token ids, never the joined text, whose tokenization can merge the end of the prompt with the
start of a choice ("Par" + "ma" -> "P|arm|a"). The ids come from ``tokenizer=`` when given, else
from the server's ``/tokenize`` (vLLM, SGLang, llmir); see ``OpenAI.score`` and ``Endpoint.score``
for servers without it.

Both are ``Backend``s: a chain's steps run one request at a time (constant text is appended here,
between requests), streaming comes from server-sent events, ``pin``/``unpin`` are hints that
remote servers do not take. Local checks (sampling params, constraint support) raise in
``submit``; server and network failures are reported on ``ChainResult.error``, as a
``RemoteBackendError`` that says what the server did: an HTTP error (with its Retry-After), no
answer within ``timeout``, a connection that broke mid-answer, a body that is not JSON or not of
the API's shape, a 200 that carries an error, a stream that ended before its last event. Nothing
is sent again on such a failure (the one request sent again is ``OpenAI``'s refused default
``max_tokens``, see there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from llmir_lang.errors import EmptyPromptError, InvalidRequestError, LLMIRError, NotYetSupportedError
from llmir_lang.executor.backend import Backend, ChainRequest, ChainResult, ChunkCallback, GenStep, StepResult
from llmir_lang.executor.sampling_params import SamplingParams

_FINISH_OK = ("stop", "length")
# What a gen that does not set max_tokens asks for (SamplingParams' default). A remote backend
# cannot tell it from an explicit max_tokens of the same value; see ``Endpoint._lower`` and
# ``OpenAI._generate`` for how a server's lower limit is honoured for it.
_DEFAULT_MAX_TOKENS = SamplingParams().max_new_tokens


def _non_default(fields: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """``{name: (value, default)}`` -> the fields whose value differs from the default."""
    return {k: v for k, (v, default) in fields.items() if v != default}


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


class _DeadlineStream(httpx.SyncByteStream):
    """A response body that must be complete by ``deadline`` (``time.monotonic()``)."""

    def __init__(self, inner: Any, deadline: float, timeout: float, request: httpx.Request) -> None:
        self._inner, self._deadline, self._timeout, self._request = inner, deadline, timeout, request

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            if time.monotonic() > self._deadline:
                raise httpx.ReadTimeout(
                    f"the answer was not complete after {self._timeout:g} s", request=self._request
                )
            yield chunk

    def close(self) -> None:
        self._inner.close()


def _deadline_hooks(timeout: float) -> dict[str, list[Callable[[Any], None]]]:
    """httpx event hooks that bound a whole request, its body (a stream) included, to ``timeout``
    seconds. httpx's timeouts bound each wait for data only, so a server that keeps sending
    (keep-alive comments, a byte at a time) held a request for as long as it went on. The check
    runs as data arrives; a server that sends nothing fails by httpx's read timeout."""

    def start(request: httpx.Request) -> None:
        request.extensions["llmir_deadline"] = time.monotonic() + timeout

    def bound(response: httpx.Response) -> None:
        deadline = response.request.extensions.get("llmir_deadline")
        if deadline is not None:
            response.stream = _DeadlineStream(response.stream, deadline, timeout, response.request)

    return {"request": [start], "response": [bound]}


@dataclass(slots=True)
class RemoteState:
    """One returned state of a program run on the server (``/program``)."""

    text: str
    vars: dict[str, str]
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None  # why the state failed, if it did
    error_var: str | None = None  # the gen / select that failed


@dataclass(slots=True)
class ProgramReply:
    """``/program``'s answer: per function (module order) its returned states, and run stats."""

    functions: list[tuple[str, list[RemoteState]]]
    stats: dict[str, Any]


class _HTTPBackend(Backend):
    """HTTP plumbing shared by both backends: a pooled client, JSON and SSE calls, a thread pool
    that runs chains (so ``submit`` returns at once and many chains run side by side).

    Options of both backends: ``tokenizer`` (a Hugging Face tokenizer or its path, for the chat
    template when the server cannot render it), ``timeout`` (seconds per request, a streamed
    answer included: a request not answered in full by then fails), ``max_workers``
    (chains in flight), ``verify`` (TLS: False skips certificate checks, a path names a CA bundle).
    Subclasses define ``_lower(GenStep) -> request body`` and
    ``_generate(text, body, on_text, stop) -> StepResult``."""

    _api = "the API"  # what a subclass speaks, for errors about answers not of its shape

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        tokenizer: Any = None,
        timeout: float = 600.0,
        max_workers: int = 64,
        verify: bool | str = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # httpx takes a CA bundle as an SSL context (a path there is deprecated)
        try:
            self._verify = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        except (OSError, ssl.SSLError) as e:
            raise InvalidRequestError(
                f"verify={verify!r}: not a readable CA bundle ({e}); give the path of a PEM file, True or False"
            ) from None
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_workers, max_keepalive_connections=max_workers),
            verify=self._verify,
            event_hooks=_deadline_hooks(timeout),
        )
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="llmir-remote")
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._no_tokenize = False  # the server answered /tokenize with 404 / 405
        self._tokenize_fields: dict[str, Any] = {}  # extra /tokenize fields (OpenAI: the model)

    # --- HTTP ------------------------------------------------------------------------------
    @property
    def _root(self) -> str:
        """The server's root URL (where ``/tokenize`` and llmir's extensions live)."""
        return self.base_url

    def _url(self, path: str) -> str:
        return path if "://" in path else self.base_url + path

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

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """One request; network failures become ``RemoteBackendError``s naming the URL and the cause.
        ``path`` is relative to ``base_url``, or a whole URL (``self._root + ...``)."""
        try:
            return self._client.request(method, path, json=body)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise self._unreachable(path, e) from None

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        r = self._request("POST", path, body)
        if r.status_code >= 400:
            raise self._fail(path, r)
        return self._answer(path, r)

    def _post_abortable(self, path: str, body: dict[str, Any], stop: threading.Event) -> Any:
        """``_post`` that setting ``stop`` ends at once, for long calls (``/program``): the request
        runs on an asyncio client of its own, on a thread of its own; cancelling it closes its
        connection, so the server (which aborts a request whose client went away) stops too. Then
        ``ChainAborted`` is raised. A KeyboardInterrupt in the waiting thread sets ``stop``."""
        client_options = {
            "base_url": self.base_url, "headers": self._client.headers, "timeout": self._client.timeout,
            "verify": self._verify,
        }  # fmt: skip

        deadline = time.monotonic() + self._timeout

        async def call() -> httpx.Response | None:
            async with httpx.AsyncClient(**client_options) as client:
                task = asyncio.ensure_future(client.post(path, json=body))
                while not task.done():
                    late = time.monotonic() > deadline
                    if stop.is_set() or late:
                        task.cancel()
                        with contextlib.suppress(BaseException):
                            await task
                        if late and not stop.is_set():
                            raise httpx.ReadTimeout(f"the answer was not complete after {self._timeout:g} s")
                        return None
                    await asyncio.wait({task}, timeout=0.05)
                return task.result()

        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["response"] = asyncio.run(call())
            except BaseException as e:
                box["error"] = e

        worker = threading.Thread(target=run, daemon=True, name="llmir-remote-call")
        worker.start()
        try:
            worker.join()
        except BaseException:  # interrupted while waiting: the call must not run on for nobody
            stop.set()
            worker.join(10.0)
            raise
        error = box.get("error")
        if isinstance(error, (httpx.HTTPError, httpx.InvalidURL)):
            raise self._unreachable(path, error) from None
        if error is not None:
            raise error
        r = box.get("response")
        if r is None:
            raise ChainAborted(f"{self._url(path)}: aborted by the caller")
        if r.status_code >= 400:
            raise self._fail(path, r)
        return self._answer(path, r)

    def _events(
        self, path: str, body: dict[str, Any], stop: threading.Event | None = None
    ) -> Iterator[dict[str, Any]]:
        """The JSON events (objects) of a server-sent-events response, up to ``data: [DONE]``. Once
        ``stop`` is set the response is closed (a server aborts a request whose client went away)
        and ``ChainAborted`` raised. An ``{"error": ...}`` event, an event that is not a JSON
        object, and a body that is no server-sent events at all (a JSON error, a proxy's page)
        raise ``RemoteBackendError``; a stream that ends without ``[DONE]`` just ends (callers
        check that its last event came)."""
        try:
            with self._client.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise self._fail(path, r)
                other: list[str] = []  # lines that are no SSE field: the body is something else
                for line in r.iter_lines():
                    if stop is not None and stop.is_set():
                        raise ChainAborted(f"{self._url(path)}: aborted by the caller")
                    if not line.startswith("data:"):
                        if line and not line.startswith((":", "event:", "id:", "retry:")) and len(other) < 20:
                            other.append(line)
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise RemoteBackendError(
                            f"{self._url(path)}: the server sent an event that is not JSON ({_excerpt(data)}); "
                            f"check that the server speaks {self._api}"
                        ) from None
                    if isinstance(event, dict) and "error" in event:
                        err = event["error"]
                        message = err.get("message", event) if isinstance(err, dict) else err
                        status = _stream_error_status(err)
                        raise RemoteBackendError(f"{self._url(path)}: {message}", status, str(message))
                    if not isinstance(event, dict):
                        raise self._malformed(path, "an event that is not a JSON object", event)
                    yield event
                if other:
                    raise self._not_events(path, r.status_code, "\n".join(other))
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise self._unreachable(path, e) from None

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

    # --- tokens ------------------------------------------------------------------------------
    def _hf_tokenizer(self) -> Any:
        with self._lock:
            if isinstance(self._tokenizer, str):
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer)
        return self._tokenizer

    def token_ids(self, text: str) -> list[int] | None:
        """With ``tokenizer=``: ``text``'s ids for meta info (no request to the server for it)."""
        if self._tokenizer is None:
            return None
        return list(self._hf_tokenizer().encode(text, add_special_tokens=False))

    def token_text(self, token_id: int) -> str | None:
        if self._tokenizer is None:
            return None
        return self._hf_tokenizer().decode([token_id], skip_special_tokens=False)

    def _token_ids(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]] | None:
        """``texts`` as the served model's tokenizer encodes them: with ``tokenizer=`` locally, else
        with the server's ``/tokenize`` (vLLM's format, which SGLang and llmir share). None when
        neither is available (the server has no ``/tokenize`` route: 404 / 405, remembered)."""
        if self._tokenizer is not None:
            tok = self._hf_tokenizer()
            return [list(tok.encode(t, add_special_tokens=add_special_tokens)) for t in texts]
        if self._no_tokenize:
            return None
        out = []
        for text in texts:
            body = {**self._tokenize_fields, "prompt": text, "add_special_tokens": add_special_tokens}
            r = self._request("POST", self._root + "/tokenize", body)
            if r.status_code == 405 or (r.status_code == 404 and "model" not in r.text.lower()):
                self._no_tokenize = True  # no such route (a 404 about the model is an error)
                return None
            if r.status_code >= 400:
                raise self._fail(self._root + "/tokenize", r)
            try:
                ids = r.json().get("tokens")
            except (ValueError, AttributeError):
                ids = None
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                self._no_tokenize = True  # some other /tokenize: not one we can read
                return None
            out.append(ids)
        return out

    def _choice_ids(
        self, prompt: str, continuations: Sequence[str]
    ) -> tuple[list[int], list[list[int]]] | None:
        """(prompt ids, ids of each continuation), tokenized apart as the engine's ``score`` does;
        None when no tokenizer is available."""
        prompt_ids = self._token_ids([prompt], add_special_tokens=True)
        if prompt_ids is None:
            return None
        _check_prompt_ids(prompt_ids[0])
        conts = self._token_ids(list(continuations), add_special_tokens=False)
        if conts is None:
            return None
        _check_continuations(continuations, conts)
        return prompt_ids[0], conts

    # --- Backend ---------------------------------------------------------------------------
    def submit(self, request: ChainRequest, on_chunk: ChunkCallback | None = None) -> Future:
        lowered = [s if isinstance(s, str) else (s.name, self._lower(s)) for s in request.steps]
        if not any(not isinstance(s, str) for s in lowered):
            raise NotYetSupportedError("a chain needs at least one generation step")
        stop = threading.Event()
        fut = self._pool.submit(self._run_chain, request.prompt, lowered, on_chunk, stop)
        fut.llmir_stop = stop  # type: ignore[attr-defined]  # for abort_requests
        return fut

    def abort_requests(self, futures: Iterable[Future]) -> None:
        """Stop the chains behind ``futures``: one not started never runs; a streamed generation
        closes its response (the server aborts it); a chain starts no further generation. A
        generation sent without streaming runs to its end on the server (its result is dropped)."""
        for f in futures:
            stop = getattr(f, "llmir_stop", None)
            if stop is not None:
                stop.set()
            f.cancel()

    def _run_chain(
        self, prompt: str, lowered: list[Any], on_chunk: ChunkCallback | None, stop: threading.Event
    ) -> ChainResult:
        text, appended, results = prompt, "", []
        for step in lowered:
            if isinstance(step, str):
                text, appended = text + step, appended + step
                continue
            if stop.is_set():
                return ChainResult(results, appended, error="ChainAborted: aborted by the caller")
            index = len(results)
            sink = (lambda t, i=index: on_chunk(i, t)) if on_chunk is not None else None
            try:
                res = self._generate(text, step[1], sink, stop)
            except Exception as e:  # network or server failure: reported, never raised
                return ChainResult(results, appended, error=f"{type(e).__name__}: {e}", exception=e)
            res.name = step[0]
            results.append(res)
            text, appended = text + res.text, appended + res.text
            if res.error:
                return ChainResult(results, appended, error=res.error)
        return ChainResult(results, appended)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if self._tokenizer is None:
            return self._server_chat_template(messages, add_generation_prompt)
        return self._hf_tokenizer().apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _server_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        raise NotYetSupportedError(
            f"{self.base_url} cannot render the model's chat template; pass tokenizer=<Hugging Face "
            "tokenizer path or object> to the backend"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> _HTTPBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    _lower: Callable[[GenStep], dict[str, Any]]
    _generate: Callable[[str, dict[str, Any], Callable[[str], None] | None], StepResult]


def _check_prompt_ids(ids: list[int]) -> None:
    """The engine's ``score`` refuses a prompt of no tokens (an empty text, no BOS): so do the
    backends, with the same error, instead of asking the server for logprobs it cannot give."""
    if not ids:
        raise EmptyPromptError("score() needs a non-empty prompt")


def _check_continuations(continuations: Sequence[str], ids: list[list[int]]) -> None:
    empty = [c for c, t in zip(continuations, ids) if not t]
    if empty:
        raise InvalidRequestError(f"every continuation must have at least one token; {empty!r} has none")


def _merge_error(base_url: str, choice: str, token: str | None) -> NotYetSupportedError:
    merged = f" into the token {token!r}" if token is not None else ""
    return NotYetSupportedError(
        f"cannot score {choice!r} exactly on {base_url}: joined to the prompt, its text merges with the "
        f"prompt's end{merged}, and the server has no /tokenize to tokenize them apart; pass "
        "tokenizer=<the model's Hugging Face tokenizer or its path> to the backend"
    )


def _choices_regex(choices_json: str) -> str:
    from llmir_lang.executor.constraints.spec import escape_regex

    return "(?:" + "|".join(escape_regex(c) for c in json.loads(choices_json)) + ")"


class Endpoint(_HTTPBackend):
    """An SGLang server or router, or an llmir server (``llmir serve``), at ``url``.

    ``protocol``: ``"auto"`` (ask ``/health`` on first use), ``"llmir"`` or ``"sglang"``. An SGLang
    server cannot render the chat template: give ``tokenizer=`` for programs with roles. Grammar
    constraints go as ``ebnf`` in llguidance's lark syntax (an llmir server also takes GBNF; SGLang
    needs its llguidance grammar backend). A gen whose ``max_tokens`` is the default (128) is sent
    without ``max_new_tokens``, so the server's own default applies (128 on SGLang; on an llmir
    server 128 capped by its ``--max-tokens-limit``).
    """

    def __init__(self, url: str, api_key: str | None = None, *, protocol: str = "auto", **http: Any) -> None:
        if protocol not in ("auto", "llmir", "sglang"):
            raise InvalidRequestError(f"protocol must be 'auto', 'llmir' or 'sglang', got {protocol!r}")
        super().__init__(url, api_key, **http)
        self._protocol: str | None = None if protocol == "auto" else protocol

    _api = "SGLang's /generate API (base_url: the server's root URL)"

    @property
    def protocol(self) -> str:
        """``"llmir"`` if the server is an llmir server (``/program``, ``/score``), else ``"sglang"``.

        Asked once, from ``/health``. Only an answer is remembered: a server that cannot be reached,
        or answers with an error, raises ``RemoteBackendError`` (with the URL and the cause) and is
        asked again next time, so a server that was down at first use is not taken for SGLang."""
        if self._protocol is None:
            r = self._request("GET", "/health")
            if r.status_code == 404:
                raise RemoteBackendError(
                    f"{self.base_url}/health: HTTP 404: no server answers there; give the server's root "
                    "URL (no /v1 or other path), or protocol='sglang' for a server without /health",
                    404,
                    r.text[:500],
                )
            if r.status_code != 200:
                raise self._fail("/health", r)
            try:
                info = r.json() if r.content else {}
            except ValueError:
                info = {}  # SGLang answers with an empty body
            self._protocol = "llmir" if isinstance(info, dict) and info.get("server") == "llmir" else "sglang"
        return self._protocol

    def _lower(self, step: GenStep) -> dict[str, Any]:
        p = step.params
        p.validate()
        sp: dict[str, Any] = {"temperature": p.temperature}
        if p.max_new_tokens != _DEFAULT_MAX_TOKENS:  # the default: the server's (capped by its limit)
            sp["max_new_tokens"] = p.max_new_tokens
        sp |= _non_default({
            "min_new_tokens": (p.min_new_tokens, 0), "top_p": (p.top_p, 1.0), "top_k": (p.top_k, -1),
            "min_p": (p.min_p, 0.0), "frequency_penalty": (p.frequency_penalty, 0.0),
            "presence_penalty": (p.presence_penalty, 0.0), "repetition_penalty": (p.repetition_penalty, 1.0),
            "stop": (list(p.stop), []), "stop_token_ids": (list(p.stop_token_ids), []),
            "stop_regex": (list(p.stop_regex), []), "ignore_eos": (p.ignore_eos, False), "skip_special_tokens": (p.skip_special_tokens, True),
            "sampling_seed": (p.seed, None),
        })  # fmt: skip
        spec = step.constraint
        if spec is not None:
            key = {"json_schema": "json_schema", "grammar": "ebnf"}.get(spec.kind, "regex")
            sp[key] = _choices_regex(spec.value) if spec.kind == "choices" else spec.value
        body: dict[str, Any] = {"sampling_params": sp}
        if p.return_logprob or step.logprob_start_len >= 0:
            body.update(return_logprob=True, top_logprobs_num=p.top_logprobs_num)
        if step.logprob_start_len >= 0:
            body.update(logprob_start_len=step.logprob_start_len, return_text_in_logprobs=True)
        return body

    def _generate(
        self,
        text: str,
        body: dict[str, Any],
        on_text: Callable[[str], None] | None,
        stop: threading.Event | None = None,
    ) -> StepResult:
        body = {**body, "text": text}
        if on_text is None:
            return self._read_step(self._post("/generate", body), streamed=False)
        last: dict[str, Any] = {}
        sent = 0
        for event in self._events("/generate", {**body, "stream": True}, stop):
            full = event.get("text", "")
            if not isinstance(full, str):
                raise self._malformed("/generate", f"text is a {type(full).__name__}", event)
            if len(full) > sent:  # SGLang streams the whole text so far
                on_text(full[sent:])
                sent = len(full)
            last = event
        return self._read_step(last, streamed=True)

    def _read_step(self, out: Any, streamed: bool) -> StepResult:
        """``_step_result`` of an answer (a stream's last event), which must have finished."""
        try:
            if out.get("meta_info", {}).get("finish_reason") is None:
                if streamed:
                    raise self._unfinished("/generate", out)
                raise self._malformed("/generate", "no meta_info.finish_reason", out)
            return self._step_result(out)
        except _SHAPE_ERRORS as e:
            raise self._malformed("/generate", e, out) from None

    @staticmethod
    def _step_result(out: dict[str, Any]) -> StepResult:
        meta = out.get("meta_info", {})
        finish = meta.get("finish_reason") or {}
        finish = finish if isinstance(finish, dict) else {"type": str(finish)}
        kind = finish.get("type", "unknown")
        lps = meta.get("output_token_logprobs")
        ids = list(out.get("output_ids") or [])
        if not ids and lps and all(isinstance(e, (list, tuple)) and len(e) > 1 for e in lps):
            ids = [e[1] for e in lps]  # SGLang's (logprob, token id, text) entries carry the ids
        tops = meta.get("output_top_logprobs")
        inputs = meta.get("input_token_logprobs")
        return StepResult(
            name=None,
            text=out.get("text", ""),
            token_ids=ids,
            finish_reason=kind,
            prompt_tokens=int(meta.get("prompt_tokens", 0)),
            completion_tokens=int(meta.get("completion_tokens", 0)),
            cached_tokens=int(meta.get("cached_tokens", 0)),
            logprobs=[e[0] for e in lps] if lps is not None else None,
            top_logprobs=[[(e[1], e[0]) for e in top or []] for top in tops] if tops is not None else None,
            error=None
            if kind in _FINISH_OK
            else f"generation ended with {kind}: {finish.get('message', '')}",
            meta={"remote_id": meta.get("id")},
            prompt_logprobs=[(e[1], e[0]) for e in inputs] if inputs is not None else None,
            prompt_texts=[e[2] for e in inputs] if inputs and all(len(e) > 2 for e in inputs) else None,
            matched_stop=finish.get("matched") if kind == "stop" else None,
        )

    def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        """The engine's scoring: an llmir server's ``/score``; on SGLang, ``/generate`` over the
        token ids of the prompt followed by each choice's own tokens, with the logprobs from the
        prompt's last token on (so "Par" + "ma" is scored as the tokens of "ma" after those of
        "Par", whatever "Parma" tokenizes to).

        The ids come from ``tokenizer=`` or the server's ``/tokenize``. A server with neither tells
        the ids of texts through ``input_token_logprobs``: the prompt's exactly, a choice's as the
        tokens of prompt+choice past the prompt's, which are its own tokens unless its text merges
        with the prompt's end; then ``NotYetSupportedError`` asks for ``tokenizer=``."""
        conts = list(continuations)
        if self.protocol == "llmir":
            out = self._post("/score", {"prompt": prompt, "continuations": conts})
            try:
                scores = out["logprobs"]
                if len(scores) != len(conts) or not all(isinstance(lps, list) for lps in scores):
                    raise ValueError(f"{len(conts)} lists of logprobs expected")
            except _SHAPE_ERRORS as e:
                raise self._malformed("/score", e, out) from None
            return scores
        if not conts:
            return []
        ids = self._choice_ids(prompt, conts) or self._ids_from_logprobs(prompt, conts)
        p_ids, c_ids = ids
        body = {
            "input_ids": [p_ids + c for c in c_ids],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": len(p_ids) - 1,
        }
        outs = self._post("/generate", body)
        outs = [outs] if isinstance(outs, dict) else outs
        scores = []
        try:
            if len(outs) != len(c_ids):
                raise ValueError(f"{len(c_ids)} answers expected, one per input")
            for out, c in zip(outs, c_ids):
                entries = out["meta_info"].get("input_token_logprobs") or []
                lps = [e[0] for e in entries[-len(c) :]]
                if len(entries) <= len(c) - 1 or len(lps) != len(c) or any(v is None for v in lps):
                    raise RemoteBackendError(
                        f"{self.base_url}/generate: expected logprobs of {len(c)} continuation tokens, "
                        f"got input_token_logprobs {entries[-len(c) - 1 :]!r}"
                    )
                scores.append([float(v) for v in lps])
        except _SHAPE_ERRORS as e:
            raise self._malformed("/generate", e, outs) from None
        return scores

    def _ids_from_logprobs(self, prompt: str, conts: list[str]) -> tuple[list[int], list[list[int]]]:
        """(prompt ids, choice ids) read from ``input_token_logprobs`` (see ``score``)."""
        body = {
            "text": [prompt] + [prompt + c for c in conts],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        outs = self._post("/generate", body)
        try:
            ids = [[int(e[1]) for e in o["meta_info"]["input_token_logprobs"]] for o in outs]
            if len(ids) != len(conts) + 1:
                raise ValueError(f"{len(conts) + 1} answers expected, one per text")
        except _SHAPE_ERRORS as e:
            raise self._malformed("/generate", e, outs) from None
        p_ids, c_ids = ids[0], []
        _check_prompt_ids(p_ids)
        for c, full in zip(conts, ids[1:]):
            if full[: len(p_ids)] != p_ids or len(full) == len(p_ids):
                raise _merge_error(self.base_url, c, None)
            c_ids.append(full[len(p_ids) :])
        return p_ids, c_ids

    def _server_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self.protocol != "llmir":
            return super()._server_chat_template(messages, add_generation_prompt)
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        return self._text_of("/apply_chat_template", self._post("/apply_chat_template", body))

    def run_program(
        self,
        ir: str,
        args: dict[str, str] | list[dict[str, str]] | None = None,
        passes: str | None = None,
        stop: threading.Event | None = None,
    ) -> ProgramReply:
        """Run a whole program on an llmir server in one round trip. ``ir``: IR text (e.g.
        ``print_ir(f.trace())``); ``args``: one dict (one function) or one per function;
        ``passes``: the server's pipeline (None: its default). Setting ``stop`` (from another
        thread) ends the call at once with ``ChainAborted``, and the server aborts the run."""
        if self.protocol != "llmir":
            raise NotYetSupportedError(
                f"{self.base_url} is not an llmir server, so it cannot run whole programs; "
                "run the program with backend=Endpoint(url) instead (one request per call)"
            )
        if not isinstance(ir, str):
            raise InvalidRequestError(
                f"run_program takes IR text (print_ir(module)), got {type(ir).__name__}"
            )
        body = {"ir": ir, "args": args, "passes": passes}
        out = self._post("/program", body) if stop is None else self._post_abortable("/program", body, stop)
        functions = []
        try:
            for fn in out["functions"]:
                states = []
                for st in fn["states"]:
                    err = st.get("error") or {}
                    states.append(
                        RemoteState(
                            st["text"],
                            dict(st["vars"]),
                            st.get("meta") or {},
                            err.get("message"),
                            err.get("var"),
                        )
                    )
                functions.append((fn["name"], states))
            stats = dict(out.get("stats") or {})
        except _SHAPE_ERRORS as e:
            raise self._malformed("/program", e, out) from None
        return ProgramReply(functions, stats)

    # --- SGLang's server calls ----------------------------------------------------------------
    def flush_cache(self) -> None:
        """Drop the server's cached prefixes (``/flush_cache``, on SGLang and llmir servers)."""
        r = self._request("POST", "/flush_cache", {})
        if r.status_code >= 400:
            raise self._fail("/flush_cache", r)

    def get_server_info(self) -> dict[str, Any]:
        """The server's description: SGLang's ``/get_server_info`` (``/server_info`` on newer
        servers), or an llmir server's ``/health`` and ``/get_model_info`` together."""
        if self.protocol == "llmir":
            info = self._json("GET", "/health")
            return {**info, **self._json("GET", "/get_model_info")}
        r = self._request("GET", "/get_server_info")
        if r.status_code == 404:
            return self._json("GET", "/server_info")
        if r.status_code >= 400:
            raise self._fail("/get_server_info", r)
        return self._answer("/get_server_info", r)

    def _json(self, method: str, path: str) -> Any:
        r = self._request(method, path)
        if r.status_code >= 400:
            raise self._fail(path, r)
        return self._answer(path, r)


class RuntimeEndpoint(Endpoint):
    """``Endpoint`` under SGLang's name and constructor: ``RuntimeEndpoint(base_url, api_key=None,
    verify=None)``, an SGLang server (or an llmir server) at ``base_url``.

    Unlike SGLang's, it does not call the server when it is made (the first request does), and it
    has no ``chat_template_name``: roles render through the model's own template, which an SGLang
    server cannot render, so give ``tokenizer=`` (a Hugging Face tokenizer or its path) for
    programs with roles. Other ``Endpoint`` options (``protocol``, ``timeout``, ...) go by keyword.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        verify: bool | str | None = None,
        chat_template_name: str | None = None,
        **options: Any,
    ) -> None:
        if chat_template_name is not None:
            raise NotYetSupportedError(
                f"RuntimeEndpoint(chat_template_name={chat_template_name!r}): SGLang's chat template "
                "table is not used here; roles render through the model's own template: pass "
                "tokenizer= (the model's Hugging Face tokenizer or its path) instead"
            )
        super().__init__(base_url, api_key, verify=True if verify is None else verify, **options)


class OpenAI(_HTTPBackend):
    """An OpenAI-compatible server at ``base_url`` (ending in ``/v1``) serving ``model``.

    ``constraints``: ``"vllm"`` sends ``guided_regex`` / ``guided_json`` / ``guided_grammar`` /
    ``guided_choice``; ``"response_format"`` sends JSON schemas as ``response_format`` (other
    constraints raise ``NotYetSupportedError``); ``"none"`` refuses every constraint.

    ``max_tokens`` is always sent (OpenAI servers default to 16 when it is left out). A gen whose
    ``max_tokens`` is the default (128) and that a server refuses for being above its limit
    (``llmir serve --max-tokens-limit N`` says so in its 400) is sent again with N, and N is
    remembered; an explicit max_tokens of another value above the limit stays an error.

    SGLang's form names the model first: ``OpenAI("model-name", is_chat_model=None,
    base_url=..., api_key=...)``, the URL and key defaulting to ``OPENAI_BASE_URL`` (else
    ``https://api.openai.com/v1``) and ``OPENAI_API_KEY`` as in the openai client. It always
    speaks ``/v1/completions`` (the prompt rendered here, roles through the chat template), so a
    model that only the chat API serves fails at its first request; ``is_chat_model=True``,
    ``chat_template`` and ``is_azure`` raise ``NotYetSupportedError``.
    """

    def __init__(
        self,
        url_or_model: str | None = None,
        model: str | bool | None = None,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        constraints: str = "vllm",
        is_chat_model: bool | None = None,
        chat_template: Any = None,
        is_azure: bool = False,
        model_name: str | None = None,
        **http: Any,
    ) -> None:
        if model_name is not None:  # SGLang's keyword for the model
            if url_or_model is not None and url_or_model != model_name and model is None:
                raise InvalidRequestError(
                    f"OpenAI got two models, {url_or_model!r} and model_name={model_name!r}"
                )
            if isinstance(model, str):
                raise InvalidRequestError(f"OpenAI got two models, {model!r} and model_name={model_name!r}")
            url_or_model = model_name
        if constraints not in ("vllm", "response_format", "none"):
            raise InvalidRequestError(
                f"constraints: 'vllm', 'response_format' or 'none', not {constraints!r}"
            )
        if isinstance(model, str):  # llmir's form: OpenAI(base_url, model, api_key=None)
            if url_or_model is not None and base_url is not None and url_or_model != base_url:
                raise InvalidRequestError(f"OpenAI got two base URLs, {url_or_model!r} and {base_url!r}")
            url = url_or_model if url_or_model is not None else base_url
            if not url:
                raise InvalidRequestError(
                    f"OpenAI(model={model!r}) needs the server's base_url (ending in /v1)"
                )
        else:  # SGLang's form: OpenAI(model_name, is_chat_model=None, ..., base_url=..., api_key=...)
            model, is_chat_model = _sglang_openai_model(url_or_model, model, is_chat_model)
            url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
            api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        _refuse_openai_options(is_chat_model, chat_template, is_azure, http)
        super().__init__(url, api_key, **http)
        self.model = model
        self.constraints = constraints
        self._tokenize_fields = {"model": model}
        self._max_tokens_limit: int | None = None  # learned from a refused default max_tokens

    _api = "OpenAI's /v1/completions API (base_url ending in /v1)"

    @property
    def _root(self) -> str:
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    @property
    def model_name(self) -> str:
        """The model (SGLang's attribute name)."""
        return self.model

    is_chat_model = False  # SGLang's attribute: this backend always sends /v1/completions

    def _lower(self, step: GenStep) -> dict[str, Any]:
        p = step.params
        p.validate()
        body: dict[str, Any] = {"model": self.model, "max_tokens": p.max_new_tokens}
        body |= _non_default({
            "temperature": (p.temperature, None),
            "top_p": (p.top_p, 1.0), "frequency_penalty": (p.frequency_penalty, 0.0),
            "presence_penalty": (p.presence_penalty, 0.0), "stop": (list(p.stop), []), "seed": (p.seed, None),
            # vLLM's extra sampling fields, sent only when set
            "top_k": (p.top_k, -1), "min_p": (p.min_p, 0.0), "repetition_penalty": (p.repetition_penalty, 1.0),
            "min_tokens": (p.min_new_tokens, 0), "ignore_eos": (p.ignore_eos, False),
            "stop_token_ids": (list(p.stop_token_ids), []), "skip_special_tokens": (p.skip_special_tokens, True),
        })  # fmt: skip
        if p.stop_regex:
            raise NotYetSupportedError(
                f"gen({step.name!r}, stop_regex={p.stop_regex!r}): OpenAI's API has no regex stop; "
                "use stop= strings, or Endpoint (an SGLang or llmir server) or the embedded Runtime"
            )
        if step.logprob_start_len >= 0:
            raise NotYetSupportedError(
                f"gen({step.name!r}, logprob_start_len={step.logprob_start_len}): the OpenAI backend "
                "does not report a prompt's token logprobs; use Endpoint (an SGLang or llmir server) "
                "or the embedded Runtime"
            )
        if p.return_logprob:
            body["logprobs"] = p.top_logprobs_num
        spec = step.constraint
        if spec is None:
            return body
        if self.constraints == "vllm":
            key = {"regex": "guided_regex", "json_schema": "guided_json", "grammar": "guided_grammar"}
            value: Any = json.loads(spec.value) if spec.kind in ("json_schema", "choices") else spec.value
            body[key.get(spec.kind, "guided_choice")] = value
        elif self.constraints == "response_format" and spec.kind == "json_schema":
            schema = {"name": "output", "schema": json.loads(spec.value)}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        else:
            raise NotYetSupportedError(
                f"gen({step.name!r}) has a {spec.kind} constraint, which OpenAI(constraints="
                f"{self.constraints!r}) cannot send; use constraints='vllm' for a vLLM server"
            )
        return body

    def _generate(
        self,
        text: str,
        body: dict[str, Any],
        on_text: Callable[[str], None] | None,
        stop: threading.Event | None = None,
    ) -> StepResult:
        body = {**body, "prompt": text}
        default = body["max_tokens"] == _DEFAULT_MAX_TOKENS
        limit = self._max_tokens_limit
        if default and limit is not None:
            body["max_tokens"] = min(limit, _DEFAULT_MAX_TOKENS)
        try:
            return self._complete(body, on_text, stop)
        except RemoteBackendError as e:
            limit = _refused_limit(e) if body["max_tokens"] == _DEFAULT_MAX_TOKENS else None
            if limit is None or limit >= _DEFAULT_MAX_TOKENS:
                raise
            self._max_tokens_limit = limit  # refused before anything was generated: send again
            return self._complete({**body, "max_tokens": limit}, on_text, stop)

    def _complete(
        self, body: dict[str, Any], on_text: Callable[[str], None] | None, stop: threading.Event | None = None
    ) -> StepResult:
        if on_text is None:
            out = self._post("/completions", body)
            try:
                choice, usage = out["choices"][0], out.get("usage") or {}
                got, finish = choice.get("text", ""), choice.get("finish_reason")
                if finish is None:
                    raise ValueError("no finish_reason")
                return self._completion(body, got, finish, usage, choice.get("logprobs") or {})
            except _SHAPE_ERRORS as e:
                raise self._malformed("/completions", e, out) from None
        got, finish, usage, last = "", None, {}, None
        parts: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        streamed = False  # logprobs came with the chunks
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        for event in self._events("/completions", stream_body, stop):
            last, pieces = event, []
            try:
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    piece = choice.get("text")
                    if piece and not isinstance(piece, str):
                        raise TypeError(f"text is a {type(piece).__name__}")
                    pieces.append(piece or "")
                    finish = choice.get("finish_reason") or finish
                    part = choice.get("logprobs")
                    if part:
                        streamed = True
                        for key, values in parts.items():
                            values.extend(part.get(key) or [])
            except _SHAPE_ERRORS as e:
                raise self._malformed("/completions", e, event) from None
            for piece in pieces:
                if piece:
                    on_text(piece)
                    got += piece
        if finish is None:
            raise self._unfinished("/completions", last)
        try:
            return self._completion(body, got, finish, usage, parts if streamed else {})
        except _SHAPE_ERRORS as e:
            raise self._malformed("/completions", e, last) from None

    @staticmethod
    def _completion(
        body: dict[str, Any], got: str, finish: str, usage: dict[str, Any], lp: dict[str, Any]
    ) -> StepResult:
        if not isinstance(got, str) or not isinstance(finish, str):
            raise TypeError(f"text {type(got).__name__}, finish_reason {type(finish).__name__}")
        tops = lp.get("top_logprobs") if body.get("logprobs") else None
        # OpenAI's top alternatives are {token text: logprob} maps, most likely first by value
        ranked = [sorted((t or {}).items(), key=lambda kv: -kv[1]) for t in tops] if tops else None
        return StepResult(
            name=None,
            text=got,
            token_ids=[],
            finish_reason=finish,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            logprobs=lp.get("token_logprobs"),
            top_logprobs=[[(None, v) for _, v in top] for top in ranked] if ranked is not None else None,
            error=None if finish in _FINISH_OK else f"generation ended with {finish}",
            token_texts=lp.get("tokens"),
            top_texts=[[k for k, _ in top] for top in ranked] if ranked is not None else None,
        )

    def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        """The engine's scoring over ``/completions`` with ``echo``, ``logprobs`` and
        ``max_tokens: 0``: the prompts sent are token ids, the prompt's followed by each choice's
        own (from ``tokenizer=`` or the server's ``/tokenize``), and a choice's logprobs are those
        of its last tokens, exactly as the engine scores it.

        A server without ``/tokenize`` (and no ``tokenizer=``) gets the joined texts; a choice is
        then scored from the token that starts where the prompt ends, which is the engine's answer
        whenever the prompt and the choice tokenize apart. Where a token straddles the boundary
        ("Par" + "ma" -> "P|arm|a") no text request can give that answer: ``NotYetSupportedError``
        asks for ``tokenizer=``."""
        conts = list(continuations)
        if not conts:
            return []
        ids = self._choice_ids(prompt, conts)
        if ids is not None:
            p_ids, c_ids = ids
            choices = self._echo([p_ids + c for c in c_ids])
            return [self._tail(ch, len(c)) for ch, c in zip(choices, c_ids)]
        out = []
        choices = self._echo([prompt + c for c in conts])
        try:
            for ch, c in zip(choices, conts):
                lp = ch["logprobs"]
                starts, tokens = list(lp["text_offset"]), [str(t) for t in lp["tokens"]]
                joined, text = "".join(tokens), prompt + c
                # offsets count the text of special tokens (a BOS) the server put before the prompt
                boundary = len(prompt) + (len(joined) - len(text) if joined.endswith(text) else 0)
                first = next((i for i, o in enumerate(starts) if o >= boundary), len(starts))
                if first == len(starts) or starts[first] != boundary:
                    raise _merge_error(self.base_url, c, tokens[first - 1] if first > 0 else None)
                out.append(self._tail(ch, len(starts) - first))
        except _SHAPE_ERRORS as e:
            raise self._malformed("/completions", e, choices) from None
        return out

    def _tail(self, choice: dict[str, Any], n: int) -> list[float]:
        try:
            lps = list(choice["logprobs"]["token_logprobs"])[-n:]
            if len(lps) != n or any(v is None for v in lps):
                raise RemoteBackendError(
                    f"{self.base_url}/completions: expected the logprobs of {n} echoed tokens, got {lps!r}"
                )
            return [float(v) for v in lps]
        except _SHAPE_ERRORS as e:
            raise self._malformed("/completions", e, choice) from None

    def _echo(self, prompts: list[Any]) -> list[dict[str, Any]]:
        """The choices (in order) of a scoring request: echo + logprobs, nothing generated."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 0}
        try:
            out = self._post("/completions", body)
        except RemoteBackendError as e:
            if not _refuses_echo(e):
                raise  # wrong key, unknown model, server down or failing: not a missing feature
            raise NotYetSupportedError(
                f"scoring (select) needs /completions with echo, logprobs and max_tokens 0, which "
                f"{self.base_url} does not support ({e}); use a server that does (vLLM, llmir) or Endpoint"
            ) from None
        try:
            choices = sorted(out["choices"], key=lambda c: c["index"])
            if len(choices) != len(prompts):
                raise ValueError(f"{len(prompts)} choices expected, one per prompt")
        except _SHAPE_ERRORS as e:
            raise self._malformed("/completions", e, out) from None
        if any(not c.get("logprobs") for c in choices):
            raise NotYetSupportedError(
                f"{self.base_url}/completions answered an echo request without logprobs; scoring "
                "(select) needs a server that returns them (vLLM, llmir) or Endpoint"
            )
        return choices

    def _server_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """An llmir server renders it (``/apply_chat_template`` at the root); a server without the
        route cannot (``NotYetSupportedError``: pass ``tokenizer=``). Other failures (wrong key,
        server down) are ``RemoteBackendError``s that say so."""
        url = self._root + "/apply_chat_template"
        r = self._request("POST", url, {"messages": messages, "add_generation_prompt": add_generation_prompt})
        if r.status_code in (404, 405, 501):
            return super()._server_chat_template(messages, add_generation_prompt)
        if r.status_code != 200:
            raise self._fail(url, r)
        return self._text_of(url, self._answer(url, r))


_HTTP_OPTIONS = ("tokenizer", "timeout", "max_workers", "verify")


def _sglang_openai_model(
    name: str | None, second: bool | None, is_chat_model: bool | None
) -> tuple[str, bool | None]:
    """(model, is_chat_model) of SGLang's ``OpenAI(model_name, is_chat_model=None, ...)``."""
    if name is None:
        raise InvalidRequestError('OpenAI needs the model: OpenAI(base_url, model) or OpenAI("model-name")')
    if "://" in name:
        raise InvalidRequestError(
            f"OpenAI({name!r}) needs the model too: OpenAI(base_url, model), or SGLang's "
            f'OpenAI("model-name", base_url={name!r})'
        )
    if second is not None:  # SGLang's second positional parameter
        if not isinstance(second, bool) or (is_chat_model is not None and is_chat_model != second):
            raise InvalidRequestError(
                f"OpenAI({name!r}, {second!r}): the second argument is the model name or is_chat_model"
            )
        is_chat_model = second
    return name, is_chat_model


def _refuse_openai_options(
    is_chat_model: bool | None, chat_template: Any, is_azure: bool, http: dict
) -> None:
    """SGLang's OpenAI options this backend cannot honour, and openai-client options it lacks."""
    if is_chat_model:
        raise NotYetSupportedError(
            "OpenAI(is_chat_model=True): this backend speaks /v1/completions only (it renders roles "
            "through the chat template itself); leave is_chat_model out for a server that serves "
            "the model on /v1/completions (vLLM, SGLang, llmir), or run the program on SGLang"
        )
    if chat_template is not None:
        raise NotYetSupportedError(
            "OpenAI(chat_template=...): roles render through the model's own template; pass "
            "tokenizer= (its Hugging Face tokenizer or path) when the server cannot render it"
        )
    if is_azure:
        raise NotYetSupportedError(
            "OpenAI(is_azure=True): Azure OpenAI is not supported; give base_url= instead"
        )
    unknown = sorted(set(http) - set(_HTTP_OPTIONS))
    if unknown:
        raise InvalidRequestError(
            f"OpenAI got unknown option(s) {unknown}; it takes base_url, api_key, constraints and "
            f"{', '.join(_HTTP_OPTIONS)}"
        )


def _refused_limit(e: RemoteBackendError) -> int | None:
    """The limit an llmir server gave when it refused a max_tokens above it, else None."""
    m = re.search(r"above this server's limit of (\d+)", e.detail) if e.status == 400 else None
    return int(m.group(1)) if m else None


def _refuses_echo(e: RemoteBackendError) -> bool:
    """Whether a server's refusal of a scoring request says it lacks the feature (echo, logprobs,
    max_tokens 0, token-id prompts), rather than a key, model, or server failure."""
    if e.status == 501:
        return True
    return e.status in (400, 422) and re.search(r"echo|logprob|max_tokens|prompt", e.detail, re.I) is not None
