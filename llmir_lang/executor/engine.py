"""The embedded engine: a background loop that schedules, runs the model and samples.

Public API: ``Engine(model=None, device=None, dtype=None, kv_memory=None)``, ``generate``,
``submit`` (thread-safe, returns a future), ``score``, ``stats``, ``shutdown``.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from llmir_lang.errors import (
    EmptyPromptError,
    EngineClosedError,
    InvalidRequestError,
    OutOfKVMemoryError,
    PromptTooLongError,
)
from llmir_lang.executor.engine_loop import EngineLoop
from llmir_lang.executor.engine_output import OutputProcessor
from llmir_lang.executor.engine_score import EngineScoring
from llmir_lang.executor.engine_setup import default_device, make_backend, parse_memory
from llmir_lang.executor.kv_pool import KVPool
from llmir_lang.executor.loader import load_model, resolve_dtype, resolve_model_path
from llmir_lang.executor.model_runner import ModelRunner
from llmir_lang.executor.radix_cache import RadixCache
from llmir_lang.executor.request import FinishReason, GenerateResult, Req, StreamChunk
from llmir_lang.executor.run_ahead import run_ahead_default
from llmir_lang.executor.sampler import Sampler
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.executor.scheduler import Scheduler, SchedulerConfig
from llmir_lang.executor.tokenizer import IncrementalDecoder, Tokenizer

Prompt = str | Sequence[int]
ParamsLike = SamplingParams | dict | None
DEFAULT_DRAFT_TOKENS = 3  # prompt-lookup draft length on the CPU (speculate.py)


class Engine(EngineScoring, EngineLoop):
    """Runs generation requests on a local Llama-family model with continuous batching.

    Thread-safe: any thread may call ``submit``/``generate``/``score``; one background thread owns
    the model, the KV pool and the radix cache.
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
        if (
            isinstance(max_mixed_extend, bool)
            or not isinstance(max_mixed_extend, int)
            or max_mixed_extend < 0
        ):
            raise InvalidRequestError(
                f"max_mixed_extend must be an int >= 0 (0 turns mixed steps off), got {max_mixed_extend!r}"
            )
        for name, v in (
            ("speculative_draft_tokens", speculative_draft_tokens or 0),
            ("speculative_max_batch", speculative_max_batch),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidRequestError(f"{name} must be an int >= 0 (0 turns speculation off), got {v!r}")
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_path = resolve_model_path(model)
        self.model = load_model(self.model_path, self.device, self.dtype)
        self.config = self.model.config
        self.tokenizer = Tokenizer(self.model_path, self.config.eos_token_ids)
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
        self.sampler = Sampler(cfg.vocab_size, self.device)
        self.outputs = OutputProcessor(self)
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
        self._thread = threading.Thread(target=self._loop, name="llmir-engine", daemon=True)
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
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        ids = list(prompt)
        if not set(map(type, ids)) <= {int}:  # C-speed check; bool and numpy ints are refused
            raise InvalidRequestError("a prompt is a string or a list of int token ids")
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
        """Queue one request; the future resolves to a GenerateResult. Bad input raises here."""
        sp = SamplingParams.from_dict(params) if not isinstance(params, SamplingParams) else params
        sp.validate()
        return self._submit(self.encode(prompt), sp, stream, logprob_start_len, matcher, None, None)

    def submit_chain(
        self,
        prompt: str,
        steps: Sequence[tuple],
        *,
        stream: Callable[[StreamChunk], None] | None = None,
    ) -> Future:
        """Queue a chain: ``prompt`` then steps ``("gen", SamplingParams, matcher_or_None)`` and
        ``("text", str)``, run as ONE request. After each generation the constant text that follows
        is appended as forced tokens in one extend (tokens re-encoded over the whole text, so they are
        the ones a call-by-call run would prefill) and the next generation starts at once. The future
        resolves to the last generation's GenerateResult, with ``meta["steps"]`` (one result per
        generation) and ``meta["chain_text"]`` (everything appended after the prompt)."""
        steps = list(steps)
        while steps and steps[0][0] == "text":
            prompt += steps.pop(0)[1]
        if not any(step[0] == "gen" for step in steps):
            raise InvalidRequestError("a chain needs at least one generation step")
        for step in steps:
            if step[0] == "gen":
                step[1].validate()
            elif step[0] != "text" or not isinstance(step[1], str):
                raise InvalidRequestError(
                    f"a chain step is ('gen', params, matcher) or ('text', str), got {step!r}"
                )
        _, sp, matcher = steps.pop(0)
        return self._submit(self.encode(prompt), sp, stream, -1, matcher, steps, prompt)

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
        fut: Future = Future()
        rid = next(self._rids)
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

        ``stream=True`` (one prompt) returns an iterator of StreamChunk; ``callback`` is called with
        every chunk of every request from the engine thread.
        """
        if not isinstance(prompts, str) and len(prompts) == 0:
            raise EmptyPromptError("the prompt is empty (an empty list is neither a prompt nor a batch)")
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], int)
        )
        plist = [prompts] if single else list(prompts)  # type: ignore[list-item]
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(plist):
                raise InvalidRequestError(f"{len(sampling_params)} sampling params for {len(plist)} prompts")
            splist = list(sampling_params)
        else:
            splist = [sampling_params] * len(plist)
        if stream:
            if not single:
                raise InvalidRequestError("stream=True takes one prompt; use callback= for many")
            return self._stream_iter(plist[0], splist[0])
        futs = [self.submit(p, sp, stream=callback) for p, sp in zip(plist, splist)]
        results = [self._wait(f) for f in futs]
        return results[0] if single else results

    def _stream_iter(self, prompt: Prompt, params: ParamsLike) -> Iterator[StreamChunk]:
        q: queue.Queue[StreamChunk] = queue.Queue()
        fut = self.submit(prompt, params, stream=q.put)
        while True:
            try:
                chunk = q.get(timeout=0.5)
            except queue.Empty:
                if fut.done() and fut.exception() is not None:
                    raise fut.exception() from None  # type: ignore[misc]
                continue
            yield chunk
            if chunk.finished:
                return

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

        def run() -> bool:
            sched = self.scheduler
            for req in sched.all_requests():
                if req.rid == rid and not req.finished:
                    self.outputs.finish(req, FinishReason.ABORT)
                    sched.finish(req, cache_kv=True)
                    return True
            return False

        if self._closed:
            return False
        return self.call_in_engine_thread(run)

    def flush_cache(self) -> None:
        """Drop every unlocked cached prefix."""

        def flush() -> None:
            self.cache.evict(self.cache.evictable_size)

        self.call_in_engine_thread(flush)

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.put(None)
        self._thread.join(timeout=30)
        self.outputs.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
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
