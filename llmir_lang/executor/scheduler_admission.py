"""Admission and extend steps: which waiting requests start (longest cached prefix first, starving
ones ahead), chunked prefill, the forced text of admitted requests, and mixed steps that run short
extends together with every running request's decode row.

``Scheduler`` inherits this. Needs of the scheduler: its config ``cfg``, its queues (``waiting``,
``running``, ``chunked``, ``chunked_next``, ``extending``) and ``step_count``.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from llmir_lang.executor.attention import ForwardMode
from llmir_lang.executor.request import Req
from llmir_lang.executor.scheduled_batch import ScheduledBatch
from llmir_lang.executor.scheduler_kv import SchedulerKV, _t

if TYPE_CHECKING:
    from llmir_lang.executor.scheduler import SchedulerConfig


class SchedulerAdmission(SchedulerKV):
    cfg: SchedulerConfig
    waiting: deque[Req]
    running: list[Req]
    chunked: Req | None
    chunked_next: Req | None
    extending: list[Req]
    step_count: int

    # ---- admission and extend steps -----------------------------------------------------
    def _max_match(self, req: Req) -> int:
        # at least one token must be computed to get logits; prompt logprobs need their positions
        limit = req.seq_len - 1
        if req.logprob_start_len >= 0:
            limit = min(limit, req.logprob_start_len)
        return max(limit, 0)

    def _order_waiting(self) -> list[Req]:
        reqs = list(self.waiting)
        step = self.step_count
        if len(reqs) > self.cfg.lpm_max_waiting:
            return reqs  # FCFS: matching every request each step would cost more than it saves
        lens = {r.rid: self.cache.match_prefix(r.fill_ids[: self._max_match(r)]).length for r in reqs}

        def key(r: Req):
            starving = step - r.arrival_step > self.cfg.max_wait_steps
            return (not starving, -lens[r.rid] if not starving else 0, r.arrival_step)

        return sorted(reqs, key=key)

    def _schedule_extend(self) -> ScheduledBatch | None:
        if not self.waiting and self.chunked is None and not self.extending:
            return None
        budget = self.cfg.max_prefill_tokens
        slots_left = self.cfg.max_running_requests - len(self.running)
        reqs, prefix_lens, extend_lens, sample = [], [], [], []
        ongoing = ([self.chunked] if self.chunked is not None else []) + list(self.extending)
        candidates = ongoing + self._order_waiting()
        self.chunked_next = None
        stalled = False  # an admitted request found no room: admit no new one ahead of it
        shared: dict[int, set[tuple[int, ...]]] = {}  # for _shares_uncached
        for req in candidates:
            if budget <= 0 or slots_left <= 0:
                break
            fresh = req not in ongoing
            if fresh and stalled:
                break
            if fresh:
                ids = req.fill_ids[: self._max_match(req)]
                m = self.cache.match_prefix(ids)
                if reqs and self._shares_uncached(ids, m.length, reqs, shared):
                    continue  # its prefix is being computed in this batch: next step it is a cache hit
                if req.cached_prompt_tokens < 0:
                    m = self.cache.match_prefix(ids, record_stats=True)
                self.cache.lock(m.node)
                req.kv_slots, req.cache_len, req.last_node = m.slots.tolist(), m.length, m.node
            prefix = req.kv_len
            want = req.seq_len - prefix
            n = min(want, budget, self.cfg.chunked_prefill_size)
            slots = self._alloc(n, self._own_last_slot(req))
            if slots is not None and self.running:
                # keep one decode step of room for the running requests, or admission just causes retraction
                room = self.pool.num_free + self.cache.evictable_size
                if room < len(self.running) + len(reqs) + 1:
                    self.pool.free(
                        _t([x for x in slots if self.pool.page_size == 1 or x % self.pool.page_size == 0])
                    )
                    slots = None
            if slots is None:
                if fresh:
                    self.release(req, cache_kv=False)
                elif req is not self.chunked:
                    # a request with forced text to compute waits for room; the others may still
                    # fit (each one that runs moves on and frees KV in time)
                    stalled = True
                    continue
                break
            if fresh:
                self.waiting.remove(req)
                if req.cached_prompt_tokens < 0:
                    req.cached_prompt_tokens = min(prefix, len(req.prompt_ids))
            elif req in self.extending:
                self.extending.remove(req)
            req.kv_slots.extend(slots)
            done = n == want
            if not done:
                self.chunked_next = req
            reqs.append(req)
            for cached, seen in shared.items():
                seen.update(self._shared_key(req, cached))
            prefix_lens.append(prefix)
            extend_lens.append(n)
            sample.append(done)
            budget -= n
            slots_left -= 1
            if not done:
                break  # one chunked request per step, and it is the last one of the batch
        if not reqs:
            return None
        if self.chunked is not None and self.chunked not in reqs:
            self.chunked_next = self.chunked  # could not continue this step: keep it for the next
        return ScheduledBatch(ForwardMode.EXTEND, reqs, prefix_lens, extend_lens, sample)

    def _schedule_mixed(self) -> ScheduledBatch | None:
        """Short extends of admitted requests plus one decode row for every running request, in one
        forward; None when mixing does not apply (nothing to decode, prompts waiting or in chunked
        prefill, a long extend, or too many requests for one batch).

        A short extend adds a few rows to a decode step's forward, far less than a forward of its
        own costs, so it never pays to make the decoding requests wait for it.
        """
        cfg = self.cfg
        if not (self.extending and self.running) or self.waiting or self.chunked is not None:
            return None
        if len(self.extending) + len(self.running) > cfg.max_running_requests:
            return None
        if any(r.seq_len - r.kv_len > cfg.max_mixed_extend for r in self.extending):
            return None
        batch = self._schedule_extend()
        if batch is None:
            return None
        decoding = list(self.running)
        if not self._alloc_decode(decoding):
            return batch  # no room to decode now: the next decode step retracts as usual
        n = len(decoding)
        batch.reqs += decoding
        batch.prefix_lens += [len(r.kv_slots) - 1 for r in decoding]
        batch.extend_lens += [1] * n
        batch.sample += [True] * n
        batch.num_decode = n
        return batch

    def _shares_uncached(
        self, ids: list[int], cached: int, batch: list[Req], shared: dict[int, set[tuple[int, ...]]]
    ) -> bool:
        """Would ``ids`` reuse at least ``min_shared`` tokens that a request of this batch computes now?
        ``shared`` holds, per cached length seen in this schedule, the batch's tokens in
        ``[cached, cached + min_shared)`` (kept up to date as requests join the batch), so a
        batch of n fresh requests costs n lookups, not n * n list compares."""
        need = cached + self.cfg.min_shared_prefix
        if len(ids) < need:
            return False
        seen = shared.get(cached)
        if seen is None:
            seen = shared[cached] = {key for other in batch for key in self._shared_key(other, cached)}
        return tuple(ids[cached:need]) in seen

    def _shared_key(self, req: Req, cached: int) -> tuple[tuple[int, ...], ...]:
        """``req``'s tokens ``[cached, cached + min_shared)`` as a key (none if it is shorter),
        without building its ``fill_ids``."""
        need = cached + self.cfg.min_shared_prefix
        if req.seq_len < need:
            return ()
        p = req.prompt_ids
        if need <= len(p):
            return (tuple(p[cached:need]),)
        return (tuple(p[cached:] + req.output_ids[max(cached - len(p), 0) : need - len(p)]),)
