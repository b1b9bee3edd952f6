"""``Engine.score``: per-token logprobs of continuations after a prompt, in as few tokens as it takes.

``Engine`` inherits this; it uses the engine's ``encode``, ``_submit``, ``_wait`` and ``_thread``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from llmir_lang.errors import EmptyPromptError, EngineError, InvalidRequestError
from llmir_lang.executor.request import GenerateResult
from llmir_lang.executor.sampling_params import SamplingParams

Prompt = str | Sequence[int]  # as Engine.encode takes it (or a tensor of ids)


@dataclass(slots=True)
class _ScorePlan:
    """What ``score`` submitted: the continuations' ids, the one riding on the head request (if
    any), the head request and one request per further longer continuation."""

    conts: list[list[int]]
    ride: int | None
    head: Future | None
    tails: dict[int, Future]

    def futures(self) -> list[Future]:
        return [] if self.head is None else [self.head, *self.tails.values()]


def _settle(fut: Future, result: object, error: BaseException | None) -> None:
    """Complete ``fut`` unless it was cancelled meanwhile (nobody wants the scores then)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


class EngineScoring:
    def score(self, prompt: Prompt, continuations: Sequence[Prompt]) -> list[list[float]]:
        """Per-token logprobs of each continuation after ``prompt``.

        Every continuation's first token is scored from the logits at the prompt's last position,
        computed once: a continuation of one token costs nothing more than the prompt. The first
        longer continuation rides on that same request (prompt + its tokens, one extend); each
        further one is one more request over the cached prompt that computes only its own tokens.
        All are submitted at once: while the prompt is not cached, the scheduler admits the first
        request first and the others a step later, from the radix cache.
        """
        return self._score_collect(self._score_submit(prompt, continuations))

    def score_async(self, prompt: Prompt, continuations: Sequence[Prompt]) -> Future:
        """``score`` without blocking: the requests are submitted now (bad input raises here) and
        the returned future resolves to the same list once the last of them finishes; cancelling
        it aborts them. No thread waits: a batch of selects submits all its scoring requests from
        one thread and the engine thread completes the futures."""
        from llmir_lang.executor.engine_futures import _RequestFuture

        plan = self._score_submit(prompt, continuations)
        # cancel() marks it done for ``concurrent.futures.wait`` too (a plain Future's does not)
        out: Future = _RequestFuture(self._thread)
        parts = plan.futures()
        if not parts:
            out.set_result([])
            return out
        left = [len(parts)]
        lock = threading.Lock()

        def part_done(_: Future) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            try:
                result = self._score_collect(plan)
            except BaseException as e:  # handed to the waiter
                _settle(out, None, e)
                return
            _settle(out, result, None)

        def out_done(f: Future) -> None:
            if f.cancelled():
                for part in parts:
                    part.cancel()

        out.add_done_callback(out_done)
        for part in parts:
            part.add_done_callback(part_done)
        return out

    def _score_submit(self, prompt: Prompt, continuations: Sequence[Prompt]) -> _ScorePlan:
        p_ids = self.encode(prompt)
        if not p_ids:
            raise EmptyPromptError("score() needs a non-empty prompt")
        conts = [
            self.encode(c) if not isinstance(c, str) else self.tokenizer.encode(c, add_special_tokens=False)
            for c in continuations
        ]
        if any(len(c) == 0 for c in conts):
            raise InvalidRequestError("every continuation must have at least one token")
        if not conts:
            return _ScorePlan(conts, None, None, {})
        zero, n = SamplingParams(max_new_tokens=0), len(p_ids)
        firsts = [c[0] for c in conts]
        longer = [i for i, c in enumerate(conts) if len(c) > 1]
        # the head: the prompt, plus the first longer continuation scored from the prompt's last token
        ride = longer[0] if longer else None
        head_ids = p_ids + conts[ride] if ride is not None else p_ids
        head = self._submit(head_ids, zero, None, n - 1 if ride is not None else -1, None, None, None, firsts)
        tails = {}
        try:
            for i in longer[1:]:
                tails[i] = self._submit(p_ids + conts[i], zero, None, n, None, None, None)
        except BaseException:
            for f in (head, *tails.values()):
                f.cancel()  # one submitted and the next refused: nobody will read the first
            raise
        return _ScorePlan(conts, ride, head, tails)

    def _score_collect(self, plan: _ScorePlan) -> list[list[float]]:
        if plan.head is None:
            return []
        head_res = self._scored(plan.head)
        first = head_res.meta["next_logprobs"]
        out = []
        for i, (lp0, c) in enumerate(zip(first, plan.conts)):
            if i == plan.ride:
                rest = [lp for _, lp in head_res.prompt_logprobs or []][1:]
            elif i in plan.tails:
                rest = [lp for _, lp in self._scored(plan.tails[i]).prompt_logprobs or []]
            else:
                rest = []
            if len(rest) != len(c) - 1:
                raise EngineError(f"a scoring request returned {len(rest)} of {len(c) - 1} logprobs")
            out.append([lp0, *rest])
        return out

    def _scored(self, fut: Future) -> GenerateResult:
        """The result of a prefill-only scoring request; one that was aborted raises instead of
        returning partial scores."""
        res = self._wait(fut)
        if res.finish_reason != "length" or (res.error is not None):
            raise EngineError(
                f"a scoring request ended with {res.finish_reason!r} ({res.error or 'no error given'}); "
                "score again"
            )
        return res
