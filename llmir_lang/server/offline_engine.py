"""SGLang's offline ``Engine``: ``llmir.Engine(model_path=..., **server_args)``.

``generate(prompt, sampling_params, ...)`` answers what an llmir server's ``/generate`` answers
for the same request, because it is the same code: the request is validated as the route's body
(``GenerateRequest``: an unknown or mistyped field is refused, naming it) and answered by
``server.sglang_generate.generate_answer`` over an ``EngineService`` on a loop thread of its own
(``service_loop.py``), so a batch is submitted at once and runs batched. The route's HTTP errors
become the library's typed errors for a Python caller: a 400 is an ``InvalidRequestError``, a 501
a ``FeatureNotSupportedError``, a refusal at shutdown an ``EngineClosedError``, each with the
field at fault in ``param`` (``prompt`` where the route says ``text``).

Streams (``stream=True``) yield SGLang's chunks: ``text`` is the whole text so far, as SGLang's
``Engine`` and ``/generate`` give it (SGLang's own tests print ``output["text"][offset:]``); the
last chunk is the full answer. ``Engine(stream_output=True)`` (SGLang's ``ServerArgs`` switch,
also ``incremental_streaming_output``) makes each chunk's ``text`` the new piece only.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any, NoReturn

from llmir_lang.dsl.errors import FeatureNotSupportedError
from llmir_lang.dsl.runtime import load_engine, server_info
from llmir_lang.errors import EngineClosedError, InvalidRequestError
from llmir_lang.server.service_loop import ServiceLoop, named

Answer = dict[str, Any] | list[dict[str, Any]]
_END = object()  # what _next returns once a stream has no more events
_STREAM_OUTPUT = ("stream_output", "incremental_streaming_output")  # SGLang's names, old and new
# generate()'s arguments that are /generate's body fields of the same name (None: the default)
_BODY_FIELDS = (
    "input_ids", "sampling_params", "image_data", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "stream", "rid", "return_text_in_logprobs",
)  # fmt: skip


def refuse_embeddings(what: str) -> NoReturn:
    raise FeatureNotSupportedError(
        f"{what}() computes embeddings, which llmir_lang does not support (it serves generation "
        "models only); use generate(..., return_logprob=True) for token logprobs, or an SGLang "
        "server started with --is-embedding for embeddings"
    )


class Engine:
    """SGLang's offline engine (``sgl.Engine``) on llmir's embedded engine.

    ``model_path``: a checkpoint folder or a Hugging Face hub id in the local cache (None: the
    bundled model). ``server_args``: SGLang's ``ServerArgs`` keywords, translated as ``Runtime``
    translates them (``mem_fraction_static``, ``random_seed``, ``disable_radix_cache``, ...), or
    the embedded engine's own options (``kv_memory``, ``device``, ...). A context manager; call
    ``shutdown()`` when done (an Engine dropped without it is freed)."""

    def __init__(self, model_path: str | None = None, **server_args: Any) -> None:
        stream_output = [server_args.pop(k) for k in _STREAM_OUTPUT if k in server_args]
        if any(not isinstance(v, bool) for v in stream_output):
            raise InvalidRequestError(f"Engine(stream_output=...) is True or False, got {stream_output[0]!r}")
        engine = load_engine(None, model_path, server_args, "Engine")
        self._start(engine, owns_engine=True, stream_output=any(stream_output))

    @classmethod
    def over(cls, engine: Any, stream_output: bool = False) -> Engine:
        """An offline Engine on an existing executor ``Engine``, which it does not shut down
        (``Runtime.generate`` uses one)."""
        self = cls.__new__(cls)
        self._start(engine, owns_engine=False, stream_output=stream_output)
        return self

    def _start(self, engine: Any, owns_engine: bool, stream_output: bool) -> None:
        self.engine = engine  # llmir_lang.executor.engine.Engine
        self.stream_output = stream_output
        self._runner = ServiceLoop(engine, owns_engine)
        # a dropped Engine stops its loop thread (and the engine, if it made it)
        self._finalizer = weakref.finalize(self, self._runner.close)

    # --- generation --------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        image_data: Any = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        token_ids_logprob: Any = None,
        lora_path: Any = None,
        custom_logit_processor: Any = None,
        return_hidden_states: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
        return_text_in_logprobs: bool = False,
    ) -> Answer | Iterator[dict[str, Any]]:
        """One prompt's answer ``{"text", "output_ids", "meta_info"}``, a list of them for a batch
        (``prompt`` a list of texts, or ``input_ids`` a list of lists), or with ``stream=True`` an
        iterator of chunks (module docstring). ``sampling_params``: one dict for every prompt or
        one per prompt, with SGLang's keys. Bad input raises before anything runs; closing a
        stream early aborts its request. SGLang's ``lora_path``, ``custom_logit_processor``,
        ``return_hidden_states`` and ``token_ids_logprob`` are refused when given."""
        body = self._body(locals())
        if body.stream:
            return _Stream(self, self._runner.call(self._primed(body)))
        return self._runner.call(self._answer(body))

    async def async_generate(self, *args: Any, **kwargs: Any) -> Answer | AsyncIterator[dict[str, Any]]:
        """``generate`` for asyncio: ``await engine.async_generate(...)`` is the answer, and with
        ``stream=True`` an async iterator of chunks (``async for c in await ...``), as in SGLang.
        Cancelling the awaiting task aborts the requests. Takes ``generate``'s arguments."""
        call = _GENERATE_ARGS.bind(self, *args, **kwargs)
        call.apply_defaults()
        body = self._body(call.arguments)
        if body.stream:
            return _AsyncStream(self, await self._runner.acall(self._primed(body)))
        return await self._runner.acall(self._answer(body))

    def encode(self, prompt: Any, *args: Any, **kwargs: Any) -> NoReturn:
        """SGLang's embedding API: refused (``FeatureNotSupportedError``)."""
        refuse_embeddings("Engine.encode")

    # --- SGLang's other Engine methods -------------------------------------------------------
    def flush_cache(self) -> None:
        """Drop every cached prefix that no running request holds."""
        self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        """The model, device, dtype, context length and the engine's counters."""
        return server_info(self.engine)

    def get_tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer."""
        return self.engine.tokenizer.hf

    def shutdown(self) -> None:
        """Abort what still runs (its callers get ``EngineClosedError``), stop the loop thread and
        the engine (unless it was given to ``over``). Idempotent."""
        self._finalizer()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # --- the request, and the loop it runs on ------------------------------------------------
    def _body(self, args: dict[str, Any]) -> Any:
        """The ``/generate`` body of a ``generate`` call's arguments, validated as the route
        validates it; refusals name the argument (``prompt``, ``sampling_params.0.top_k``)."""
        from pydantic import ValidationError

        from llmir_lang.server.errors import describe_validation, validation_param
        from llmir_lang.server.protocol import GenerateRequest

        self._runner.check_open()
        for name in ("token_ids_logprob", "lora_path", "custom_logit_processor", "return_hidden_states"):
            if args[name] not in (None, False):
                raise named(
                    FeatureNotSupportedError(f"{name} is not supported by llmir's engine; leave it out"), name
                )
        given = {"text": args["prompt"], **{k: args[k] for k in _BODY_FIELDS}}
        try:
            return GenerateRequest.model_validate({k: _lists(v) for k, v in given.items() if v is not None})
        except ValidationError as e:
            renamed = _PromptNamed(e)
            raise named(
                InvalidRequestError(describe_validation(renamed)), validation_param(renamed)
            ) from None

    async def _answer(self, body: Any) -> Answer:
        from llmir_lang.server.sglang_generate import generate_answer

        return await generate_answer(self._runner.service, body, None, "prompt")  # type: ignore[return-value]

    async def _primed(self, body: Any) -> AsyncIterator[dict[str, Any]]:
        """The stream's events, run up to the first, so that the engine's refusal of the prompt
        raises at the call (as the route answers it with an error status)."""
        from llmir_lang.server.convert import prime

        return await prime(await self._answer(body))  # type: ignore[arg-type]


_GENERATE_ARGS = inspect.signature(Engine.generate)
Engine.async_generate.__signature__ = _GENERATE_ARGS.replace(  # type: ignore[attr-defined]
    return_annotation="Answer | AsyncIterator[dict[str, Any]]"
)


class _Chunks:
    """The chunks of one stream, read from ``events`` (the route's stream, on the engine's loop):
    as the route streams them, or (``stream_output``) with ``text`` cut to what the chunk adds.
    Closing it, or dropping it, before its end aborts its request (it would otherwise run on to
    ``max_new_tokens`` for nobody)."""

    def __init__(self, owner: Engine, events: Any) -> None:
        self._owner = owner
        self._events = events
        self._incremental = owner.stream_output
        self._sent = 0  # characters of text sent so far
        self._done = False

    def _shaped(self, event: Any) -> dict[str, Any] | None:
        """``event`` as it goes out; None at the end."""
        if event is _END:
            self._done = True
            return None
        if not self._incremental:
            return event
        text = event["text"]
        event = {**event, "text": text[self._sent :]}
        self._sent = len(text)
        return event

    def close(self) -> None:
        """Stop reading; a request still running is aborted."""
        if not self._done:
            self._done = True
            self._abort()

    def _end_on_error(self) -> None:
        """A read raised (an error of the stream, an interrupt, a cancel): the stream ends. An
        interrupt or cancel that lands after the chunk came (its task had finished, so cancelling
        it stopped nothing) leaves the request running: abort it (a no-op for a stream that
        ended)."""
        self._done = True
        self._abort()

    def _abort(self) -> None:
        runner = self._owner._runner
        if not runner.closed:  # (a shutdown ends every stream)
            try:
                runner.submit(_aclose(self._events))
            except (RuntimeError, EngineClosedError):  # closed meanwhile
                pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # (at interpreter exit)
            pass


class _Stream(_Chunks, Iterator[dict[str, Any]]):
    """What ``generate(stream=True)`` returns; also a context manager that closes it."""

    def __next__(self) -> dict[str, Any]:
        if self._done:
            raise StopIteration
        try:
            event = self._shaped(self._owner._runner.call(_next(self._events)))
        except BaseException:
            self._end_on_error()
            raise
        if event is None:
            raise StopIteration
        return event

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _AsyncStream(_Chunks, AsyncIterator[dict[str, Any]]):
    """What ``await async_generate(stream=True)`` returns; ``aclose()`` closes it."""

    async def __anext__(self) -> dict[str, Any]:
        if self._done:
            raise StopAsyncIteration
        try:
            event = self._shaped(await self._owner._runner.acall(_next(self._events)))
        except BaseException:
            self._end_on_error()
            raise
        if event is None:
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        self.close()


async def _next(events: AsyncIterator[dict[str, Any]]) -> Any:
    try:
        return await events.__anext__()
    except StopAsyncIteration:  # (a coroutine must not raise it into its task)
        return _END


async def _aclose(events: Any) -> None:
    await events.aclose()


def _lists(value: Any) -> Any:
    """Tuples as lists, at any depth (the request is JSON-shaped: a tuple of prompts is a list)."""
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


class _PromptNamed:
    """A validation error of the body, with its ``text`` field called ``prompt`` (this API's name)."""

    def __init__(self, exc: Any) -> None:
        self.exc = exc

    def errors(self) -> list[dict[str, Any]]:
        out = []
        for err in self.exc.errors():
            loc = tuple(err.get("loc", ()))
            out.append({**err, "loc": ("prompt", *loc[1:]) if loc[:1] == ("text",) else loc})
        return out
