"""Submission (any thread): prompts to token ids, sampling parameters and constraints checked,
requests and chains queued for the engine thread, ``generate`` waiting for their results.

``Engine`` inherits this. Needs of the engine: ``tokenizer``, ``config``, ``pool``, ``sampler``,
``device``, ``outputs``, the inbox and its lock (``_inbox``, ``_lock``, ``_closed``), ``_rids``,
``_thread``, the constraint compiler (``_compiler``, ``_compiler_lock``), and ``_wait``,
``_abort_soon`` and ``_refuse_wait_on_engine_thread``.
"""

from __future__ import annotations

import queue
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from llmir_lang.errors import (
    EmptyPromptError,
    EngineClosedError,
    InvalidRequestError,
    OutOfKVMemoryError,
    PromptTooLongError,
)
from llmir_lang.executor.engine_futures import _ChunkStream, _RequestFuture
from llmir_lang.executor.engine_loop import CLOSED_MESSAGE
from llmir_lang.executor.request import GenerateResult, Req, StreamChunk
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.executor.tokenizer import IncrementalDecoder, lone_surrogate

if TYPE_CHECKING:
    from llmir_lang.executor.engine_output import OutputProcessor
    from llmir_lang.executor.kv_pool import KVPool
    from llmir_lang.executor.model_config import ModelConfig
    from llmir_lang.executor.sampler import Sampler
    from llmir_lang.executor.tokenizer import Tokenizer

Prompt = str | Sequence[int]  # or a 1-D torch tensor / numpy array of token ids
ParamsLike = SamplingParams | dict | None


class EngineSubmission:
    tokenizer: Tokenizer
    config: ModelConfig
    pool: KVPool
    sampler: Sampler
    device: torch.device
    outputs: OutputProcessor
    _inbox: queue.Queue
    _lock: threading.Lock
    _closed: bool
    _rids: Iterator[int]
    _thread: threading.Thread
    _compiler: Any
    _compiler_lock: threading.Lock
    _wait: Callable[[Future], Any]
    _abort_soon: Callable[[int], None]
    _refuse_wait_on_engine_thread: Callable[[str], None]

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
                    self.tokenizer,
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
            raise EngineClosedError(CLOSED_MESSAGE)
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
                raise EngineClosedError(CLOSED_MESSAGE)
            self.outputs.counts.submitted += 1  # before the engine thread can see (and end) it
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
