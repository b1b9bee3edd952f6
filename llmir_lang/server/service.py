"""The engine as the server's routes see it: async submit, stream and abort.

``EngineService`` owns the bridge between the engine thread and the event loop:

- ``run`` submits one request and awaits its result; while it waits it watches the client, and a
  client that disconnects gets its request aborted (``Engine.abort``: generation stops and the
  request's KV goes back to the radix cache, unlocked), so a dropped client costs no more compute.
- ``stream`` yields ``StreamChunk``s as the engine produces them, then the ``GenerateResult``.
  The engine calls back on its own thread; chunks cross to the loop with ``call_soon_threadsafe``.
  If the consumer stops early (the client disconnected, the response task was cancelled) the
  generator's ``finally`` aborts the request.
  With ``return_logprob`` each chunk comes with its tokens' logprobs (``LoggedChunk``).
- ``/program`` runs get a ``ProgramRun``: every engine request the run submits is recorded, so a
  client that disconnects gets the whole run aborted, like any other request.
- Constraints (regex / JSON schema / grammar specs) compile off the loop, once per spec (the
  compiler caches), and each request gets a fresh matcher.
- Shutdown: ``begin_shutdown(grace)`` (called by ``llmir serve`` when SIGTERM / SIGINT arrives)
  refuses new requests with 503 and, ``grace`` seconds later, aborts whatever still runs; those
  requests are answered with a 503 ``server_shutting_down`` (streams: a last event with
  finish_reason ``abort``), before the ASGI server would cancel their tasks.

Invariant: every request this service submits is either finished by the engine or aborted by
the service; ``active`` holds exactly the ones still running.

What runs and its counters, aborts, stats and shutdown are ``ServiceLifecycle``'s
(``service_lifecycle.py``); a ``/program`` run's requests are a ``ProgramRun`` (``program_run.py``);
stream logprobs are ``chunk_logprobs.py``'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from llmir_lang.errors import (
    ConstraintError,
    EmptyPromptError,
    InvalidRequestError,
    PromptTooLongError,
)
from llmir_lang.executor.request import GenerateResult, StreamChunk
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.server.chunk_logprobs import LoggedChunk as LoggedChunk
from llmir_lang.server.chunk_logprobs import _ChunkLogprobs
from llmir_lang.server.convert import DISCONNECT_POLL_S
from llmir_lang.server.errors import (
    ClientDisconnectedError,
    ServerHTTPError,
    blame,
    shutting_down,
    with_param,
)
from llmir_lang.server.program_run import ProgramEngine as ProgramEngine
from llmir_lang.server.program_run import ProgramRun as ProgramRun
from llmir_lang.server.service_lifecycle import ServiceCounters as ServiceCounters
from llmir_lang.server.service_lifecycle import ServiceLifecycle

SHUTDOWN_ABORTED = " and stopped this request before it finished (--shutdown-timeout)"


@dataclass(slots=True)
class Submission:
    """One generation: a prompt (text or token ids), sampling params, an optional constraint spec.

    ``prompt_param`` and ``constraint_param``: the request fields the prompt and the constraint
    came from (``text``, ``messages``, ``regex``, ...), named by the errors the engine and the
    constraint compiler raise for them at submission (the ``param`` of the error body)."""

    prompt: str | list[int]
    params: SamplingParams
    constraint: Any = None
    logprob_start_len: int = -1
    prompt_param: str | None = None
    constraint_param: str | None = None


class EngineService(ServiceLifecycle):
    """Async front of one ``Engine`` (see the module docstring). Loop-thread only, except where
    noted; the engine itself is thread-safe."""

    # --- limits ------------------------------------------------------------------------------
    def max_tokens(self, requested: int | None, default: int | None = None, field: str = "max_tokens") -> int:
        """The ``max_new_tokens`` to use: the request's own (checked against the limit), else
        ``default`` (else the server default) capped by the limit. ``field``: the request field
        ``requested`` came from, which the errors name."""
        limit = self.config.max_tokens_limit
        if requested is None:
            chosen = default if default is not None else self.config.default_max_tokens
            return min(chosen, limit) if limit is not None else chosen
        if requested < 0:
            raise ServerHTTPError(400, f"{field} must be >= 0, got {requested}", param=field)
        if limit is not None and requested > limit:
            raise ServerHTTPError(
                400,
                f"{field} {requested} is above this server's limit of {limit}; ask for at most {limit}",
                param=field,
            )
        return requested

    # --- constraints -------------------------------------------------------------------------
    def compiler(self) -> Any:
        """The constraint compiler of the served model, shared by every route and program (it
        caches compiled specs)."""
        if self._compiler is None:
            from llmir_lang.executor.constraints import ConstraintCompiler, TokenizerInfo

            eng = self.engine
            info = TokenizerInfo.from_hf(
                eng.tokenizer, vocab_size=eng.config.vocab_size, eos_token_ids=eng.tokenizer.eos_token_ids
            )
            self._compiler = ConstraintCompiler(info)
        return self._compiler

    def _new_matcher(self, spec: Any) -> Any:
        return self.compiler().compile(spec).new_matcher()

    async def matcher(self, spec: Any, param: str | None = None) -> Any:
        """A fresh matcher of ``spec`` (None for None); its compile errors name ``param``, the
        request field the spec came from."""
        if spec is None:
            return None
        loop = asyncio.get_running_loop()
        with blame(param, ConstraintError):
            return await loop.run_in_executor(self._compile_pool, self._new_matcher, spec)

    # --- running -----------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model not in (self.model_name, str(self.engine.model_path)):
            raise ServerHTTPError(
                404,
                f"model {model!r} is not served here; this server serves {self.model_name!r}",
                "model_not_found",
                "model",
                "model_not_found",
            )

    def _submit(self, sub: Submission, matcher: Any, stream: Any = None) -> Any:
        self.check_open()
        try:
            fut = self.engine.submit(
                sub.prompt,
                sub.params,
                stream=stream,
                logprob_start_len=sub.logprob_start_len,
                matcher=matcher,
            )
        except InvalidRequestError as e:
            raise with_param(e, self._refused_field(sub, e)) from None
        self.counters.requests += 1
        self.active[fut.rid] = time.monotonic()
        return fut

    def _refused_field(self, sub: Submission, exc: InvalidRequestError) -> str | None:
        """The request field behind the engine's refusal of ``sub`` at submission: the prompt
        (empty, too long for the context, text that does not tokenize, token ids outside the
        vocabulary), or ``logprob_start_len`` (not inside the prompt); None for anything else. Its
        sampling params were checked when they were built (``convert.sampling_params``)."""
        if isinstance(exc, (EmptyPromptError, PromptTooLongError)):
            return sub.prompt_param
        try:  # on this failure path only: what the engine does first with the prompt
            ids = self.engine.encode(sub.prompt)
        except InvalidRequestError:
            return sub.prompt_param
        if sub.logprob_start_len >= len(ids):
            return "logprob_start_len"
        return None

    async def watch(self, waiter: asyncio.Future, request: Request | None, what: str) -> Any:
        """``waiter``'s result; raises ``ClientDisconnectedError`` as soon as ``request``'s client
        is gone (checked every ``DISCONNECT_POLL_S``), leaving the abort to the caller."""
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if done:
                return waiter.result()
            if request is not None and await request.is_disconnected():
                raise ClientDisconnectedError(f"{what}: the client disconnected; aborted")

    def _aborted_by_shutdown(self, result: GenerateResult | None) -> bool:
        return self.stopping and result is not None and result.finish_reason == "abort"

    async def run(self, sub: Submission, request: Request | None = None) -> GenerateResult:
        """Run one request to the end; aborts it if ``request``'s client disconnects. A request
        the shutdown aborted is a 503."""
        matcher = await self.matcher(sub.constraint, sub.constraint_param)
        fut = self._submit(sub, matcher)
        rid = fut.rid
        waiter = _loop_waiter(fut)
        result: GenerateResult | None = None
        aborted = False
        try:
            result = await self.watch(waiter, request, f"request {rid}")
        except (asyncio.CancelledError, ClientDisconnectedError):
            aborted = True
            raise
        finally:
            if aborted:
                self.abort(rid)
            if result is None and not waiter.done():
                waiter.cancel()
            self._done(rid, result, aborted)
        if self._aborted_by_shutdown(result):
            raise shutting_down(SHUTDOWN_ABORTED)
        return result

    async def run_many(self, subs: list[Submission], request: Request | None = None) -> list[GenerateResult]:
        """A batch: all requests are submitted before any is awaited, so the engine batches them.
        One watcher checks the client (concurrent ``receive`` calls would race); if it leaves,
        or one request fails, the others are cancelled, which aborts them."""
        tasks = [asyncio.ensure_future(self.run(s)) for s in subs]
        gathered = asyncio.gather(*tasks)
        try:
            return list(await self.watch(gathered, request, f"a batch of {len(subs)} requests"))
        except BaseException:
            for t in tasks:
                t.cancel()
            # the outcome (a failure, or the cancellations) is already being raised: mark it read
            gathered.add_done_callback(_consume)
            raise

    async def stream(self, sub: Submission) -> AsyncIterator[StreamChunk | GenerateResult]:
        """Chunks as they come (``LoggedChunk``s with ``return_logprob``), then the final
        ``GenerateResult``. Closing the generator early (client gone) aborts the request. A
        request the shutdown aborted ends with finish_reason ``abort`` and an error message."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamChunk] = asyncio.Queue()
        logged = _ChunkLogprobs(self.engine) if sub.params.return_logprob else None

        def push(chunk: StreamChunk) -> None:  # engine thread
            if logged is not None:
                chunk = logged.attach(chunk)
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        matcher = await self.matcher(sub.constraint, sub.constraint_param)
        fut = self._submit(sub, matcher, stream=push)
        rid = fut.rid
        waiter = _loop_waiter(fut)
        result: GenerateResult | None = None
        final: StreamChunk | None = None  # the last chunk, once it was yielded
        getter: asyncio.Future | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    # finished without a final chunk (the engine stops calling a broken consumer)
                    while not queue.empty():
                        yield queue.get_nowait()
                    break
                chunk = getter.result()
                yield chunk
                if chunk.finished:
                    final = chunk
                    break
            result = await waiter
            if self._aborted_by_shutdown(result) and result.error is None:
                # the words of the 503 a plain request gets (the OpenAI routes send it as an error event)
                result.error = shutting_down(SHUTDOWN_ABORTED).message
            yield result
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            # result None: the consumer stopped early, or the engine failed the request. The
            # engine's own future tells which (the waiter lags it, and is cancelled when the task
            # is cancelled while it awaits the result after the final chunk)
            resolved = fut.done() and not fut.cancelled()
            if result is None and resolved and fut.exception() is None:
                result = fut.result()  # finished; the consumer left before reading the result
            stopped_early = result is None and not resolved and final is None
            if stopped_early:
                self.abort(rid)
            waiter.cancel()  # only the loop's side: the engine's future is left to the engine
            if result is None and not resolved and final is not None:
                # it ended (its final chunk went out) and the engine is about to set its result
                self._count(rid, "aborted" if final.finish_reason == "abort" else "finished")
            else:
                self._done(rid, result, stopped_early)


def _loop_waiter(fut: Future) -> asyncio.Future:
    """An asyncio future of the running loop that gets ``fut``'s outcome (the engine resolves
    ``fut`` on its own thread).

    Unlike ``asyncio.wrap_future``, cancelling it (a request task cancelled, a client gone) never
    cancels ``fut``: a request is stopped with ``Engine.abort``, and a cancel landing between the
    engine's ``done()`` check and its ``set_result`` made the engine thread raise
    ``InvalidStateError``, which failed the request (and, with deferred text work, as on CUDA,
    every other request of that step)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def copy(done: Future) -> None:  # loop thread
        if waiter.done():
            return  # cancelled: nobody waits for the outcome
        exc = done.exception()
        if exc is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(done.result())

    def on_done(done: Future) -> None:  # engine thread (or this one, when already resolved)
        try:
            if done.cancelled():
                loop.call_soon_threadsafe(waiter.cancel)
            else:
                loop.call_soon_threadsafe(copy, done)
        except RuntimeError:  # the loop is closed: nobody waits for the outcome any more
            pass

    fut.add_done_callback(on_done)
    return waiter


def _consume(fut: asyncio.Future) -> None:
    """Retrieve a future's outcome that nobody awaits any more (no "never retrieved" log)."""
    if not fut.cancelled():
        fut.exception()
