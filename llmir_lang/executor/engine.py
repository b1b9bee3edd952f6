"""The embedded engine: a background loop that schedules, runs the model and samples.

Public API: ``Engine(model=None, device=None, dtype=None, kv_memory=None)``, ``generate``,
``submit`` (thread-safe, returns a future), ``score``, ``stats``, ``shutdown``.

Here: construction, abort, stats and shutdown; submission is in ``engine_submit.py`` (the futures
it returns in ``engine_futures.py``), scoring in ``engine_score.py``, the loop in ``engine_loop.py``.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from llmir_lang.errors import EngineClosedError, InvalidRequestError, OutOfKVMemoryError
from llmir_lang.executor.engine_futures import EngineCall
from llmir_lang.executor.engine_loop import CLOSED_MESSAGE, EngineLoop, run_engine_thread
from llmir_lang.executor.engine_output import OutputProcessor
from llmir_lang.executor.engine_score import EngineScoring
from llmir_lang.executor.engine_setup import (
    check_bool,
    check_int,
    make_backend,
    parse_memory,
    resolve_device,
)
from llmir_lang.executor.engine_submit import EngineSubmission, Prompt
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
from llmir_lang.executor.tokenizer import Tokenizer

DEFAULT_DRAFT_TOKENS = 3  # prompt-lookup draft length on the CPU (speculate.py)


class Engine(EngineSubmission, EngineScoring, EngineLoop):
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

    def score(self, prompt: Prompt, continuations: Sequence[Prompt]) -> list[list[float]]:
        """Per-token logprobs of each continuation after ``prompt`` (``EngineScoring.score``).
        Raises EngineError when called from a stream callback, where it would deadlock."""
        self._refuse_wait_on_engine_thread("Engine.score()")
        return super().score(prompt, continuations)

    # ---- housekeeping -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters and sizes, read on the engine thread between steps (a consistent snapshot).

        ``requests``: ``submitted``, ``finished`` by finish reason (``stop``, ``length``,
        ``abort``, ``constraint_error``), ``failed`` (the future raised, or the result's finish
        reason is "error") and ``in_flight`` (queued, running, or its result not delivered yet);
        ``submitted == sum(finished.values()) + failed + in_flight`` at every read. A chain is one
        request; a ``score`` call is one prefill-only request plus one per continuation of two or
        more tokens after the first such one, each finishing with "length"; a request refused at
        submission is not counted (``engine_counts.py``)."""
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
            "requests": self.outputs.counts.snapshot(),
        }

    def call_in_engine_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result."""
        if threading.current_thread() is self._thread:
            return fn()  # already there (e.g. from a stream callback): queuing would deadlock
        call = EngineCall(fn)
        with self._lock:
            if self._closed:
                raise EngineClosedError(CLOSED_MESSAGE)
            self._inbox.put(call)
        return self._wait(call.future)

    def abort(self, rid: int) -> bool:
        """Cancel a request (e.g. its client went away): it ends with finish_reason "abort", its
        future resolves to what it produced so far, and its KV goes back to the cache. Returns
        False if the request was unknown or already finished."""
        if self._closed:
            return False
        try:
            return self.call_in_engine_thread(lambda: self._abort_now(rid))
        except EngineClosedError:  # shut down meanwhile: nothing left to abort
            return False

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
