"""After each model step: prompt logprobs, sampling, stop checks, streaming, results.

With ``defer_text`` (on CUDA), the text work of requests whose control flow never reads their text
is queued and runs while the next step computes (``engine_text``); ``flush_deferred`` runs it.

Here: a step's logprobs and sampling, and each token's append and stop checks; jump-forward is in
``engine_jump_forward.py``, chains and the ends of requests in ``engine_endings.py``.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from llmir_lang.errors import EngineError
from llmir_lang.executor import speculate
from llmir_lang.executor.engine_counts import RequestCounts
from llmir_lang.executor.engine_endings import OutputEndings, _chain_continues
from llmir_lang.executor.engine_jump_forward import OutputJumpForward
from llmir_lang.executor.engine_text import (
    DeferredText,
    defer_text_default,
    forced_stop_hit,
    stop_hit,
    stream_text,
)
from llmir_lang.executor.model_runner import StepLogits
from llmir_lang.executor.request import FinishReason, Req
from llmir_lang.executor.sampler import logprobs_of
from llmir_lang.executor.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from llmir_lang.executor.engine import Engine

log = logging.getLogger("llmir_lang.engine")


class OutputProcessor(OutputEndings, OutputJumpForward):
    def __init__(self, engine: Engine):
        self.engine = engine
        self.counts = RequestCounts()  # Engine.stats()["requests"]
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
            why = req.matcher.error()  # a limit the constraint passed taking it, if any
            req.error = f"token {token} was sampled but the constraint rejects it" + (f" ({why})" if why else "")
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
