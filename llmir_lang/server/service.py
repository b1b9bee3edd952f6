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
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from llmir_lang.errors import (
    ConstraintError,
    EmptyPromptError,
    EngineClosedError,
    InvalidRequestError,
    PromptTooLongError,
)
from llmir_lang.executor.request import GenerateResult, StreamChunk
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.server.config import ServerConfig
from llmir_lang.server.convert import DISCONNECT_POLL_S, TopAligner
from llmir_lang.server.errors import (
    ClientDisconnectedError,
    ServerHTTPError,
    blame,
    shutting_down,
    with_param,
)

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


@dataclass(slots=True)
class LoggedChunk(StreamChunk):
    """A ``StreamChunk`` of a request with ``return_logprob``, with the logprobs (and top
    alternatives, when asked) of the tokens ``logprob_ids``: every token whose logprob was not sent
    yet. They can lag behind ``token_ids`` (the first chunk comes before the engine's record of
    the request can be read); the final ``GenerateResult`` has them all."""

    logprob_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] | None = None


class ProgramRun:
    """The engine requests of one ``/program`` run, so that the run can be aborted as a whole
    (its client left, the server is stopping). Once cancelled, the run's requests are aborted and
    it cannot submit new ones, so it ends at once with per-state failures. Thread-safe."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.rids: set[int] = set()
        self.cancelled = False
        self.reason = ""
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise if the run was cancelled (called before each new engine request)."""
        if self.cancelled:
            raise EngineClosedError(f"the program was aborted: {self.reason}")

    def track(self, fut: Future) -> Future:
        rid = fut.rid  # type: ignore[attr-defined]
        with self._lock:
            late = self.cancelled
            if not late:
                self.rids.add(rid)
        if late:  # cancelled while this request was being submitted
            self._abort(rid)
        else:
            fut.add_done_callback(lambda _: self._forget(rid))
        return fut

    def _forget(self, rid: int) -> None:
        with self._lock:
            self.rids.discard(rid)

    def cancel(self, reason: str) -> None:
        """Abort every request of the run (blocks until the engine did; call it off the loop)."""
        with self._lock:
            self.cancelled = True
            self.reason = self.reason or reason
            rids = list(self.rids)
        for rid in rids:
            self._abort(rid)

    def _abort(self, rid: int) -> None:
        try:
            self.engine.abort(rid)
        except EngineClosedError:
            pass  # the engine is gone, and every request with it


class ProgramEngine:
    """The served engine as one ``/program`` run sees it: every request it submits is recorded in
    the ``ProgramRun`` (see there); everything else is the engine's own."""

    def __init__(self, engine: Any, run: ProgramRun) -> None:
        self._engine = engine
        self._run = run

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def submit(self, *args: Any, **kwargs: Any) -> Future:
        self._run.check()
        return self._run.track(self._engine.submit(*args, **kwargs))

    def submit_chain(self, *args: Any, **kwargs: Any) -> Future:
        self._run.check()
        return self._run.track(self._engine.submit_chain(*args, **kwargs))

    def score(self, *args: Any, **kwargs: Any) -> list[list[float]]:
        self._run.check()  # a scoring call is prefill only: it is not aborted once it started
        return self._engine.score(*args, **kwargs)


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
        self.runs: set[ProgramRun] = set()  # /program runs in flight
        self.closing = False  # refusing new requests (shutdown began)
        self.stopping = False  # the shutdown grace period is over: in-flight requests are aborted
        self._aborts_open = True
        self._compiler: Any = None
        # engine.abort blocks until the engine thread runs it; never block the loop on it
        self._aborts = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmir-abort")
        self._compile_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmir-compile")
        self.programs = ThreadPoolExecutor(
            max_workers=config.program_workers, thread_name_prefix="llmir-program"
        )

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
                eng.tokenizer.hf, vocab_size=eng.config.vocab_size, eos_token_ids=eng.tokenizer.eos_token_ids
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
    def check_open(self) -> None:
        if self.closing:
            raise shutting_down()

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

    def _done(self, rid: int, result: GenerateResult | None, aborted: bool = False) -> None:
        """Count ``rid`` once, in one of ``finished``, ``aborted`` (its client left, the shutdown
        stopped it) or ``failed`` (no result: the engine failed it), so that once nothing runs
        ``requests == finished + aborted + failed``."""
        if aborted or (result is not None and result.finish_reason == "abort"):
            self._count(rid, "aborted")
        else:
            self._count(rid, "failed" if result is None else "finished")

    def _count(self, rid: int, outcome: str) -> None:
        self.active.pop(rid, None)
        setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)

    def abort(self, rid: int) -> None:
        """Abort ``rid`` without blocking the caller (loop thread). After ``close`` it does nothing:
        the engine's shutdown ends every request."""
        if rid in self.active:
            self._in_background(self.engine.abort, rid)

    def _in_background(self, fn: Any, *args: Any) -> None:
        if not self._aborts_open:
            return
        try:
            self._aborts.submit(fn, *args)
        except RuntimeError:  # the pool is shutting down (close): nothing left to abort
            pass

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
            "active_requests": len(self.active) + len(self.runs),
            "requests": c.requests,
            "finished": c.finished,
            "aborted": c.aborted,
            "failed": c.failed,
            "uptime_s": round(time.time() - c.started_at, 3),
        }
        return stats

    # --- programs ----------------------------------------------------------------------------
    def start_program(self) -> ProgramRun:
        self.check_open()
        run = ProgramRun(self.engine)
        self.runs.add(run)
        self.counters.requests += 1
        return run

    def cancel_program(self, run: ProgramRun, reason: str) -> None:
        """Abort ``run``'s requests without blocking the loop."""
        run.cancelled = True  # new requests of the run fail from now on
        self._in_background(run.cancel, reason)

    def end_program(self, run: ProgramRun, outcome: str) -> None:
        """``outcome``: ``finished``, ``aborted`` or ``failed``."""
        self.runs.discard(run)
        c = self.counters
        if outcome == "finished":
            c.finished += 1
        elif outcome == "aborted":
            c.aborted += 1
        else:
            c.failed += 1

    # --- shutdown ----------------------------------------------------------------------------
    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new requests now; abort those still running ``grace_s`` seconds from now (loop
        thread)."""
        self.closing = True
        asyncio.get_running_loop().call_later(max(0.0, grace_s), self.abort_all)

    def abort_all(self) -> None:
        """Abort every request still running; they are answered as shut down (503 / a last
        ``abort`` event)."""
        self.closing = self.stopping = True
        for rid in list(self.active):
            self.abort(rid)
        for run in list(self.runs):
            self.cancel_program(run, "the server is shutting down")

    def close(self) -> None:
        """Stop taking requests, abort what still runs, shut the engine down if this service
        created it."""
        self.abort_all()
        self.programs.shutdown(wait=False, cancel_futures=True)
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self._aborts_open = False  # from now on abort() is a no-op: the engine's shutdown ends all
        self._aborts.shutdown(wait=True)
        if self.owns_engine:
            self.engine.shutdown()


class _ChunkLogprobs:
    """Attaches to each chunk of one stream the logprobs of its tokens not sent yet, read from
    the engine's record of the request (on the engine thread, where the engine writes it, between
    steps). The record is not in the scheduler's lists while the request's prompt is being
    prefilled, so the first chunk's logprobs usually come with the second."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.req: Any = None
        self.sent = 0  # tokens whose logprobs were attached
        self.tops = TopAligner()

    def attach(self, chunk: StreamChunk) -> StreamChunk:
        if self.req is None:
            self.req = next((r for r in self.engine.scheduler.all_requests() if r.rid == chunk.rid), None)
            if self.req is None:
                return chunk
        req = self.req
        # NOTE: the tokens are the record's, as its logprobs are. A jump-forward that re-tokenizes
        # the output's end with the forced text ("f" + "alse" -> "false") streams its chunk before
        # the new tokens replace the old ones (``rebase_to``, applied after the step): the chunk's
        # token_ids still had the sampled "f", which was paired with the logprob and alternatives
        # of "false", and the streamed tokens no longer spelled the text nor matched the answer.
        ids = req.rebase_to[1] if req.rebase_to is not None else req.output_ids
        end = min(len(req.out_logprobs), len(ids))
        start, self.sent = self.sent, max(self.sent, end)
        new_ids = list(ids[start:end])
        tops = None
        if req.params.top_logprobs_num:  # one list per token, also for jump-forward's tokens
            tops = self.tops.take(
                new_ids, req.out_logprobs[start:end], req.out_top_logprobs, len(req.out_logprobs)
            )
        return LoggedChunk(
            chunk.rid,
            chunk.text,
            chunk.token_ids,
            chunk.finished,
            chunk.finish_reason,
            chunk.index,
            logprob_ids=new_ids,
            logprobs=list(req.out_logprobs[start:end]),
            top_logprobs=list(tops) if tops is not None else None,
        )


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
