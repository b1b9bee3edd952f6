"""After each model step: prompt logprobs, sampling, stop checks, streaming, results.

With ``defer_text`` (on CUDA), the text work of requests whose control flow never reads their text
is queued and runs while the next step computes (``engine_text``); ``flush_deferred`` runs it.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from llmir_lang.errors import EngineClosedError, EngineError
from llmir_lang.executor import speculate
from llmir_lang.executor.engine_text import (
    DeferredText,
    defer_text_default,
    forced_stop_hit,
    make_result,
    send_chunk,
    stop_hit,
    stream_text,
    take_chunk,
)
from llmir_lang.executor.model_runner import StepLogits
from llmir_lang.executor.request import FinishReason, Req, common_prefix_len
from llmir_lang.executor.sampler import logprobs_of
from llmir_lang.executor.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from llmir_lang.executor.engine import Engine
    from llmir_lang.executor.sampling_params import SamplingParams

log = logging.getLogger("llmir_lang.engine")


class OutputProcessor:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.eos_ids = set(engine.tokenizer.eos_token_ids)
        self._mask_pool: ThreadPoolExecutor | None = None
        # request id -> what its constraint raised while its mask was filled (see _bitmask); read
        # and cleared by the engine thread in process(), after the mask's future resolved
        self._mask_errors: dict[int, Exception] = {}
        self.masks_overlapped = 0  # steps whose constraint masks were computed during the forward
        # queue text work behind the next forward (pointless where the forward is synchronous)
        self.defer_text = defer_text_default(engine.device.type)
        self._deferred = DeferredText(self)
        self.spec = speculate.SpecConfig()  # the engine sets it (speculative_draft_tokens)

    def flush_deferred(self) -> None:
        """Run the queued text work (detokenize, stream, resolve finished requests). The engine
        loop calls it once the next forward is launched, and before it idles or ends requests."""
        if len(self._deferred):
            self._deferred.flush()

    def drop_deferred(self, exc: Exception) -> None:
        """After a failed flush: fail the futures of the requests whose text work is still queued."""
        self._deferred.drop(exc)

    def _defers(self, req: Req) -> bool:
        """Whether the request's text work waits for the next flush: only with ``defer_text`` and
        when its control flow never reads its text. Stop strings and regexes are searched in the text
        (``min_new_tokens`` only gates that search), the prompt of a chain's next generation is the
        text so far, and jump-forward appends forced text and restarts the decoder after it. A
        chain's last generation may defer: its text is read only when the request completes."""
        return self.defer_text and not (
            bool(req.params.stop or req.params.stop_regex)
            or (req.matcher is not None and self.engine.jump_forward)
            or _chain_continues(req)
        )

    def start_masks(self, batch: ScheduledBatch) -> Future | None:
        """Start the constraint masks of the requests that sample after ``batch``, on a worker
        thread, so that they are computed while the model runs (the matchers are not touched
        between scheduling and output processing: they already hold every token and forced
        text up to this step). The future resolves to (request ids of the rows, the bitmask on
        the engine's device); None when no sampling request is constrained."""
        drafted = batch.draft_lens or [0] * len(batch.reqs)
        # a drafted request's masks follow its draft: verify() computes them
        reqs = [r for r, s, d in zip(batch.reqs, batch.sample, drafted) if s and not d and not r.finished]
        if not any(r.matcher is not None for r in reqs):
            return None
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmir-masks")
        vocab = self.engine.config.vocab_size
        return self._mask_pool.submit(lambda: ([r.rid for r in reqs], self._bitmask(reqs, vocab)))

    def close(self) -> None:
        """Stop the mask worker thread (after the engine loop has stopped)."""
        if self._mask_pool is not None:
            self._mask_pool.shutdown(wait=False)
            self._mask_pool = None

    def process(self, batch: ScheduledBatch, step: StepLogits, pending: Future | None = None) -> None:
        """Sample every request of ``batch`` that samples after this step and append its token.
        ``pending`` is ``start_masks(batch)``, started before the forward."""
        logits = step.logits
        _prompt_logprobs(logits, batch.reqs, step.prompt_rows)
        # scoring requests (prefill only) read the next token's logprobs: at their first scored
        # position (with prompt logprobs), else at their last
        scoring = [
            (req, row + req.logprob_start_len - pos)
            for req, (row, pos, count) in zip(batch.reqs, step.prompt_rows)
            if count and req.score_next is not None and pos <= req.logprob_start_len < pos + count
        ]
        scoring += [
            (req, row)
            for req, row in zip(batch.reqs, step.sample_rows)
            if row >= 0 and not req.finished and req.score_next is not None
            and req.logprob_start_len < 0 and not req.output_ids and req.params.max_new_tokens == 0
        ]  # fmt: skip
        _next_logprobs(logits, scoring)
        # a generation of max_new_tokens 0 with top_logprobs_num reports the next token's
        # alternatives as its one entry (SGLang's cot_decoding reads output_top_logprobs[0])
        _next_top_logprobs(
            logits,
            [
                (req, row)
                for req, row in zip(batch.reqs, step.sample_rows)
                if row >= 0 and not req.finished and req.params.max_new_tokens == 0 and not req.output_ids
                and req.params.return_logprob and req.params.top_logprobs_num
            ],
        )  # fmt: skip
        todo: list[tuple[Req, int]] = []
        drafted: list[tuple[Req, int, list[int]]] = []
        for b, (req, row) in enumerate(zip(batch.reqs, step.sample_rows)):
            if row < 0 or req.finished:
                continue
            if len(req.output_ids) >= req.params.max_new_tokens:
                if _chain_continues(req):  # a chain's gen of max_new_tokens 0: on to its next step
                    self._next_step(req, FinishReason.LENGTH)
                else:
                    self._finish(req, FinishReason.LENGTH)  # max_new_tokens == 0: prefill only
            elif batch.draft_lens and batch.draft_lens[b]:
                drafted.append((req, row, req.draft[: batch.draft_lens[b]]))
            else:
                todo.append((req, row))
        try:
            if todo:
                self._sample(todo, logits, pending)
            if drafted:
                speculate.verify(self, drafted, logits)
            if self.spec.enabled:
                speculate.propose_all(self, [t[0] for t in todo] + [t[0] for t in drafted])
        finally:
            self._mask_errors.clear()  # entries of requests that did not sample after all

    def _sample(self, todo: list[tuple[Req, int]], logits: torch.Tensor, pending: Future | None) -> None:
        """Sample one token for each ``(request, logits row)`` and append it."""
        reqs = [r for r, _ in todo]
        rows = [row for _, row in todo]
        if rows == list(range(logits.shape[0])):
            picked = logits  # a decode step: every row, in order (no gather)
        else:
            picked = logits.index_select(0, torch.tensor(rows, device=logits.device))
        bitmask = self._pending_rows(pending, reqs, logits.shape[-1])
        if bitmask is None:
            bitmask = self._bitmask(reqs, logits.shape[-1])
        out = self.engine.sampler.sample(
            picked,
            [r.params for r in reqs],
            [r.prompt_ids for r in reqs],
            [r.output_ids for r in reqs],
            [r.generator for r in reqs],
            bitmask=bitmask,
            banned_ids=[self._banned(r) for r in reqs],
        )
        tokens = out.token_ids.tolist()
        lps = out.logprobs.tolist() if out.logprobs is not None else [None] * len(reqs)
        for i, req in enumerate(reqs):
            failed = self._mask_errors.pop(req.rid, None) if self._mask_errors else None
            if req.finished:
                continue  # aborted by an earlier request's stream callback in this loop: result sent
            if failed is not None:
                self.fail_one(req, failed)
            else:
                self.append_isolated(
                    req, tokens[i], lps[i], out.top_logprobs[i] if out.top_logprobs else None
                )

    def _banned(self, req: Req, ahead: int = 0) -> list[int]:
        """Token ids the request may not sample ``ahead`` tokens past its output (EOS and stop
        ids until ``min_new_tokens`` exist; a speculative step asks for each draft position)."""
        if len(req.output_ids) + ahead < req.params.min_new_tokens:
            return sorted(self.eos_ids | set(req.params.stop_token_ids))
        return []

    def _pending_rows(self, pending: Future | None, reqs: list[Req], vocab: int) -> torch.Tensor | None:
        """The rows of the overlapped masks for ``reqs`` (a subset, in order, of the rows they were
        computed for: requests that finished at max_new_tokens drop out); None to compute now."""
        if pending is None:
            return None
        rids, mask = pending.result()  # a failure here propagates like one in _bitmask
        if mask is None or mask.shape[-1] * 32 < vocab:
            return None
        self.masks_overlapped += 1
        wanted = [r.rid for r in reqs]
        if wanted == rids:
            return mask
        index = {rid: i for i, rid in enumerate(rids)}
        rows = torch.tensor([index[rid] for rid in wanted], device=mask.device)
        return mask.index_select(0, rows)

    def _bitmask(self, reqs: list[Req], vocab: int) -> torch.Tensor | None:
        """One allowed-token bitmask for the whole batch (rows without a constraint: all ones)."""
        if all(r.matcher is None for r in reqs):
            return None
        from llmir_lang.executor.constraints import allocate_bitmask, fill_batch_bitmask

        mask = allocate_bitmask(len(reqs), vocab)
        try:
            dead = fill_batch_bitmask([r.matcher for r in reqs], mask)
        except Exception:
            # a constraint that raises fails its own request only: fill row by row to find it
            dead = []
            for row, r in enumerate(reqs):
                try:
                    dead += [row + d for d in fill_batch_bitmask([r.matcher], mask[row : row + 1])]
                except Exception as e:
                    self._mask_errors[r.rid] = e
                    dead.append(row)
        for row in dead:
            mask[row] = 0  # a dead end allows nothing (not even EOS): the request ends with its reason
        return mask.to(self.engine.device, non_blocking=True)

    # ---- one token ------------------------------------------------------------------------
    def append_isolated(self, req: Req, token: int, logprob: float | None, top: list | None) -> None:
        """``append``, where a failure in the request's own processing (its constraint, its chain's
        next generation, its stop check) fails that request only, not the step's others."""
        try:
            self.append(req, token, logprob, top)
        except Exception as e:
            self.fail_one(req, e)

    def fail_one(self, req: Req, exc: Exception) -> None:
        """Fail one request of a step whose own output processing raised ``exc``; the other
        requests go on. The engine loop does not cache its KV (its finish reason is ERROR)."""
        log.warning("processing request %s failed; failing it alone", req.rid, exc_info=exc)
        err = EngineError(
            f"this request failed while its output was processed ({type(exc).__name__}: {exc}); "
            "the other requests were not affected"
        )
        err.__cause__ = exc
        self.fail(req, err)

    def append(self, req: Req, token: int, logprob: float | None, top: list | None) -> None:
        if forced_stop_hit(req, len(req.output_ids)):
            # forced text came after the last check: a stop in it ends the output before this
            # token, as the check of each forced token does with jump-forward off
            self._end_now(req, FinishReason.STOP)
            return
        if token < 0:
            why = req.matcher.error() if req.matcher is not None else None
            req.error = (
                f"the constraint admits no token here ({why or 'dead end'}); the output so far is kept"
            )
            self._finish(req, FinishReason.CONSTRAINT_ERROR)
            return
        p = req.params
        req.output_ids.append(token)
        if p.return_logprob and logprob is not None:
            req.out_logprobs.append(logprob)
            if p.top_logprobs_num and top is not None:
                req.out_top_logprobs.append(top)
        if req.matcher is not None and not req.matcher.advance(token):
            req.error = f"token {token} was sampled but the constraint rejects it"
            self._finish(req, FinishReason.CONSTRAINT_ERROR)
            return
        defer = self._defers(req)
        if not defer:
            req.text += req.decoder.step(req.output_ids)
        n_out = len(req.output_ids)
        reason: FinishReason | None = None
        if token in self.eos_ids and not p.ignore_eos:
            reason, req.matched_stop = FinishReason.STOP, token
        elif token in p.stop_token_ids:
            reason, req.matched_stop = FinishReason.STOP, token
        elif (p.stop or p.stop_regex) and stop_hit(req, n_out < p.min_new_tokens):
            reason = FinishReason.STOP
        elif req.matcher is not None and req.matcher.is_terminated():
            reason = FinishReason.STOP
        elif n_out >= p.max_new_tokens or req.seq_len >= self.engine.config.context_len:
            reason = FinishReason.LENGTH
        if reason is None and req.matcher is not None and self.engine.jump_forward:
            self._jump_forward(req)
            if req.finished:
                return  # its stream callback aborted it (Engine.abort): its result is out
            if req.matcher.is_terminated() and self._commit_forced(req):
                reason = FinishReason.STOP  # the forced text ended the output: no step to run
                forced_stop_hit(req, len(req.output_ids))  # no check follows: cut at a stop in it
        if defer:  # the finish reason is decided now (the scheduler needs it); the text later
            req.finish_reason = reason
            self._deferred.push(req, reason, True)
        elif reason is not None:
            self._end_now(req, reason)
        else:
            stream_text(req)

    def _end_now(self, req: Req, reason: FinishReason) -> None:
        """The current generation ended: on to a chain's next one, else finish the request."""
        if not isinstance(req.matched_stop, str):
            req.text += req.decoder.flush(req.output_ids)
        if _chain_continues(req):
            self._next_step(req, reason)
        else:
            self._finish_now(req, reason)

    def _jump_forward(self, req: Req) -> None:
        """Where the constraint allows exactly one continuation, append it as forced tokens.

        Where the forced text is whole characters that do not join the output's last character,
        it is tokenized together with the last few generated tokens, so the tokens are the ones the
        tokenizer (and so the model) would produce for that text, not the matcher's piecewise
        spelling; the scheduler then computes them in one extend instead of one decode step each.
        Otherwise (a multi-byte character split between the output and the forced bytes, or inside
        them) the matcher's own tokens are kept, byte for byte, and the text is decoded from the
        tokens, holding back an incomplete character, as for sampled tokens. At least one token of
        ``max_new_tokens`` is left to the model (the step that samples it ends the request at the
        limit), so jump-forward never makes an output longer than asked.
        """
        m = req.matcher
        out = req.output_ids
        room = req.params.max_new_tokens - len(out) - 1
        forced = m.forced_tokens()[: max(room, 0)]
        if not forced:
            return
        for i, tok in enumerate(forced):
            if not m.advance(tok):
                m.rollback(i)
                return
        tok = self.engine.tokenizer
        dec = req.decoder
        text = tok.decode(forced, skip_special_tokens=False)
        k = min(len(out), 3)
        tail = out[len(out) - k :]
        tail_text = tok.decode(tail, skip_special_tokens=False)
        whole = (
            dec.read_offset == len(out)  # the decoder holds no incomplete character back
            and "\ufffd" not in text
            and tok.decode(tail + forced, skip_special_tokens=False) == tail_text + text
        )
        new_out: list[int] | None = None
        if whole:
            if k and tok.encode(tail_text, add_special_tokens=False) == tail:
                new_out = out[: len(out) - k] + tok.encode(tail_text + text, add_special_tokens=False)
            else:  # the tail is not canonical text: keep it as it is
                new_out = out + tok.encode(text, add_special_tokens=False)
            if len(new_out) > len(out) + len(forced):  # never more tokens than the matcher's
                new_out = None
        if new_out is None:
            whole, new_out = False, out + list(forced)
        if new_out == out:
            m.rollback(len(forced))
            return
        req.rebase_to = (list(req.prompt_ids), new_out)
        req.forced_end = len(new_out)
        if whole:
            req.text += text
            # everything up to here is decoded: restart the incremental decoder after the new tokens
            dec.prefix_offset = dec.read_offset = len(new_out)
            dec.text = req.text
        else:
            req.text += dec.step(new_out)
        if req.params.return_logprob:
            _forced_logprobs(req, out, new_out)
        req.num_forced += len(forced)
        stream_text(req)

    def force_start(self, req: Req) -> list[int]:
        """Jump-forward before a generation's first step: the text its constraint forces from the
        start (``{"name`` of a JSON object) becomes output tokens now, so the first step computes
        them with the prompt instead of sampling one and extending the rest.

        Returns the forced tokens (the request's output so far). Call it on a request with no
        output yet (a new request before it is queued; ``_next_step`` does it for a chain's next
        generation). They are the canonical tokens of the forced text alone, as with
        jump-forward off: the model's first token never merges into the prompt's tokens either.
        At least one token is left for the model to sample (a step must run to finish the
        request), and ``max_new_tokens`` is respected.
        """
        m = req.matcher
        if m is None or not self.engine.jump_forward or req.output_ids:
            return []
        forced = m.forced_tokens()[: max(req.params.max_new_tokens - 1, 0)]
        for i, tok in enumerate(forced):
            if not m.advance(tok):
                m.rollback(i)
                return []
        if forced and m.is_terminated():  # the model must write the last token: one step runs
            m.rollback(1)
            forced = forced[:-1]
        if not forced:
            return []
        req.output_ids = list(forced)
        req.forced_end = len(forced)
        # decoded as sampled tokens are: a multi-byte character the forced bytes end inside waits
        # for the model's next token instead of becoming U+FFFD
        req.text = req.decoder.step(req.output_ids)
        if req.params.return_logprob:
            _forced_logprobs(req, [], req.output_ids)
        req.num_forced += len(forced)
        return forced

    def _commit_forced(self, req: Req) -> bool:
        """Make a pending jump-forward rebase the request's output now (the request is about to
        finish, so no step will apply it). Finishing caches ``fill_ids[:kv_len]`` with that KV, so
        KV of tokens the rebase changes is given back first (jump-forward re-tokenized them with
        the forced text); False, and the rebase left to a step, where that KV is the radix
        cache's."""
        if req.rebase_to is None:
            return False
        prompt_ids, new_out = req.rebase_to
        # a verify step's KV past the output's last token holds draft tokens that were not kept
        # (dropped after the step): only the KV before it counts. Counting it made the commit fail
        # whenever a draft ran past the token that completed the constraint, and the request took
        # one more step that sampled EOS (found by tests/executor/test_stress_scheduler.py)
        valid = min(req.kv_len, req.seq_len - 1)
        in_kv = valid - len(req.prompt_ids)
        if prompt_ids != req.prompt_ids or in_kv < 0:
            return False
        # tokens with KV that the rebase changes: their KV goes too. Refusing here made the request
        # take one more step, which sampled EOS after the finished value (with ignore_eos, an EOS
        # at the end of the output)
        valid = len(req.prompt_ids) + common_prefix_len(new_out[:in_kv], req.output_ids[:in_kv])
        if req.kv_len > valid and not self.engine.scheduler.drop_kv_past(req, valid):
            return False
        req.output_ids = list(new_out)
        req.rebase_to = None
        return True

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
        if not req.future.done():
            req.future.set_exception(exc)


def _prompt_logprobs(logits: torch.Tensor, reqs: list[Req], prompt_rows: list[tuple[int, int, int]]) -> None:
    """Append each request's prompt logprobs of this step: its ``count`` rows from ``row`` score
    the prompt tokens after positions ``pos``.., all requests' rows in one pass."""
    rows: list[int] = []
    targets: list[int] = []
    spans: list[tuple[Req, int, int]] = []
    for req, (row, pos, count) in zip(reqs, prompt_rows):
        if count:
            spans.append((req, len(targets), count))
            rows.extend(range(row, row + count))
            targets.extend(req.prompt_ids[pos + 1 : pos + 1 + count])
    if not spans:
        return
    dev = logits.device
    if len(spans) == 1:  # one request: its rows are contiguous
        picked = logits[rows[0] : rows[0] + len(rows)]
    else:
        picked = logits.index_select(0, torch.tensor(rows, device=dev))
    lps = logprobs_of(picked, torch.tensor(targets, device=dev)).tolist()
    for req, start, count in spans:
        req.prompt_logprobs.extend(zip(targets[start : start + count], lps[start : start + count]))


def _next_logprobs(logits: torch.Tensor, scoring: list[tuple[Req, int]]) -> None:
    """Each request's ``next_logprobs``: ``log_softmax`` of its logits row at its ``score_next``
    ids, for all the rows in one pass (a batch of selects finishes dozens at once)."""
    if not scoring:
        return
    rows = logits.index_select(0, torch.tensor([row for _, row in scoring], device=logits.device)).float()
    width = max(len(req.score_next or []) for req, _ in scoring)
    ids = torch.tensor(
        [(req.score_next or []) + [0] * (width - len(req.score_next or [])) for req, _ in scoring],
        device=logits.device,
        dtype=torch.int64,
    )
    picked = (rows.gather(1, ids) - torch.logsumexp(rows, -1, keepdim=True)).tolist()
    for (req, _), lps in zip(scoring, picked):
        req.next_logprobs = lps[: len(req.score_next or [])]


def _next_top_logprobs(logits: torch.Tensor, rows: list[tuple[Req, int]]) -> None:
    """``out_top_logprobs = [the top_logprobs_num most likely next tokens]`` for generations that
    generate nothing, from the raw logits at their last position, all rows in one pass."""
    if not rows:
        return
    x = logits.index_select(0, torch.tensor([row for _, row in rows], device=logits.device)).float()
    k = min(max(req.params.top_logprobs_num for req, _ in rows), x.shape[1])
    vals, ids = torch.topk(x, k, dim=-1)
    lps = (vals - torch.logsumexp(x, -1, keepdim=True)).tolist()
    for (req, _), top_ids, top_lps in zip(rows, ids.tolist(), lps):
        n = req.params.top_logprobs_num
        req.out_top_logprobs = [list(zip(top_ids[:n], top_lps[:n]))]


def _chain_continues(req: Req) -> bool:
    """A chain request with a generation still to come after the current one."""
    return bool(req.chain) and any(step[0] == "gen" for step in req.chain)


def _forced_logprobs(req: Req, out: list[int], new_out: list[int]) -> None:
    """Logprobs (and top alternatives) once the output ``out`` became ``new_out`` by forced tokens:
    the common prefix keeps its own, every token after it gets logprob 0.0 and, with
    ``top_logprobs_num``, the alternatives ``[(token, 0.0)]`` (the constraint admitted nothing
    else), so both lists keep one entry per output token. Where jump-forward re-tokenized the end
    of ``out`` together with the forced text, those tokens are new ones: the sampled tokens' entries
    are dropped with them."""
    c = common_prefix_len(out, new_out)
    lps, tops = req.out_logprobs, req.out_top_logprobs
    if len(lps) == len(out):
        del lps[c:]
    lps.extend([0.0] * (len(new_out) - len(lps)))
    if req.params.top_logprobs_num:
        if len(tops) == len(out):
            del tops[c:]
        tops.extend([(t, 0.0)] for t in new_out[len(tops) :])
