"""The engine as the server's routes see it: async submit, stream and abort.

``EngineService`` owns the bridge between the engine thread and the event loop:

- ``run`` submits one request and awaits its result; while it waits it watches the client, and a
  client that disconnects gets its request aborted (``Engine.abort``: generation stops and the
  request's KV goes back to the radix cache, unlocked), so a dropped client costs no more compute.
- ``stream`` yields ``StreamChunk``s as the engine produces them, then the ``GenerateResult``.
  The engine calls back on its own thread; chunks cross to the loop with ``call_soon_threadsafe``.
  If the consumer stops early (the client disconnected, the response task was cancelled) the
  generator's ``finally`` aborts the request.
- Constraints (regex / JSON schema / grammar specs) compile off the loop, once per spec (the
  compiler caches), and each request gets a fresh matcher.

Invariant: every request this service submits is either finished by the engine or aborted by
the service; ``active`` holds exactly the ones still running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from llmir_lang.executor.request import GenerateResult, StreamChunk
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.server.config import ServerConfig
from llmir_lang.server.errors import ClientDisconnectedError, ServerHTTPError

# How often a waiting non-streaming request checks that its client is still there.
DISCONNECT_POLL_S = 0.25


@dataclass(slots=True)
class Submission:
    """One generation: a prompt (text or token ids), sampling params, an optional constraint spec."""

    prompt: str | list[int]
    params: SamplingParams
    constraint: Any = None
    logprob_start_len: int = -1


@dataclass(slots=True)
class ServiceCounters:
    requests: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    started_at: float = field(default_factory=time.time)


class EngineService:
    """Async front of one ``Engine`` (see the module docstring). Loop-thread only, except where
    noted; the engine itself is thread-safe."""

    def __init__(self, engine: Any, config: ServerConfig, *, owns_engine: bool = True) -> None:
        from llmir_lang.executor.backend import EngineBackend

        self.engine = engine
        self.config = config
        self.owns_engine = owns_engine
        self.backend = EngineBackend(engine)  # chains for /program
        self.model_name = config.model_name(engine.model_path)
        self.counters = ServiceCounters()
        self.active: dict[int, float] = {}  # rid -> submit time
        self.closing = False
        self._compiler: Any = None
        # engine.abort blocks until the engine thread runs it; never block the loop on it
        self._aborts = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmir-abort")
        self._compile_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmir-compile")
        self.programs = ThreadPoolExecutor(
            max_workers=config.program_workers, thread_name_prefix="llmir-program"
        )

    # --- limits ------------------------------------------------------------------------------
    def max_tokens(self, requested: int | None, default: int | None = None) -> int:
        """The ``max_new_tokens`` to use: the request's own (checked against the limit), else
        ``default`` (else the server default) capped by the limit."""
        limit = self.config.max_tokens_limit
        if requested is None:
            chosen = default if default is not None else self.config.default_max_tokens
            return min(chosen, limit) if limit is not None else chosen
        if requested < 0:
            raise ServerHTTPError(400, f"max_tokens must be >= 0, got {requested}")
        if limit is not None and requested > limit:
            raise ServerHTTPError(
                400,
                f"max_tokens {requested} is above this server's limit of {limit}; ask for at most {limit}",
            )
        return requested

    # --- constraints -------------------------------------------------------------------------
    def _new_matcher(self, spec: Any) -> Any:
        if self._compiler is None:
            from llmir_lang.executor.constraints import ConstraintCompiler, TokenizerInfo

            eng = self.engine
            info = TokenizerInfo.from_hf(
                eng.tokenizer.hf, vocab_size=eng.config.vocab_size, eos_token_ids=eng.tokenizer.eos_token_ids
            )
            self._compiler = ConstraintCompiler(info)
        return self._compiler.compile(spec).new_matcher()

    async def matcher(self, spec: Any) -> Any:
        if spec is None:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._compile_pool, self._new_matcher, spec)

    # --- running -----------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.closing:
            raise ServerHTTPError(503, "the server is shutting down; retry on another server", "unavailable")

    def _submit(self, sub: Submission, matcher: Any, stream: Any = None) -> Any:
        self.check_open()
        fut = self.engine.submit(
            sub.prompt, sub.params, stream=stream, logprob_start_len=sub.logprob_start_len, matcher=matcher
        )
        self.counters.requests += 1
        self.active[fut.rid] = time.monotonic()
        return fut

    def _done(self, rid: int, result: GenerateResult | None, aborted: bool = False) -> None:
        self.active.pop(rid, None)
        if aborted or (result is not None and result.finish_reason == "abort"):
            self.counters.aborted += 1
        elif result is None:
            self.counters.failed += 1
            self.counters.aborted += 1
        else:
            self.counters.finished += 1

    def abort(self, rid: int) -> None:
        """Abort ``rid`` without blocking the caller (safe from any thread)."""
        if rid in self.active:
            self._aborts.submit(self.engine.abort, rid)

    async def run(self, sub: Submission, request: Request | None = None) -> GenerateResult:
        """Run one request to the end; aborts it if ``request``'s client disconnects."""
        matcher = await self.matcher(sub.constraint)
        fut = self._submit(sub, matcher)
        rid = fut.rid
        waiter = asyncio.wrap_future(fut)
        result: GenerateResult | None = None
        aborted = False
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
                if done:
                    result = waiter.result()
                    return result
                if request is not None and await request.is_disconnected():
                    aborted = True
                    raise ClientDisconnectedError(f"request {rid}: the client disconnected; aborted")
        except asyncio.CancelledError:
            aborted = True
            raise
        finally:
            if aborted:
                self.abort(rid)
            if result is None and not waiter.done():
                waiter.cancel()
            self._done(rid, result, aborted)

    async def run_many(self, subs: list[Submission], request: Request | None = None) -> list[GenerateResult]:
        """A batch: all requests are submitted before any is awaited, so the engine batches them.
        One watcher checks the client (concurrent ``receive`` calls would race); if it leaves,
        or one request fails, the others are cancelled, which aborts them."""
        tasks = [asyncio.ensure_future(self.run(s)) for s in subs]
        gathered = asyncio.gather(*tasks)
        try:
            while True:
                done, _ = await asyncio.wait({gathered}, timeout=DISCONNECT_POLL_S)
                if done:
                    return list(gathered.result())
                if request is not None and await request.is_disconnected():
                    raise ClientDisconnectedError(f"the client disconnected; {len(subs)} requests aborted")
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    async def stream(self, sub: Submission) -> AsyncIterator[StreamChunk | GenerateResult]:
        """Chunks as they come, then the final ``GenerateResult``. Closing the generator early
        (client gone) aborts the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamChunk] = asyncio.Queue()

        def push(chunk: StreamChunk) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        matcher = await self.matcher(sub.constraint)
        fut = self._submit(sub, matcher, stream=push)
        rid = fut.rid
        waiter = asyncio.wrap_future(fut)
        result: GenerateResult | None = None
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
                    break
            result = await waiter
            yield result
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            # result None: the consumer stopped early (abort), or the engine failed (waiter done)
            stopped_early = result is None and not waiter.done()
            if stopped_early:
                self.abort(rid)
                waiter.cancel()
            elif result is None and not waiter.cancelled() and waiter.exception() is None:
                result = waiter.result()  # finished; the consumer left before reading the result
            self._done(rid, result, stopped_early)

    # --- housekeeping ------------------------------------------------------------------------
    async def engine_stats(self) -> dict[str, Any]:
        """Engine counters plus what is running inside it (read on the engine thread)."""
        eng = self.engine

        def read() -> dict[str, Any]:
            stats = eng.stats()  # on the engine thread: a direct read
            stats["engine_requests"] = len(eng.scheduler.all_requests())
            return stats

        loop = asyncio.get_running_loop()
        stats = await loop.run_in_executor(None, eng.call_in_engine_thread, read)
        c = self.counters
        stats["server"] = {
            "active_requests": len(self.active),
            "requests": c.requests,
            "finished": c.finished,
            "aborted": c.aborted,
            "failed": c.failed,
            "uptime_s": round(time.time() - c.started_at, 3),
        }
        return stats

    def close(self) -> None:
        """Stop taking requests; shut the engine down if this service created it."""
        self.closing = True
        self.programs.shutdown(wait=False, cancel_futures=True)
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self._aborts.shutdown(wait=True)
        if self.owns_engine:
            self.engine.shutdown()
