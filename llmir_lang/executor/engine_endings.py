"""How a generation ends: a chain goes on to its next generation in the same request, else the
request finishes (final stream chunk, result, future) or fails; endings from outside output
processing (``Engine.abort``) run the queued text work first.

``OutputProcessor`` (``engine_output.py``) inherits this. Needs of the processor: ``engine``,
``_deferred``, ``_defers``, ``flush_deferred`` and ``force_start`` (``engine_jump_forward.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from llmir_lang.errors import EngineClosedError
from llmir_lang.executor.engine_text import forced_stop_hit, make_result, send_chunk, stream_text, take_chunk
from llmir_lang.executor.request import FinishReason, Req

if TYPE_CHECKING:
    from llmir_lang.executor.engine import Engine
    from llmir_lang.executor.engine_counts import RequestCounts
    from llmir_lang.executor.engine_text import DeferredText
    from llmir_lang.executor.sampling_params import SamplingParams


class OutputEndings:
    engine: Engine
    counts: RequestCounts
    _deferred: DeferredText
    _defers: Callable[[Req], bool]
    flush_deferred: Callable[[], None]
    force_start: Callable[[Req], list[int]]

    # ---- chains ---------------------------------------------------------------------------
    def _next_step(self, req: Req, reason: FinishReason) -> None:
        """The current generation of a chain ended: append the constant text that follows, then
        start the next generation in the same request (the scheduler re-points the KV).

        The ended generation's last chunk goes out once the next generation is set up (its rebase
        pending), so an abort from that chunk's callback ends the request as one between two
        generations does: the ended one keeps its own finish reason, the next one is reported
        aborted. Sent before, the abort reported the ended generation as aborted, and the set-up
        here then went on on a finished request."""
        req.step_results.append(make_result(req, reason))
        req.chain_text += req.text
        assert req.chain is not None
        while req.chain and req.chain[0][0] == "text":
            req.chain_text += req.chain.pop(0)[1]
        _, params, matcher = req.chain.pop(0)
        eng = self.engine
        # canonical tokens of the whole text so far, exactly what a call-by-call run would prefill
        new_ids = eng.tokenizer.encode((req.prompt_text or "") + req.chain_text)
        ctx = eng.config.context_len
        # the refusals below end the request: their final chunk carries the ended generation's rest
        if len(new_ids) >= ctx:
            self._refuse_next(
                req, params, FinishReason.LENGTH, "the chain's text outgrew the model's context"
            )
            return
        # the admission rule of a new request (Engine._submit), so a chain's next generation is
        # refused exactly where a call-by-call run's request for it would be; one that could never
        # fit in the pool would otherwise wait for KV slots for ever
        need = len(new_ids) + min(params.max_new_tokens, ctx - len(new_ids)) + eng.pool.page_size
        if need > eng.pool.capacity:
            self._refuse_next(
                req,
                params,
                FinishReason.ERROR,
                f"OutOfKVMemoryError: this request needs {need} KV slots but the pool holds "
                f"{eng.pool.capacity}; raise kv_memory or lower max_new_tokens",
            )
            return
        ended = take_chunk(req, final=True, step_done=True)
        req.params, req.matcher = params, matcher
        req.generator = (
            eng.sampler.make_generator(params.seed, eng.device) if params.seed is not None else None
        )
        req.decoder = type(req.decoder)(eng.tokenizer, params.skip_special_tokens)
        req.chain_index += 1
        req.text, req.sent_len, req.sent_tokens = "", 0, 0
        req.out_logprobs, req.out_top_logprobs = [], []
        req.matched_stop = None
        req.stop_regex_scan, req.stop_regex_floor, req.stop_seen = [], 0, 0
        # output_ids keeps the finished generation until the scheduler applies the rebase after
        # this step: it compares the KV'd tokens with new_ids to keep the common prefix
        finished, req.output_ids = req.output_ids, []
        req.forced_end = -1
        forced = self.force_start(req)
        req.output_ids = finished
        req.rebase_to = (new_ids, forced)
        if ended is not None:
            send_chunk(req, ended)

    def _refuse_next(self, req: Req, params: SamplingParams, reason: FinishReason, error: str) -> None:
        """The chain's next generation (``params``) cannot run: end the request, its final chunk
        carrying the ended generation's rest, and report the refused one with no text or tokens
        (``_finish_now`` would report the ended generation's output a second time as its own)."""
        req.error, req.finish_reason = error, reason
        stream_text(req, final=True)
        last = make_result(req, reason)
        last.text, last.token_ids, last.completion_tokens, last.matched_stop = "", [], 0, None
        last.logprobs = [] if params.return_logprob else None
        last.top_logprobs = [] if params.return_logprob and params.top_logprobs_num else None
        last.prompt_logprobs = None
        res = dataclasses.replace(last, meta={**last.meta, "steps": [*req.step_results, last]})
        res.meta["chain_text"] = req.chain_text
        self.counts.end(req, reason)
        if not req.future.done():
            req.future.set_result(res)

    # ---- endings --------------------------------------------------------------------------
    def finish(self, req: Req, reason: FinishReason) -> bool:
        """End ``req`` from outside output processing (``Engine.abort``): queued text work runs
        first, so the result and the stream hold every token appended so far. False, and nothing
        done, where a stream callback that work ran ended ``req`` meanwhile (it aborted it too:
        the request used to end twice, with two final chunks)."""
        was_finished = req.finished
        self.flush_deferred()
        if req.finished and not was_finished:
            return False
        if reason is FinishReason.ABORT and forced_stop_hit(req, len(req.output_ids)):
            # NOTE: the stop was in the text before the abort landed (forced text the next check
            # would have cut): the output ended at it, so "stop", as without the abort. A chain
            # goes on to its next generation, which the abort then ends before it runs
            reason = FinishReason.STOP
            if _chain_continues(req):
                self._next_step(req, reason)
                if req.finished:  # refused, or aborted by the callback of the ended step's chunk
                    return req.finish_reason is not FinishReason.ABORT
                self.engine.scheduler.apply_rebase(req)
                reason = FinishReason.ABORT
        self._finish_now(req, reason)
        return True

    def _finish(self, req: Req, reason: FinishReason) -> None:
        """End ``req`` during ``process``: its result waits for the flush when its text may."""
        if self._defers(req):
            req.finish_reason = reason
            self._deferred.push(req, reason, False)
        else:
            self._finish_now(req, reason)

    def _finish_now(self, req: Req, reason: FinishReason) -> None:
        """Final stream chunk, result, future (also the deferred path's last step for ``req``)."""
        req.finish_reason = reason
        stream_text(req, final=True)
        res = make_result(req, reason)
        if req.chain is not None:
            last = make_result(req, reason)
            req.chain_text += req.text
            while req.chain and req.chain[0][0] == "text":
                req.chain_text += req.chain.pop(0)[1]
            res.meta["steps"] = req.step_results + [last]
            res.meta["chain_text"] = req.chain_text
        self.counts.end(req, reason)
        if not req.future.done():
            req.future.set_result(res)

    def fail(self, req: Req, exc: Exception) -> None:
        was_finished = req.finished
        self.flush_deferred()  # earlier chunks first; requests already finished keep their results
        if req.finished and not was_finished:
            return  # a stream callback of that text work ended it (Engine.abort): it has its result
        req.finish_reason = FinishReason.ABORT if isinstance(exc, EngineClosedError) else FinishReason.ERROR
        req.error = str(exc)
        stream_text(req, final=True)
        self.counts.end(req, None)
        if not req.future.done():
            req.future.set_exception(exc)


def _chain_continues(req: Req) -> bool:
    """A chain request with a generation still to come after the current one."""
    return bool(req.chain) and any(step[0] == "gen" for step in req.chain)
