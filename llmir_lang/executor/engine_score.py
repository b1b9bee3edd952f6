"""``Engine.score``: per-token logprobs of continuations after a prompt, in as few tokens as it takes.

``Engine`` inherits this; it uses the engine's ``encode``, ``_submit`` and ``_wait``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

from llmir_lang.errors import EmptyPromptError, EngineError, InvalidRequestError
from llmir_lang.executor.request import GenerateResult
from llmir_lang.executor.sampling_params import SamplingParams

Prompt = str | Sequence[int]  # as Engine.encode takes it (or a tensor of ids)


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
            return []
        zero, n = SamplingParams(max_new_tokens=0), len(p_ids)
        firsts = [c[0] for c in conts]
        longer = [i for i, c in enumerate(conts) if len(c) > 1]
        # the head: the prompt, plus the first longer continuation scored from the prompt's last token
        ride = longer[0] if longer else None
        head_ids = p_ids + conts[ride] if ride is not None else p_ids
        head = self._submit(head_ids, zero, None, n - 1 if ride is not None else -1, None, None, None, firsts)
        tails = {i: self._submit(p_ids + conts[i], zero, None, n, None, None, None) for i in longer[1:]}
        head_res = self._scored(head)
        first = head_res.meta["next_logprobs"]
        out = []
        for i, (lp0, c) in enumerate(zip(first, conts)):
            if i == ride:
                rest = [lp for _, lp in head_res.prompt_logprobs or []][1:]
            elif i in tails:
                rest = [lp for _, lp in self._scored(tails[i]).prompt_logprobs or []]
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
