"""The backend interface between the program interpreter and whatever runs the model.

A backend takes ``ChainRequest``s: a prompt text followed by steps, each a generation or a constant
text. A chain with several steps runs as ONE engine request: constant text between generations is
appended as forced tokens (one extend, no return to Python). A chain with one gen step is a plain
call. ``EngineBackend`` runs chains on the embedded engine; remote backends (SGLang /generate,
OpenAI) implement the same interface.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from llmir_lang.errors import EngineClosedError, InvalidRequestError
from llmir_lang.executor.sampling_params import SamplingParams

_SCORE_POOL: ThreadPoolExecutor | None = None
_SCORE_POOL_LOCK = threading.Lock()


def score_pool() -> ThreadPoolExecutor:
    """Threads that wait on blocking ``score`` calls (remote backends answer one call at a time),
    shared by every backend so that many selects can wait at once."""
    global _SCORE_POOL
    with _SCORE_POOL_LOCK:
        if _SCORE_POOL is None:
            _SCORE_POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="llmir-select")
        return _SCORE_POOL


@dataclass(slots=True)
class GenStep:
    """One generation inside a chain. ``constraint`` is a constraints.ConstraintSpec or None."""

    name: str | None
    params: SamplingParams = field(default_factory=SamplingParams)
    constraint: Any = None
    # >= 0: report the prompt's token logprobs from this token on (``StepResult.prompt_logprobs``);
    # only a chain's first gen may ask (a later one's prompt is the chain's own output)
    logprob_start_len: int = -1


@dataclass(slots=True)
class ChainRequest:
    """``prompt`` (already rendered: roles are template text) then ``steps`` in order.

    A ``str`` step is constant text forced after the previous generation. ``pin`` asks the backend to
    keep the prompt's KV cached until ``unpin`` (the optimizer's prefix-share plan).
    """

    prompt: str
    steps: list[GenStep | str]
    pin: bool = False


@dataclass(slots=True)
class StepResult:
    name: str | None
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[float] | None = None
    # with ``top_logprobs_num``: each generated position's most likely ``(token id, logprob)`` pairs
    # (the id None where the backend's API gives texts, not ids: OpenAI's)
    top_logprobs: list[list[tuple[int | None, float]]] | None = None
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # the texts the backend gave for the generated tokens and for each top alternative, parallel to
    # ``logprobs`` / ``top_logprobs`` (OpenAI's API: texts instead of ids); None where it gave none
    token_texts: list[str] | None = None
    top_texts: list[list[str]] | None = None
    # with ``GenStep.logprob_start_len``: ``(token id, logprob)`` for each prompt token from there
    # on, the first without a logprob (None); ids None and ``prompt_texts`` given where the
    # backend's API gives texts
    prompt_logprobs: list[tuple[int | None, float | None]] | None = None
    prompt_texts: list[str] | None = None
    # what ended a ``"stop"``: the stop string, the stop regex's pattern or the token id (None:
    # the end of text, a constraint's end, or a backend that does not say)
    matched_stop: str | int | None = None


@dataclass(slots=True)
class ChainResult:
    steps: list[StepResult]  # one per GenStep, in order
    text: str  # everything appended after the prompt: generations and constant texts
    error: str | None = None  # set when the chain failed; steps then holds what finished
    # the exception behind ``error`` when there is one (the engine shut down, a network failure):
    # the DSL chains it to the error it raises, so callers can catch it by type
    exception: BaseException | None = None


ChunkCallback = Callable[[int, str], None]  # (index of the gen step, new text)


class Backend(ABC):
    """Runs chains and scores continuations. Implementations are thread-safe.

    ``shares_prefix_in_batch``: True when requests submitted together that share a prompt prefix
    have that prefix computed once by the backend itself (the embedded engine's scheduler defers
    the others a step and serves them from its radix cache). The evaluator then submits them at
    once instead of prefilling the prefix first and waiting for it (one round trip saved).
    """

    shares_prefix_in_batch: bool = False

    @abstractmethod
    def submit(self, request: ChainRequest, on_chunk: ChunkCallback | None = None) -> Future:
        """Start one chain; the future resolves to a ChainResult (never raises for model errors:
        those are reported in ``ChainResult.error``). Bad input raises here, before any model step."""

    def run(self, requests: Sequence[ChainRequest]) -> list[ChainResult]:
        """Run many chains together (they batch in the engine) and wait for all."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    @abstractmethod
    def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        """Per-token logprobs of each continuation after ``prompt``, in one batched call."""

    def score_async(self, prompt: str, continuations: Sequence[str]) -> Future:
        """``score`` started now, its result in the returned future (a select of a batch uses it
        to score while the others are submitted). This default runs ``score`` on a shared pool of
        waiting threads; the embedded engine submits its requests at once and waits on none."""
        return score_pool().submit(self.score, prompt, continuations)

    @abstractmethod
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The model's own chat template."""

    def token_ids(self, text: str) -> list[int] | None:
        """``text``'s token ids as ``score`` tokenizes a continuation (no special tokens), or None
        where the backend cannot tell (meta info then carries None for the ids)."""
        return None

    def token_text(self, token_id: int) -> str | None:
        """One token's text (``return_text_in_logprobs``), or None where the backend cannot tell."""
        return None

    def unpin(self, prompt: str) -> None:  # noqa: B027 - optional
        """Release a prefix pinned by ``ChainRequest.pin``."""

    def abort_requests(self, futures: Iterable[Future]) -> None:  # noqa: B027 - optional
        """Stop generating the chains behind ``futures`` (returned by ``submit``) where the backend
        can: an interrupted or cancelled run calls it. Those already finished are left alone."""

    def stats(self) -> dict[str, Any]:
        return {}


class EngineBackend(Backend):
    """Runs chains on the embedded engine (``Engine()`` with no arguments = the bundled model)."""

    shares_prefix_in_batch = True

    def __init__(self, engine: Any = None, **engine_options: Any):
        if engine is None:
            from llmir_lang.executor.engine import Engine

            engine = Engine(**engine_options)
        self.engine = engine
        self._compiler: Any = None

    # constraints are compiled lazily, once per spec (the compiler caches)
    def _matcher(self, spec: Any) -> tuple[Any, str | None]:
        if spec is None:
            return None, None
        compiled = self.compile(spec)
        return compiled.new_matcher(), compiled.engine

    def compile(self, spec: Any) -> Any:
        """The compiled constraint of ``spec`` for this engine's tokenizer (cached: a later request
        with the same spec reuses it). Raises the constraint's typed error if it cannot be used.
        An ``Engine`` compiles it (``Engine.compile_constraint``: one cache for this backend and the
        engine's own API)."""
        try:
            from llmir_lang.executor.constraints import ConstraintCompiler, TokenizerInfo
        except ImportError as e:
            from llmir_lang.errors import NotYetSupportedError

            raise NotYetSupportedError(f"constrained generation is not available in this build ({e})") from None
        engine_compile = getattr(self.engine, "compile_constraint", None)
        if callable(engine_compile):
            return engine_compile(spec)
        if self._compiler is None:
            eng = self.engine
            info = TokenizerInfo.from_hf(
                eng.tokenizer, vocab_size=eng.config.vocab_size, eos_token_ids=eng.tokenizer.eos_token_ids
            )
            self._compiler = ConstraintCompiler(info)
        return self._compiler.compile(spec)

    def submit(self, request: ChainRequest, on_chunk: ChunkCallback | None = None) -> Future:
        steps: list[tuple] = []
        names: list[str | None] = []
        engines: list[str | None] = []
        for step in request.steps:
            if isinstance(step, str):
                steps.append(("text", step))
            else:
                try:
                    matcher, engine_name = self._matcher(step.constraint)
                except Exception as e:
                    e.chain_step = len(names)  # type: ignore[attr-defined]  # which gen is bad
                    raise
                steps.append(("gen", step.params, matcher))
                names.append(step.name)
                engines.append(engine_name)
        stream = None
        if on_chunk is not None:

            def stream(chunk: Any) -> None:
                if chunk.text:
                    on_chunk(chunk.index, chunk.text)

        lead = ""  # constant text before the first generation joins the prompt inside the engine
        for step in request.steps:
            if not isinstance(step, str):
                break
            lead += step
        start, prompt_ids = _prompt_logprob_start(request), None
        if start >= 0:  # the ids the engine encodes too: the first reported token is one of them
            prompt_ids = self.engine.encode(request.prompt + lead)
        inner = self.engine.submit_chain(request.prompt, steps, stream=stream, logprob_start_len=start)
        from llmir_lang.executor.engine_futures import _RequestFuture

        # cancelling it aborts the engine's request, and counts as done for ``wait``/``as_completed``
        outer: Future = _RequestFuture(getattr(self.engine, "_thread", None), inner.cancel)

        def done(f: Future) -> None:
            # runs on the engine thread: whatever happens, ``outer`` must resolve
            try:
                outer.set_result(_chain_result(f, names, engines, lead, start, prompt_ids))
            except Exception as e:
                if not outer.done():
                    outer.set_result(ChainResult(steps=[], text="", error=f"{type(e).__name__}: {e}", exception=e))

        inner.add_done_callback(done)
        outer.rid = getattr(inner, "rid", None)  # type: ignore[attr-defined]  # for abort_requests
        return outer

    def abort_requests(self, futures: Iterable[Future]) -> None:
        """Abort the engine requests behind ``futures``, all in one turn of the engine thread."""
        rids = [rid for f in futures if (rid := getattr(f, "rid", None)) is not None]
        engine = self.engine
        if not rids or getattr(engine, "_closed", False):
            return
        try:
            engine.call_in_engine_thread(lambda: [engine.abort(rid) for rid in rids])
        except EngineClosedError:
            pass  # the engine is gone, and every request with it

    def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        return self.engine.score(prompt, list(continuations))

    def score_async(self, prompt: str, continuations: Sequence[str]) -> Future:
        return self.engine.score_async(prompt, list(continuations))

    def token_ids(self, text: str) -> list[int] | None:
        return self.engine.tokenizer.encode(text, add_special_tokens=False)

    def token_text(self, token_id: int) -> str | None:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt
        )

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()


def _prompt_logprob_start(request: ChainRequest) -> int:
    """The chain's ``logprob_start_len``: its first gen's; a later gen cannot ask (its prompt is
    the chain's own output, whose logprobs the engine does not report as a prompt's)."""
    gens = [step for step in request.steps if not isinstance(step, str)]
    if any(step.logprob_start_len >= 0 for step in gens[1:]):
        raise InvalidRequestError(
            "only a chain's first gen may ask for its prompt's logprobs (logprob_start_len); send "
            "a gen that does as a request of its own"
        )
    return gens[0].logprob_start_len if gens else -1


def _chain_result(
    f: Future, names: list, engines: list, lead: str, start: int = -1, prompt_ids: list[int] | None = None
) -> ChainResult:
    try:
        res = f.result()
    except Exception as e:  # engine failure: reported on the result, never raised
        return ChainResult(steps=[], text="", error=f"{type(e).__name__}: {e}", exception=e)
    results = []
    for i, r in enumerate(res.meta.get("steps", [res])):
        meta = {k: v for k, v in r.meta.items() if k not in ("steps", "chain_text")}
        meta["constraint_engine"] = engines[i] if i < len(engines) else None
        prompt_lps: list[tuple[int | None, float | None]] | None = None
        if i == 0 and prompt_ids is not None and r.prompt_logprobs is not None and 0 <= start < len(prompt_ids):
            # SGLang's shape: from token ``start`` on, the first without a logprob
            prompt_lps = [(prompt_ids[start], None), *r.prompt_logprobs]
        results.append(
            StepResult(
                name=names[i] if i < len(names) else None,
                text=r.text,
                token_ids=r.token_ids,
                finish_reason=r.finish_reason,
                prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens,
                cached_tokens=r.cached_tokens,
                logprobs=r.logprobs,
                top_logprobs=r.top_logprobs,
                error=r.error,
                meta=meta,
                prompt_logprobs=prompt_lps,
                matched_stop=r.matched_stop,
            )
        )
    error = next((r.error for r in results if r.error), None)
    return ChainResult(steps=results, text=lead + res.meta.get("chain_text", res.text), error=error)
