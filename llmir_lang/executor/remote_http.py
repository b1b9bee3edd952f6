"""The HTTP base of the remote backends: ``_HTTPBackend``, a pooled client whose requests are
bounded as a whole by ``timeout`` (a streamed body included), JSON calls, server-sent events, an
abortable long call, and the ``Backend`` side (chains run on a thread pool, one request a step).
The errors it reports come from ``remote_errors``, token ids from ``remote_tokens``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx

from llmir_lang.errors import InvalidRequestError, NotYetSupportedError
from llmir_lang.executor.backend import Backend, ChainRequest, ChainResult, ChunkCallback, GenStep, StepResult
from llmir_lang.executor.remote_errors import (
    ChainAborted,
    RemoteBackendError,
    _excerpt,
    _ServerErrors,
    _stream_error_status,
)
from llmir_lang.executor.remote_tokens import _ServerTokens
from llmir_lang.executor.sampling_params import SamplingParams

_FINISH_OK = ("stop", "length")
# What a gen that does not set max_tokens asks for (SamplingParams' default). A remote backend
# cannot tell it from an explicit max_tokens of the same value; see ``Endpoint._lower`` and
# ``OpenAI._generate`` for how a server's lower limit is honoured for it.
_DEFAULT_MAX_TOKENS = SamplingParams().max_new_tokens


def _non_default(fields: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """``{name: (value, default)}`` -> the fields whose value differs from the default."""
    return {k: v for k, (v, default) in fields.items() if v != default}


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


class _HTTPBackend(_ServerTokens, _ServerErrors, Backend):
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
        if not isinstance(base_url, str) or not base_url.lower().startswith(("http://", "https://")):
            raise InvalidRequestError(
                f"{type(self).__name__}: the server's URL must start with http:// or https:// "
                f"(such as 'http://127.0.0.1:30000'), got {base_url!r}"
            )
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
        self._no_tokenize = False  # /tokenize is absent (404 / 405) or unreadable (remote_tokens)
        self._tokenize_failures = 0  # unreadable /tokenize answers in a row
        self._tokenize_paused_until = 0.0  # /tokenize is not asked before (time.monotonic())
        self._tokenize_warned = False
        self._tokenize_fields: dict[str, Any] = {}  # extra /tokenize fields (OpenAI: the model)

    # --- HTTP ------------------------------------------------------------------------------
    @property
    def _root(self) -> str:
        """The server's root URL (where ``/tokenize`` and llmir's extensions live)."""
        return self.base_url

    def _url(self, path: str) -> str:
        return path if "://" in path else self.base_url + path

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
