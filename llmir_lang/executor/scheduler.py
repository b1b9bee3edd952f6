"""Continuous batching: admission by longest cached prefix, chunked prefill, decode, retraction.

The scheduler owns the KV bookkeeping of every request (see ``Req``): it matches and locks cached
prefixes at admission, allocates slots for each step, and returns KV to the radix cache (finished or
retracted requests) or to the pool (failed requests). It never runs the model.

Here: the queues, decode steps, retraction and rebases; admission and extend steps are in
``scheduler_admission.py``, the KV bookkeeping in ``scheduler_kv.py``, the step's record in
``scheduled_batch.py``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llmir_lang.executor.attention import ForwardMode
from llmir_lang.executor.kv_pool import KVPool
from llmir_lang.executor.radix_cache import RadixCache
from llmir_lang.executor.request import Req, common_prefix_len
from llmir_lang.executor.scheduled_batch import ScheduledBatch
from llmir_lang.executor.scheduler_admission import SchedulerAdmission


@dataclass(slots=True)
class SchedulerConfig:
    max_running_requests: int = 256
    max_prefill_tokens: int = 8192  # new tokens in one extend step, all requests together
    chunked_prefill_size: int = 4096  # the longest piece of one prompt in one step
    max_wait_steps: int = 64  # a request passed over this many prefill rounds jumps the queue
    lpm_max_waiting: int = 256  # above this many waiting requests, skip prefix matching (FCFS)
    # a waiting request that shares this many uncached tokens with one admitted in the same step
    # waits one step, so the shared part is computed once and then read from the radix cache
    # (``Engine`` uses 4 on the CPU)
    min_shared_prefix: int = 8
    # forced tokens of running requests (jump-forward, chain text) up to this many per request run
    # in the same forward as the decode rows of the other running requests (one mixed step instead
    # of an extend step that every decoding request waits for); 0 turns mixing off
    max_mixed_extend: int = 8
    # running requests verify their speculative drafts (``Req.draft``) only while at most this many
    # decode: past it a step is compute-bound and rejected draft tokens are wasted work
    spec_max_batch: int = 4


class Scheduler(SchedulerAdmission):
    def __init__(self, pool: KVPool, cache: RadixCache, cfg: SchedulerConfig):
        self.pool, self.cache, self.cfg = pool, cache, cfg
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked: Req | None = None  # a request whose prompt is part-way through chunked prefill
        self.chunked_next: Req | None = None
        # admitted requests that must compute several tokens next (forced text of a chain or of a
        # constraint): they run in an extend batch, keeping their KV and lock
        self.extending: list[Req] = []
        self.step_count = 0
        self.num_retractions = 0

    # ---- queue management ---------------------------------------------------------------
    def add(self, req: Req) -> None:
        req.arrival_step = self.step_count
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.extending)

    def all_requests(self) -> list[Req]:
        reqs = list(self.waiting) + list(self.running) + list(self.extending)
        return reqs + [self.chunked] if self.chunked is not None else reqs

    # ---- scheduling ---------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        self.step_count += 1
        batch = self._schedule_mixed()
        if batch is None:
            batch = self._schedule_extend()
        if batch is None and self.running:
            batch = self._schedule_decode()
        while batch is None and not self.running and (self.extending or self.chunked is not None):
            # admitted requests hold KV but none of them can get slots for its next tokens, and
            # nothing decodes that would ever free any (two fused chains in a small pool): give
            # one up to the queue, its computed KV left in the radix cache, evictable
            self._retract_ongoing()
            batch = self._schedule_extend()
        return batch

    def _retract_ongoing(self) -> None:
        """Back to the queue with the admitted request that holds the most KV (the latest on ties)."""
        ongoing = list(self.extending) + ([self.chunked] if self.chunked is not None else [])
        req = max(ongoing, key=lambda r: (len(r.kv_slots), r.arrival_step, r.rid))
        if req is self.chunked:
            self.chunked = None
        else:
            self.extending.remove(req)
        self._requeue(req)

    def _schedule_decode(self) -> ScheduledBatch | None:
        while self.running:
            reqs = self.running[: self.cfg.max_running_requests]
            if self._alloc_decode(reqs):
                n = len(reqs)
                prefix = [len(r.kv_slots) - 1 for r in reqs]
                drafts = self._alloc_drafts(reqs) if n <= self.cfg.spec_max_batch else []
                if any(drafts):  # a speculative step: an extend that samples at every position
                    ext = [1 + d for d in drafts]
                    return ScheduledBatch(
                        ForwardMode.EXTEND, reqs, prefix, ext, [True] * n, num_decode=n, draft_lens=drafts
                    )
                return ScheduledBatch(ForwardMode.DECODE, reqs, prefix, [1] * n, [True] * n)
            self.retract(max(self.running, key=lambda r: (r.arrival_step, r.rid)))
        return None

    def schedule_ahead(self, reqs: list[Req]) -> ScheduledBatch | None:
        """The decode step after the one in flight, for ``reqs`` (running, in order), launched before
        that step's tokens are known (``run_ahead``); None when the pool has no room (the ordinary
        schedule then retracts as usual)."""
        if not self._alloc_decode(reqs):
            return None
        self.step_count += 1
        n = len(reqs)
        return ScheduledBatch(
            ForwardMode.DECODE, reqs, [len(r.kv_slots) - 1 for r in reqs], [1] * n, [True] * n
        )

    def retract(self, req: Req) -> None:
        """Out of KV: put a running request back in the queue; its computed KV stays in the cache."""
        self.running.remove(req)
        self._requeue(req)

    def _requeue(self, req: Req) -> None:
        """A retracted request (out of every queue) to the front of the waiting queue; its
        computed KV goes to the radix cache."""
        self.release(req, cache_kv=True)
        req.retractions += 1
        self.num_retractions += 1
        self.waiting.appendleft(req)

    def after_step(self, batch: ScheduledBatch) -> None:
        """Called once the batch ran: move prefilled requests to running, keep the chunked one,
        and apply rebases (chains and jump-forward) requested by output processing."""
        if batch.draft_lens:
            for req, d in zip(batch.reqs, batch.draft_lens):
                # KV past the output's last token (at most the draft) holds drafts that were not kept
                extra = req.kv_len - (req.seq_len - 1) if d else 0
                if extra > 0:
                    self._undo_alloc(req, min(extra, d))
        elif batch.mode is ForwardMode.EXTEND:
            nxt = self.chunked_next
            extended = len(batch.reqs) - batch.num_decode
            for req, sampled in zip(batch.reqs[:extended], batch.sample[:extended]):
                if req.finished:
                    continue
                # publish the computed prompt KV in the tree now, so requests sharing the prefix can
                # reuse it while this one is still running
                self._cache_partial(req)
                if sampled:
                    self.running.append(req)
            self.chunked = nxt
        for req in batch.reqs:
            if not req.finished:
                self.apply_rebase(req)

    def apply_rebase(self, req: Req) -> None:
        """Apply the rebase output processing asked for (``req.rebase_to``), if any. ``after_step``
        does it for the step's requests; a request ended mid-step (``Engine.abort`` from a stream
        callback) gets it first, so that its result holds the tokens its text is of (a chain's
        next generation reported the previous one's tokens) and its KV is cached under them."""
        if req.rebase_to is not None:
            self._rebase(req, *req.rebase_to)
            req.rebase_to = None

    def _rebase(self, req: Req, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Make ``prompt_ids + output_ids`` the request's tokens, keeping the KV of the common prefix.

        Used between the generations of a chain (everything so far becomes the next prompt) and for
        jump-forward (forced tokens join the output). At least the last token is recomputed: its
        logits are needed to sample.
        """
        new_ids = prompt_ids + output_ids
        c = min(common_prefix_len(req.fill_ids[: req.kv_len], new_ids), len(new_ids) - 1)
        if req in self.running:
            self.running.remove(req)
        if c < req.cache_len:
            # the change reaches into KV the radix cache owns: start over from the cache (rare)
            self.release(req, cache_kv=True)
            req.prompt_ids, req.output_ids = list(prompt_ids), list(output_ids)
            self.waiting.appendleft(req)
            return
        dropped = len(req.kv_slots) - c
        if dropped:
            self._undo_alloc(req, dropped)
        req.prompt_ids, req.output_ids = list(prompt_ids), list(output_ids)
        if len(new_ids) - c == 1:
            self.running.append(req)
        else:
            self.extending.append(req)

    def finish(self, req: Req, cache_kv: bool = True) -> None:
        """Drop a finished (or failed) request from the queues and release its KV."""
        if req in self.running:
            self.running.remove(req)
        if req is self.chunked:
            self.chunked = None
        if req in self.extending:
            self.extending.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.release(req, cache_kv=cache_kv)
