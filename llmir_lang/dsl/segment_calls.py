"""The model calls of a segment, as ``SegmentEvaluator`` starts and completes them: one
``ChainRequest`` per ``gen`` / ``gen.chain`` (a fused chain with a bad gen runs the gens before
it), one score call per ``select`` (or one per choice), their streamed chunks, and what each
result makes of the state: the new text and variables, or the failure of the op.

A gen or select with a ``reasoning`` format (``separate_reasoning``) binds its name to the answer
split off its output and ``<name>_reasoning_content`` to the reasoning, and the state goes on with
the answer (``ir.reasoning``); the backend's cache holds the output, as generated."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from llmir_lang.dsl.lowering import (
    chain_steps,
    decide_choice,
    gen_step,
    missing_next_alternatives,
    select_meta,
    step_meta,
    unfinished_value,
)
from llmir_lang.dsl.prefill import PrefillMemory
from llmir_lang.dsl.results import Failure, VarResult, _Val
from llmir_lang.errors import ConstraintViolationError, NotYetSupportedError
from llmir_lang.executor.backend import Backend, ChainRequest, ChainResult, score_pool
from llmir_lang.executor.choices import ChoiceDecision
from llmir_lang.ir import Function, Op
from llmir_lang.ir import ops as K
from llmir_lang.ir.reasoning import reasoning_variable, split_reasoning


@dataclass(frozen=True, slots=True)
class _Picked:
    """A select scored and picked on the score pool (a backend's scores are plain lists); the
    decision's meta keeps what only this scoring saw (the unconditional logprobs)."""

    decision: ChoiceDecision
    lps: list[list[float]]


def _choices_method(op: Op) -> str:
    return str(op.attrs.get("choices_method", "token_length_normalized"))


# what ``unconditional_likelihood_normalized`` scores the choices after instead of the prompt
UNCONDITIONAL_PROMPT = "\n"


class _SegmentCalls:
    """The model-call half of ``SegmentEvaluator``. Needs of the evaluator: its run's bookkeeping
    (set up by ``run``) and ``_resolve``, which settles an op with the state value it made."""

    backend: Backend
    prefilled: PrefillMemory
    on_chunk: Any
    requests: int
    score_calls: int
    _tokens_cache: dict[str, list[tuple[int, str | None]] | None]
    _fns: Sequence[Function]
    _vals: list[dict[str, _Val]]
    _started: set[tuple[int, int]]
    _inflight: dict[Future, tuple[int, int]]
    _chain_failures: dict[tuple[int, int], tuple[int, BaseException]]
    _chains: list[dict[int, frozenset[int]]]
    _resolve: Callable[[int, int, _Val | None], None]

    def _start(self, fi: int, i: int, op: Op, base: _Val) -> None:
        try:
            if op.kind == K.SELECT:
                choices = [str(c) for c in op.attrs["choices"]]  # type: ignore[union-attr]
                batched = op.attrs.get("score") == "batched"
                fut = self._score_start(base.text, choices, batched, _choices_method(op))
                self.score_calls += 1 if batched else len(choices)
            elif op.kind == K.GEN:
                fut = self._submit(fi, i, base.text, [gen_step(op.label, op.attrs)])
            else:
                segments = list(op.attrs["segments"])  # type: ignore[arg-type]
                try:
                    fut = self._submit(fi, i, base.text, chain_steps(segments))
                except Exception as e:
                    fut = self._submit_before_bad_gen(fi, i, base.text, segments, e)
        except Exception as e:  # bad input: fails this op before any model step
            self._resolve(fi, i, _Val(base.text, base.vars, _failure(op, e), base.gates))
            return
        self._started.add((fi, i))
        self._inflight[fut] = (fi, i)

    def _submit(self, fi: int, i: int, prompt: str, steps: list) -> Future:
        names = [s.name or "" for s in steps if not isinstance(s, str)]
        fut = self.backend.submit(ChainRequest(prompt, steps), on_chunk=self._chunk_sink(fi, i, names))
        self.requests += 1
        return fut

    def _submit_before_bad_gen(
        self, fi: int, i: int, prompt: str, segments: list, error: BaseException
    ) -> Future:
        """A fused chain that could not be submitted: one of its gens is bad. The gens before it
        still run (as call by call would run them), and the error is that gen's, not the chain's
        first: submit the longest part of the chain that ends before it. ``EngineBackend`` names
        the gen (``chain_step``); another backend may refuse a gen in ``submit`` without saying
        which (OpenAI's a ``stop_regex``), and a refused submit runs nothing (``Backend.submit``),
        so shorter parts are tried until one is taken, each refusal naming an earlier gen."""
        gens = [k for k, seg in enumerate(segments) if "text" not in seg]
        named = _bad_gen(segments, error)
        for bad in [named] if named is not None else range(len(gens) - 1, 0, -1):
            if bad <= 0:
                break
            try:
                fut = self._submit(fi, i, prompt, chain_steps(segments[: gens[bad - 1] + 1]))
            except Exception as e:  # a gen before ``bad`` is refused too (the first is ``e``'s)
                error = e
                continue
            self._chain_failures[(fi, i)] = (bad, error)
            return fut
        raise error

    def _score_start(self, prompt: str, choices: list[str], batched: bool, method: str) -> Future:
        """A future of the select's scores. One batched call is started without a waiting thread
        (``Backend.score_async``): its future holds each choice's token logprobs, and the choice
        is picked in ``_complete``, off the engine thread. The others (a choice per call, or two
        calls for the unconditional method) run on the score pool and resolve to ``_Picked``."""
        if not batched or method == "unconditional_likelihood_normalized":
            return score_pool().submit(self._score, prompt, choices, batched, method)
        try:
            return self.backend.score_async(prompt, choices)
        except Exception as e:  # bad input: fails this select as a failing score call would
            failed: Future = Future()
            failed.set_exception(e)
            return failed

    def _score(self, prompt: str, choices: list[str], batched: bool, method: str) -> _Picked:
        if batched:
            lps = self.backend.score(prompt, choices)
        else:
            lps = [self.backend.score(prompt, [c])[0] for c in choices]
        unconditional = None
        if method == "unconditional_likelihood_normalized":
            # the same choice tokens scored after a context-free start (a newline)
            unconditional = self.backend.score(UNCONDITIONAL_PROMPT, choices)
        return _Picked(decide_choice(method, lps, unconditional), lps)

    def _chunk_sink(self, fi: int, i: int, names: list[str]) -> Callable[[int, str], None] | None:
        if self.on_chunk is None:
            return None
        sink, owners = self.on_chunk, self._chains[fi].get(i, frozenset())

        last = [-1]

        def on_chunk(index: int, text: str) -> None:
            if 0 <= index < len(names):
                # gens of the chain that streamed nothing are finished too: say so (an empty
                # chunk), so a state's stream does not wait on them until the segment ends
                for j in range(last[0] + 1, index):
                    sink(fi, owners, names[j], "")
                last[0] = max(last[0], index)
                sink(fi, owners, names[index], text)

        return on_chunk


    def _choice_tokens(self, choice: str) -> list[tuple[int, str | None]] | None:
        """A select choice's ``(token id, text)`` pairs for its meta info, or None where the
        backend cannot tokenize (cached: programs reuse their choices)."""
        if choice not in self._tokens_cache:
            tokenize = getattr(self.backend, "token_ids", None)
            decode = getattr(self.backend, "token_text", None)
            ids = tokenize(choice) if callable(tokenize) else None
            self._tokens_cache[choice] = (
                None if ids is None else [(t, decode(t) if callable(decode) else None) for t in ids]
            )
        return self._tokens_cache[choice]

    def _token_text(self, attrs: Mapping[str, Any]) -> Callable[[int], str | None] | None:
        """How a gen's logprob triples get their token text: with ``return_text_in_logprobs``."""
        decode = getattr(self.backend, "token_text", None)
        return decode if attrs.get("return_text_in_logprobs") and callable(decode) else None


    def _complete(self, fut: Future) -> None:
        fi, i = self._inflight.pop(fut)
        if fi < 0:
            return  # a prefill finished; its gate opens on the next scan
        op = self._fns[fi].ops[i]
        base = self._vals[fi][op.state.name]
        self._started.discard((fi, i))
        try:
            result = fut.result()
        except Exception as e:
            self._resolve(fi, i, _Val(base.text, base.vars, _failure(op, e), base.gates))
            return
        vars_ = dict(base.vars)
        text = base.text
        if op.kind == K.SELECT:
            choices = [str(c) for c in op.attrs["choices"]]  # type: ignore[union-attr]
            if isinstance(result, _Picked):  # picked on the score pool
                decision, lps = result.decision, result.lps
            else:  # score_async's logprobs: picked here
                lps = result
                try:
                    decision = decide_choice(_choices_method(op), lps, None)
                except Exception as e:
                    self._resolve(fi, i, _Val(base.text, base.vars, _failure(op, e), base.gates))
                    return
            picked = decision.index
            tokens = [self._choice_tokens(c) for c in choices]
            given = op.attrs.get("choices_given")  # scored once each, reported as the program gave them
            meta = select_meta(choices, lps, picked, tokens, given, decision.meta)  # type: ignore[arg-type]
            value = _bind(vars_, op.label or "", op.attrs, choices[picked], meta)
            if self.on_chunk is not None:  # streamed states show the choice now, not at the end
                self.on_chunk(fi, self._chains[fi].get(i, frozenset()), op.label or "", choices[picked])
            self.prefilled.add(text + choices[picked])  # scoring left it in the cache
            self._resolve(fi, i, _Val(text + value, vars_, None, base.gates))
            return
        assert isinstance(result, ChainResult)
        segments = [{"gen": op.label, **op.attrs}] if op.kind == K.GEN else list(op.attrs["segments"])  # type: ignore[arg-type]
        gen_index = 0
        generated = text  # the request's prompt and output, as the backend's cache holds them
        for seg in segments:
            if "text" in seg:
                text += str(seg["text"])
                generated += str(seg["text"])
                continue
            name = str(seg["gen"])
            step = result.steps[gen_index] if gen_index < len(result.steps) else None
            cut = self._chain_failures.get((fi, i))
            if cut is not None and gen_index == cut[0]:
                error = cut[1]
                self._resolve(
                    fi,
                    i,
                    _Val(text, vars_, Failure(name, f"{type(error).__name__}: {error}", error), base.gates),
                )
                return
            gen_index += 1
            if step is None or step.error:
                message = (step.error if step else None) or result.error or "the backend returned no result"
                cause = result.exception if step is None else None  # the chain's own failure
                self._resolve(fi, i, _Val(text, vars_, Failure(name, message, cause), base.gates))
                return
            bad = (
                unfinished_value(name, seg, step.text, step.matched_stop)
                if step.finish_reason == "stop"
                else None
            )
            if bad is not None:  # a constrained value cut by a stop (or let through): fail, never pass it on
                self._resolve(
                    fi, i, _Val(text, vars_, Failure(name, bad, ConstraintViolationError(bad)), base.gates)
                )
                return
            missing = missing_next_alternatives(
                name, seg, step, f"the backend ({type(self.backend).__name__})"
            )
            if missing is not None:  # asked-for meta info the backend did not give: fail, never leave it out
                failure = Failure(name, missing, NotYetSupportedError(missing))
                self._resolve(fi, i, _Val(text, vars_, failure, base.gates))
                return
            text += _bind(vars_, name, seg, step.text, step_meta(step, self._token_text(seg), seg))
            generated += step.text
            if self.on_chunk is not None:  # the gen is finished (an empty chunk if it said nothing)
                self.on_chunk(fi, self._chains[fi].get(i, frozenset()), name, "")
        self.prefilled.add(generated)  # a finished request leaves its prompt and output in the cache
        self._resolve(fi, i, _Val(text, vars_, None, base.gates))


def _bind(
    vars_: dict[str, VarResult], name: str, attrs: Mapping[str, Any], output: str, meta: dict[str, Any]
) -> str:
    """Bind gen / select ``name`` to its ``output`` in ``vars_``; the text it appends to its state.
    With a ``reasoning`` format that is the answer split off the output, also its value, and the
    reasoning is ``<name>_reasoning_content`` (with the same meta info: the same call made it).
    NOTE: a streamed run never records a format (``separate_reasoning`` does nothing there, as in
    SGLang): its stream has shown the output, and a stream never takes text back."""
    fmt = attrs.get("reasoning")
    if fmt is None:
        vars_[name] = VarResult(output, meta)
        return output
    reasoning, answer = split_reasoning(str(fmt), output)
    vars_[name] = VarResult(answer, meta)
    vars_[reasoning_variable(name)] = VarResult(reasoning, meta)
    return answer


def _bad_gen(segments: Sequence[Mapping[str, Any]], error: BaseException) -> int | None:
    """Which gen of a chain (0-based, among its gens) ``error`` belongs to: the backend names it
    (``chain_step``, set by ``EngineBackend.submit``), or building that gen's step raises alone."""
    named = getattr(error, "chain_step", None)
    if isinstance(named, int):
        return named
    gens = [seg for seg in segments if "text" not in seg]
    for k, seg in enumerate(gens):
        try:
            gen_step(str(seg["gen"]), {key: v for key, v in seg.items() if key != "gen"})
        except Exception:
            return k
    return None


def _failure(op: Op, error: BaseException) -> Failure:
    names = op.defined_names()
    return Failure(names[0] if names else op.label, f"{type(error).__name__}: {error}", error)
