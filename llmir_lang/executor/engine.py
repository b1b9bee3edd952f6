"""The embedded engine: a background loop that schedules, runs the model and samples.

Public API: ``Engine(model=None, device=None, dtype=None, kv_memory=None)``, ``generate``,
``submit`` (thread-safe, returns a future), ``score``, ``stats``, ``shutdown``.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

import torch

from llmir_lang.errors import (
    EmptyPromptError,
    EngineClosedError,
    EngineError,
    InvalidRequestError,
    OutOfKVMemoryError,
    PromptTooLongError,
)
from llmir_lang.executor.engine_loop import EngineLoop, engine_thread_error, run_engine_thread
from llmir_lang.executor.engine_output import OutputProcessor
from llmir_lang.executor.engine_score import EngineScoring
from llmir_lang.executor.engine_setup import (
    check_bool,
    check_int,
    make_backend,
    parse_memory,
    resolve_device,
)
from llmir_lang.executor.kv_pool import KVPool
from llmir_lang.executor.loader import load_model, resolve_dtype, resolve_model_path
from llmir_lang.executor.model_config import ModelConfig
from llmir_lang.executor.model_runner import ModelRunner
from llmir_lang.executor.radix_cache import RadixCache
from llmir_lang.executor.request import FinishReason, GenerateResult, Req, StreamChunk
from llmir_lang.executor.run_ahead import run_ahead_default
from llmir_lang.executor.sampler import Sampler
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.executor.scheduler import Scheduler, SchedulerConfig
from llmir_lang.executor.tokenizer import IncrementalDecoder, Tokenizer, lone_surrogate

Prompt = str | Sequence[int]  # or a 1-D torch tensor / numpy array of token ids
ParamsLike = SamplingParams | dict | None
DEFAULT_DRAFT_TOKENS = 3  # prompt-lookup draft length on the CPU (speculate.py)


class Engine(EngineScoring, EngineLoop):
    """Runs generation requests on a local Llama-family model with continuous batching.

    Thread-safe: any thread may call ``submit``/``generate``/``score``; one background thread owns
    the model, the KV pool and the radix cache. Stream callbacks run on that thread: they may
    ``submit``, ``abort`` or ``shutdown``, but a wait there (``generate``, ``score``, a request's
    ``future.result()``) raises EngineError instead of deadlocking the engine.

    Every numeric argument is checked (type and range) before the model loads: a bad one is an
    InvalidRequestError naming it. An engine dropped without ``shutdown()`` is collected like any
    object; its thread stops and its requests still running fail with EngineClosedError.
    """

    def __init__(
        self,
        model: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        kv_memory: int | float | str | None = None,
        *,
        page_size: int = 1,
        max_running_requests: int = 256,
        max_prefill_tokens: int | None = None,
        chunked_prefill_size: int | None = None,
        enable_prefix_cache: bool = True,
        attention_backend: str = "auto",
        jump_forward: bool = True,
        max_mixed_extend: int = 8,
        speculative_draft_tokens: int | None = None,
        speculative_max_batch: int = 4,
        cuda_graphs: bool = True,
        compile_model: bool | None = None,
        run_ahead: bool | None = None,
        seed: int = 0,
    ):
        # bad sizes used to pass and break every request later: max_running_requests=0 or
        # max_prefill_tokens=-1 made them wait forever, chunked_prefill_size=-5 failed them all
        check_int("page_size", page_size, 1)
        check_int("max_running_requests", max_running_requests, 1)
        check_int("max_prefill_tokens", max_prefill_tokens, 1, none_ok=True)
        check_int("chunked_prefill_size", chunked_prefill_size, 1, none_ok=True)
        check_int("max_mixed_extend", max_mixed_extend, 0, hint=" (0 turns mixed steps off)")
        off = " (0 turns speculation off)"
        check_int("speculative_draft_tokens", speculative_draft_tokens, 0, none_ok=True, hint=off)
        check_int("speculative_max_batch", speculative_max_batch, 0, hint=off)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidRequestError(f"seed must be an int, got {seed!r}")
        for name, flag in (
            ("enable_prefix_cache", enable_prefix_cache),
            ("jump_forward", jump_forward),
            ("cuda_graphs", cuda_graphs),
        ):
            check_bool(name, flag)
        check_bool("compile_model", compile_model, none_ok=True)
        check_bool("run_ahead", run_ahead, none_ok=True)
        if attention_backend not in ("auto", "torch", "triton"):
            raise InvalidRequestError(
                f"unknown attention_backend {attention_backend!r}; use 'auto', 'torch' or 'triton'"
            )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_path = resolve_model_path(model)
        # the config and the tokenizer before the weights: a checkpoint without usable tokenizer
        # files fails in a moment, not after the whole weight load
        early = ModelConfig.from_folder(self.model_path)
        self.tokenizer = Tokenizer(self.model_path, early.eos_token_ids, early.vocab_size)
        self.model = load_model(self.model_path, self.device, self.dtype)
        self.config = self.model.config
        budget = parse_memory(kv_memory, self.device)
        cfg = self.config
        try:
            self.pool = KVPool.from_memory_budget(
                budget, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device, page_size
            )
        except torch.OutOfMemoryError as e:  # type: ignore[attr-defined]
            raise OutOfKVMemoryError(
                f"allocating {budget / 2**30:.2f} GiB of KV cache ran out of GPU memory ({e}); "
                "lower kv_memory (e.g. kv_memory=0.5 or '4GiB')"
            ) from None
        self.cache = RadixCache(self.pool, disable=not enable_prefix_cache)
        on_cpu = self.device.type == "cpu"
        self.scheduler = Scheduler(
            self.pool,
            self.cache,
            SchedulerConfig(
                max_running_requests=max_running_requests,
                max_prefill_tokens=max_prefill_tokens or (4096 if on_cpu else 16384),
                chunked_prefill_size=chunked_prefill_size or (2048 if on_cpu else 8192),
                max_mixed_extend=max_mixed_extend,
                spec_max_batch=speculative_max_batch,
                # on the CPU a token costs more than a step's wait: tree-of-thought's sibling
                # branches share a 4-7 token tail of their parent (1,486 -> 1,294 tokens computed,
                # 7% faster, benchmarks/bench_programs.py); on a GPU the extra tokens are free
                min_shared_prefix=4 if on_cpu else 8,
            ),
        )
        self.backend = make_backend(attention_backend, self.pool, cfg, self.device, max_running_requests)
        self.runner = ModelRunner(
            self.model, self.backend, self.device, cuda_graphs=cuda_graphs, compile_model=compile_model
        )
        # unseeded requests draw from one generator seeded with ``seed``: runs of one engine repeat
        self.sampler = Sampler(cfg.vocab_size, self.device, seed=seed)
        # a proxy: with the processor's back-reference the only cycle through the engine, a dropped
        # engine is freed by reference counting at once, not whenever the cycle collector runs
        self.outputs = OutputProcessor(weakref.proxy(self))
        if speculative_draft_tokens is None:  # measured to pay on the CPU (benchmarks/bench_json.py)
            speculative_draft_tokens = DEFAULT_DRAFT_TOKENS if on_cpu else 0
        self.speculative_draft_tokens = speculative_draft_tokens
        self.seed = seed
        self.jump_forward = jump_forward
        # queue decode step N+1 before reading step N's tokens (run_ahead.py); None: the default
        self.run_ahead = run_ahead_default(self.device.type) if run_ahead is None else bool(run_ahead)
        self._rids = itertools.count()
        # Req to admit, a callable to run between steps on the engine thread, or None to stop
        self._inbox: queue.Queue[Req | Callable[[], None] | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._compiler: Any = None  # constraints.ConstraintCompiler, made at the first constraint
        self._compiler_lock = threading.Lock()
        # the thread reaches the engine through a weak reference only (engine_loop.run_engine_thread)
        self._thread = threading.Thread(
            target=run_engine_thread, args=(weakref.ref(self), self._inbox), name="llmir-engine", daemon=True
        )
        self._thread.start()
        _LIVE.add(self)

    @property
    def speculative_draft_tokens(self) -> int:
        """The longest prompt-lookup draft a decode step verifies (0: speculation off). May be set
        between requests; see ``executor/speculate.py``."""
        return self.outputs.spec.draft_tokens

    @speculative_draft_tokens.setter
    def speculative_draft_tokens(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidRequestError(f"speculative_draft_tokens must be an int >= 0, got {n!r}")
        self.outputs.spec.draft_tokens = n

    # ---- submission (any thread) --------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of ``prompt``: a string (tokenized), or token ids as a sequence of ints or a
        1-D integer tensor / numpy array. Anything else, and a string that is not valid Unicode
        text (a lone surrogate), is an InvalidRequestError."""
        if isinstance(prompt, str):
            bad = lone_surrogate(prompt)
            if bad is not None:  # the tokenizer raised a bare TypeError
                raise InvalidRequestError(
                    f"the prompt has a lone surrogate (U+{ord(bad.group()):04X}) at position "
                    f"{bad.start()}, which is not valid Unicode text and cannot be tokenized (text "
                    "decoded with errors='surrogateescape' holds these); remove or replace it"
                )
            return self.tokenizer.encode(prompt)
        ids = _token_ids(prompt)
        if ids and (min(ids) < 0 or max(ids) >= self.config.vocab_size):
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            raise InvalidRequestError(
                f"token id(s) {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})"
            )
        return ids

    def submit(
        self,
        prompt: Prompt,
        params: ParamsLike = None,
        *,
        stream: Callable[[StreamChunk], None] | None = None,
        logprob_start_len: int = -1,
        matcher: Any = None,
    ) -> Future:
        """Queue one request; the future resolves to a GenerateResult. Bad input raises here.

        ``future.result()`` must not be called from a stream callback (it raises EngineError there:
        the callback runs on the engine thread, which is what resolves the future)."""
        sp = _checked_params(params)
        matcher = self._request_matcher(sp, matcher)
        return self._submit(self.encode(prompt), sp, stream, logprob_start_len, matcher, None, None)

    def compile_constraint(self, spec: Any) -> Any:
        """The ``CompiledConstraint`` of a ``ConstraintSpec`` for this engine's tokenizer (cached by
        spec: a batch sharing one schema compiles it once). Raises the spec's typed
        ``ConstraintError`` (unsupported keyword, bad regex, unsatisfiable, ...) before any model step."""
        with self._compiler_lock:
            if self._compiler is None:
                from llmir_lang.executor.constraints import ConstraintCompiler, TokenizerInfo

                info = TokenizerInfo.from_hf(
                    self.tokenizer.hf,
                    vocab_size=self.config.vocab_size,
                    eos_token_ids=self.tokenizer.eos_token_ids,
                )
                self._compiler = ConstraintCompiler(info)
            compiler = self._compiler
        return compiler.compile(spec)

    def _request_matcher(self, sp: SamplingParams, matcher: Any) -> Any:
        """The matcher of one request: ``matcher=`` as given, or a fresh one for
        ``SamplingParams.constraint`` (a spec is compiled here, at submission). The constraint used
        to be ignored: the request generated free text and finished normally, so output that looked
        constrained was not."""
        constraint = sp.constraint
        if constraint is None:
            return matcher
        if matcher is not None:
            raise InvalidRequestError(
                "the request has two constraints, SamplingParams.constraint and matcher=; give one"
            )
        from llmir_lang.executor.constraints import ConstraintSpec

        if isinstance(constraint, ConstraintSpec):
            return self.compile_constraint(constraint).new_matcher()
        return constraint.new_matcher()  # a CompiledConstraint (SamplingParams.validate checked it)

    def submit_chain(
        self,
        prompt: str,
        steps: Sequence[tuple],
        *,
        stream: Callable[[StreamChunk], None] | None = None,
        logprob_start_len: int = -1,
    ) -> Future:
        """Queue a chain: ``prompt`` then steps ``("gen", params, matcher_or_None)`` (``params``: a
        SamplingParams or a dict, as ``submit`` takes) and ``("text", str)``, run as ONE request.
        ``logprob_start_len`` is ``submit``'s, for the prompt (with the text before the first
        generation): the first generation's result has its prompt logprobs. After each generation the constant text that follows
        is appended as forced tokens in one extend (tokens re-encoded over the whole text, so they are
        the ones a call-by-call run would prefill) and the next generation starts at once. The future
        resolves to the last generation's GenerateResult, with ``meta["steps"]`` (one result per
        generation) and ``meta["chain_text"]`` (everything appended after the prompt)."""
        steps = list(steps)
        while steps and steps[0][0] == "text":
            prompt += steps.pop(0)[1]
        if not any(step[0] == "gen" for step in steps):
            raise InvalidRequestError("a chain needs at least one generation step")
        for k, step in enumerate(steps):
            if step[0] == "gen":
                if len(step) < 2 or not isinstance(step[1], (SamplingParams, dict)):
                    raise InvalidRequestError(
                        f"a chain's gen step is ('gen', params, matcher) with params a SamplingParams "
                        f"or a dict, got {step!r}"
                    )
                sp = _checked_params(step[1])  # a dict is converted and checked as submit does
                matcher = step[2] if len(step) > 2 else None
                if sp.constraint is not None:
                    matcher = self._request_matcher(sp, matcher)
                steps[k] = ("gen", sp, matcher)
            elif step[0] != "text" or not isinstance(step[1], str):
                raise InvalidRequestError(
                    f"a chain step is ('gen', params, matcher) or ('text', str), got {step!r}"
                )
        _, sp, matcher = steps.pop(0)
        return self._submit(self.encode(prompt), sp, stream, logprob_start_len, matcher, steps, prompt)

    def _submit(
        self,
        ids: list[int],
        sp: SamplingParams,
        stream: Callable[[StreamChunk], None] | None,
        logprob_start_len: int,
        matcher: Any,
        chain: list[tuple] | None,
        prompt_text: str | None,
        score_next: list[int] | None = None,
    ) -> Future:
        if self._closed:
            raise EngineClosedError("the engine was shut down; create a new Engine")
        if not ids:
            raise EmptyPromptError("the prompt is empty; give at least one token of text")
        ctx = self.config.context_len
        if len(ids) >= ctx:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the model's context is {ctx}; shorten the prompt"
            )
        need = len(ids) + min(sp.max_new_tokens, ctx - len(ids)) + self.pool.page_size
        if need > self.pool.capacity:
            raise OutOfKVMemoryError(
                f"this request needs {need} KV slots but the pool holds {self.pool.capacity}; "
                "raise kv_memory or lower max_new_tokens"
            )
        if logprob_start_len >= len(ids):
            raise InvalidRequestError(
                f"logprob_start_len {logprob_start_len} must be < prompt length {len(ids)}"
            )
        if sp.return_prompt_logprob and logprob_start_len < 0:
            logprob_start_len = 0
        rid = next(self._rids)
        ref = weakref.ref(self)

        def abort_on_cancel() -> None:
            engine = ref()
            if engine is not None:
                engine._abort_soon(rid)

        fut: Future = _RequestFuture(self._thread, abort_on_cancel)
        req = Req(
            rid=rid,
            prompt_ids=ids,
            params=sp,
            future=fut,
            decoder=IncrementalDecoder(self.tokenizer, sp.skip_special_tokens),
            stream=stream,
            logprob_start_len=logprob_start_len,
            generator=self.sampler.make_generator(sp.seed, self.device) if sp.seed is not None else None,
            matcher=matcher,
            constraint_engine=getattr(matcher, "engine", None) if matcher is not None else None,
            chain=chain,
            prompt_text=prompt_text,
            score_next=score_next,
        )
        fut.rid = rid  # type: ignore[attr-defined]
        # a constraint's forced opening ({"name) is computed with the prompt, not one step each
        # (touches only this new request and its fresh matcher: safe off the engine thread)
        self.outputs.force_start(req)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine was shut down; create a new Engine")
            self._inbox.put(req)
        return fut

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: ParamsLike | Sequence[ParamsLike] = None,
        *,
        stream: bool = False,
        callback: Callable[[StreamChunk], None] | None = None,
    ) -> GenerateResult | list[GenerateResult] | Iterator[StreamChunk]:
        """Generate for one prompt (returns one result) or a list of prompts (a list of results).

        One prompt is a string, a sequence of int token ids, or a 1-D integer tensor / numpy array;
        a batch is a list of those. Every prompt and its parameters are checked before any is
        queued. ``stream=True`` (one prompt) returns an iterator of StreamChunk (``_ChunkStream``):
        it raises what ``generate`` without streaming would (EngineError, EngineClosedError when the
        engine shuts down mid-stream), and closing it early or dropping it aborts the request.
        ``callback`` is called with every chunk of every request from the engine thread.
        """
        single, plist = _prompt_list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(plist):
                raise InvalidRequestError(f"{len(sampling_params)} sampling params for {len(plist)} prompts")
            splist = list(sampling_params)
        else:
            splist = [sampling_params] * len(plist)
        if stream:
            if not single:
                raise InvalidRequestError("stream=True takes one prompt; use callback= for many")
            chunks: queue.Queue[StreamChunk] = queue.Queue()
            return _ChunkStream(self, self.submit(plist[0], splist[0], stream=chunks.put), chunks)
        self._refuse_wait_on_engine_thread("Engine.generate()")
        checked = [(self.encode(p), _checked_params(sp)) for p, sp in zip(plist, splist)]
        # every constraint compiles (or raises its typed error) before any request is queued
        matchers = [self._request_matcher(sp, None) for _, sp in checked]
        futs: list[Future] = []
        try:
            for (ids, sp), matcher in zip(checked, matchers):
                futs.append(self._submit(ids, sp, callback, -1, matcher, None, None))
        except Exception:  # one prompt too long for the model or the pool: queue none of them
            for f in futs:
                self._abort_soon(f.rid)  # type: ignore[attr-defined]
            raise
        results = [self._wait(f) for f in futs]
        return results[0] if single else results

    def score(self, prompt: Prompt, continuations: Sequence[Prompt]) -> list[list[float]]:
        """Per-token logprobs of each continuation after ``prompt`` (``EngineScoring.score``).
        Raises EngineError when called from a stream callback, where it would deadlock."""
        self._refuse_wait_on_engine_thread("Engine.score()")
        return super().score(prompt, continuations)

    # ---- housekeeping -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters and sizes, read on the engine thread between steps (a consistent snapshot)."""
        if not self._closed and threading.current_thread() is not self._thread:
            return self.call_in_engine_thread(self._stats)
        return self._stats()

    def _stats(self) -> dict[str, Any]:
        return {
            "cache": self.cache.stats(),
            "pool": self.pool.stats(),
            "forward_calls": self.runner.num_forward_calls,
            "graph_replays": getattr(self.runner, "num_graph_replays", 0),
            "shared_prefix_steps": getattr(self.runner, "num_shared_prefix_steps", 0),
            "tokens_computed": self.runner.num_tokens_computed,
            "retractions": self.scheduler.num_retractions,
            "steps": self.scheduler.step_count,
            "step_retries": self.num_step_retries,  # failed forwards rerun one request at a time
        }

    def call_in_engine_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result."""
        if threading.current_thread() is self._thread:
            return fn()  # already there (e.g. from a stream callback): queuing would deadlock
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)

        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine was shut down; create a new Engine")
            self._inbox.put(run)
        return self._wait(fut)

    def abort(self, rid: int) -> bool:
        """Cancel a request (e.g. its client went away): it ends with finish_reason "abort", its
        future resolves to what it produced so far, and its KV goes back to the cache. Returns
        False if the request was unknown or already finished."""
        if self._closed:
            return False
        return self.call_in_engine_thread(lambda: self._abort_now(rid))

    def _abort_now(self, rid: int) -> bool:
        sched = self.scheduler
        # NOTE: from a stream callback (engine thread, mid-step) the request may sit in no queue:
        # admitted into the step being processed (it joins ``running`` in after_step), or
        # submitted by the same callback and still in the inbox. Both used to be missed: abort()
        # returned False and the request ran to its end.
        reqs = sched.all_requests()
        if self._batch is not None:
            reqs += self._batch.reqs
        for req in reqs:
            if req.rid == rid and not req.finished:
                sched.apply_rebase(req)
                if not self.outputs.finish(req, FinishReason.ABORT):
                    return False  # ended by a stream callback while queued text work ran
                sched.finish(req, cache_kv=True)
                return True
        with self._inbox.mutex:  # only this thread takes items out: the request stays there
            queued = [x for x in self._inbox.queue if isinstance(x, Req) and x.rid == rid]
        if not queued or queued[0].finished:
            return False
        if not self.outputs.finish(queued[0], FinishReason.ABORT):  # the loop then skips it
            return False
        # a chain whose forced opening held a stop went on to its next generation there, which
        # queued it for that generation's extend: take it out, or the loop runs that step for it
        sched.finish(queued[0], cache_kv=False)
        return True

    def _abort_soon(self, rid: int) -> None:
        """Queue the abort of ``rid`` for the next loop turn without waiting for it: from a stream
        iterator's finalizer, which may run on any thread, the engine thread mid-step included."""
        with self._lock:
            if not self._closed:
                self._inbox.put(lambda: self._abort_now(rid))

    def flush_cache(self) -> None:
        """Drop every unlocked cached prefix."""

        def flush() -> None:
            self.cache.evict(self.cache.evictable_size)

        self.call_in_engine_thread(flush)

    def shutdown(self) -> None:
        """Stop the engine; requests still queued or running fail with EngineClosedError. From a
        stream callback (on the engine thread) it returns at once, and the loop stops after the
        current step; a later call from another thread (the exit hook's) waits for that."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
            self.outputs.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        """Dropped without ``shutdown()``: stop the thread (it holds the engine only through a weak
        reference, so it never keeps it alive) and fail the requests it left, so that no future
        waits forever on an engine that is gone."""
        try:
            if getattr(self, "_thread", None) is None:
                return  # __init__ failed before the thread existed
            was_open = not self._closed
            self.shutdown()
            # the loop read the stop and failed them itself, or saw the engine gone and ended: here
            # no step runs (a step holds the engine, which then could not be collected)
            if was_open and (threading.current_thread() is self._thread or not self._thread.is_alive()):
                self._abort_all()
        except Exception:
            pass


class _RequestFuture(Future):
    """A request's future. Waiting on it from the engine thread (in a stream callback) raises
    EngineError instead of deadlocking the engine: that thread is the one that resolves it.
    A wait with ``timeout=0`` only polls, and is allowed anywhere.

    ``cancel()`` (any thread; also what ``asyncio.wrap_future`` does when the awaiting task is
    cancelled) aborts the request, which would otherwise run on to ``max_new_tokens`` for nobody.
    A cancel that lands between the engine's ``done()`` check and its ``set_result`` is not an
    error: the engine thread raised ``InvalidStateError`` there, which failed the request and, with
    deferred text work (CUDA), the other requests of its step."""

    def __init__(self, engine_thread: threading.Thread, abort: Any = None):
        super().__init__()
        self._engine_thread = engine_thread
        self._abort = abort  # called with no argument once the future is cancelled

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled and self._abort is not None:
            self._abort()
        return cancelled

    def set_result(self, result: Any) -> None:
        try:
            super().set_result(result)
        except InvalidStateError:
            if not self.cancelled():
                raise  # resolved twice: an engine bug
            # cancelled by another thread since the engine checked done(): nobody wants it

    def set_exception(self, exception: BaseException | None) -> None:
        try:
            super().set_exception(exception)
        except InvalidStateError:
            if not self.cancelled():
                raise

    def result(self, timeout: float | None = None) -> Any:
        self._check_thread(timeout, "Future.result()")
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._check_thread(timeout, "Future.exception()")
        return super().exception(timeout)

    def _check_thread(self, timeout: float | None, what: str) -> None:
        if (timeout is None or timeout > 0) and not self.done():
            if threading.current_thread() is self._engine_thread:
                raise engine_thread_error(what)


class _ChunkStream(Iterator[StreamChunk]):
    """What ``generate(stream=True)`` returns: the request's StreamChunks as they come.

    It ends like the request's future: after a final chunk whose future holds an exception (the
    engine failed the request, or was shut down) it raises that exception, as ``generate`` without
    streaming does, instead of ending quietly with finish_reason "error" or "abort". Closing it
    (``close()``, leaving a ``with`` block) before the final chunk, or dropping it, aborts the
    request, which otherwise would run on to ``max_new_tokens`` for nobody."""

    def __init__(self, engine: Engine, fut: Future, chunks: queue.Queue[StreamChunk]):
        self._engine = engine
        self._fut = fut
        self._chunks = chunks
        self._done = False
        self.rid: int = fut.rid  # type: ignore[attr-defined]

    def __iter__(self) -> _ChunkStream:
        return self

    def __next__(self) -> StreamChunk:
        if self._done:
            raise StopIteration
        eng = self._engine
        on_engine_thread = threading.current_thread() is eng._thread
        while True:
            try:
                chunk = self._chunks.get_nowait() if on_engine_thread else self._chunks.get(timeout=0.5)
                break
            except queue.Empty:
                pass
            if self._fut.done():
                if not self._chunks.empty():  # its final chunk is queued before the future resolves
                    continue
                self._done = True  # resolved without a final chunk: it raises or ends here
                eng._wait(self._fut)
                raise StopIteration from None
            if on_engine_thread:
                raise engine_thread_error("iterating a generate(stream=True) iterator")
            if not eng._thread.is_alive():
                self._done = True
                raise EngineError("the engine thread has stopped; create a new Engine")
        if chunk.finished:
            self._done = True
            eng._wait(self._fut)  # resolved right after its final chunk: raises what the request raised
        return chunk

    def close(self) -> None:
        """Stop reading; a request still running is aborted."""
        if not self._done:
            self._done = True
            self._engine._abort_soon(self.rid)

    def __enter__(self) -> _ChunkStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _checked_params(params: ParamsLike) -> SamplingParams:
    """``params`` as validated SamplingParams (a SamplingParams object is validated again: its
    fields may have been set since it was made)."""
    sp = SamplingParams.from_dict(params)
    sp.validate()
    return sp


def _is_array(x: Any) -> bool:
    """A torch tensor or a numpy array (numpy is looked up only if something imported it)."""
    if isinstance(x, torch.Tensor):
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, np.ndarray)


def _token_ids(prompt: Any) -> list[int]:
    """The ids of a prompt given as token ids (see ``Engine.encode``)."""
    if _is_array(prompt):
        if prompt.ndim != 1:
            raise InvalidRequestError(
                f"a prompt of token ids must be 1-D, got an array of shape {tuple(prompt.shape)}; "
                "give a batch as a list of prompts (the rows of a 2-D array may hold padding)"
            )
        if isinstance(prompt, torch.Tensor):
            ints = not (
                prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool
            )
        else:
            ints = prompt.dtype.kind in "iu"
        if not ints:
            raise InvalidRequestError(f"token ids must be integers, got an array of {prompt.dtype}")
        return prompt.tolist()
    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)):
        raise InvalidRequestError(
            "a prompt is a string, a sequence of int token ids or a 1-D integer tensor / numpy array, "
            f"got {type(prompt).__name__}"
        )
    ids = list(prompt)
    if not set(map(type, ids)) <= {int}:  # C-speed check; bool and numpy ints are refused
        bad = next(t for t in ids if type(t) is not int)
        raise InvalidRequestError(
            f"token ids must be Python ints, got {type(bad).__name__} {bad!r}; a prompt is a string "
            "or a sequence of int token ids (numpy or torch ids: pass the 1-D array itself)"
        )
    return ids


def _prompt_list(prompts: Any) -> tuple[bool, list[Any]]:
    """(whether ``prompts`` is one prompt, the prompts). One prompt: a string, a 1-D array, or a
    sequence whose first item is not itself a prompt (``encode`` checks that its items are ints)."""
    if isinstance(prompts, str):
        return True, [prompts]
    if _is_array(prompts):
        return True, [prompts]  # encode refuses any other shape than 1-D
    if not isinstance(prompts, Sequence):
        raise InvalidRequestError(
            "prompts must be a string, a sequence of int token ids, a 1-D tensor / numpy array of "
            f"token ids, or a list of those; got {type(prompts).__name__}"
        )
    if len(prompts) == 0:
        raise EmptyPromptError("the prompt is empty (an empty list is neither a prompt nor a batch)")
    first = prompts[0]
    if isinstance(first, (str, Sequence)) or _is_array(first):
        return False, list(prompts)
    return True, [prompts]


_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _shutdown_live_engines() -> None:
    """Stop every engine still running when the interpreter exits. Its thread is a daemon, so
    without this it may still be inside torch or a tokenizer while the process tears down native
    libraries, and the process then aborts ("terminate called without an active exception",
    exit code 134) in about one script of five that never called ``shutdown()``."""
    for engine in list(_LIVE):
        try:
            engine.shutdown()
        except Exception:
            pass


__all__ = ["Engine", "GenerateResult", "SamplingParams", "StreamChunk", "FinishReason"]
