"""Continuous batching: admission by longest cached prefix, chunked prefill, decode, retraction.

The scheduler owns the KV bookkeeping of every request (see ``Req``): it matches and locks cached
prefixes at admission, allocates slots for each step, and returns KV to the radix cache (finished or
retracted requests) or to the pool (failed requests). It never runs the model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from llmir_lang.executor.attention import ForwardMode
from llmir_lang.executor.cuda_graph import int64_tensor
from llmir_lang.executor.kv_pool import KVPool
from llmir_lang.executor.radix_cache import RadixCache
from llmir_lang.executor.request import Req, common_prefix_len


@dataclass(slots=True)
class ScheduledBatch:
    mode: ForwardMode
    reqs: list[Req]
    prefix_lens: list[int]  # KV tokens each request had before this step
    extend_lens: list[int]  # new tokens each request computes in this step
    sample: list[bool]  # whether the request samples a token after this step
    # mixed step (mode EXTEND): the last ``num_decode`` requests are running requests that decode
    # one token in the same forward as the extends before them; they stay in ``running``
    num_decode: int = 0
    # speculative decode step (mode EXTEND, every request a running one, ``num_decode`` == all):
    # request b computes its last token and ``draft_lens[b]`` draft tokens (``Req.draft``), and
    # samples at each of those positions; empty when no request drafts
    draft_lens: list[int] = field(default_factory=list)

    def only(self, i: int) -> ScheduledBatch:
        """The step of request ``i`` alone (its KV slots are already allocated): the engine reruns
        a failed step one request at a time. A decode row of a mixed or speculative step stays a
        decode row (``num_decode`` 1)."""
        decode_row = i >= len(self.reqs) - self.num_decode
        return ScheduledBatch(
            self.mode,
            [self.reqs[i]],
            [self.prefix_lens[i]],
            [self.extend_lens[i]],
            [self.sample[i]],
            num_decode=1 if decode_row else 0,
            draft_lens=[self.draft_lens[i]] if self.draft_lens else [],
        )


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


class Scheduler:
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

    # ---- KV helpers ---------------------------------------------------------------------
    def _alloc(self, n: int, last_slot: int | None) -> list[int] | None:
        slots = self.pool.alloc(n, last_slot)
        if slots is None:
            self.cache.evict(self._evict_amount(n + self.pool.page_size))
            slots = self.pool.alloc(n, last_slot)
        return None if slots is None else slots.tolist()

    def _evict_amount(self, need: int) -> int:
        # each evict walks every unlocked leaf of the tree: freeing only one step's need on a full
        # pool made every decode step pay that walk (12% of a 3,000-program extraction batch in a
        # 64 MB pool); a 64th of the pool at a time makes it rare
        return max(need, self.pool.capacity // 64)

    def _own_last_slot(self, req: Req) -> int | None:
        # only a page this request owns may be continued
        return req.kv_slots[-1] if req.kv_len > req.cache_len else None

    def _undo_alloc(self, req: Req, n: int) -> None:
        new = req.kv_slots[len(req.kv_slots) - n :]
        # a new list, never a cut in place: the decode slot table (cuda_graph.SlotTable) re-uploads
        # a request's row when its list object changes; a list cut and regrown to the same length
        # in place kept the old slots there, and a later decode step read KV another request had
        # since written (found by tests/dsl/test_random_programs_engine.py)
        req.kv_slots = req.kv_slots[: len(req.kv_slots) - n]
        p = self.pool.page_size
        # pages continued from earlier slots stay; only pages this allocation opened go back
        fresh = [s for s in new if p == 1 or s % p == 0]
        if fresh:
            self.pool.free(_t(fresh))

    def drop_kv_past(self, req: Req, n: int) -> bool:
        """Give back the request's own KV past its first ``n`` tokens (a verify step's draft KV
        that output processing knows is stale before ``after_step`` runs). False, and nothing
        dropped, when that KV reaches into the radix cache's part."""
        if n < req.cache_len:
            return False
        if req.kv_len > n:
            self._undo_alloc(req, req.kv_len - n)
        return True

    def _insert_computed(self, req: Req) -> tuple[list[int], int]:
        """Insert the request's computed KV into the tree and free the slots that duplicate KV the
        tree already had. Returns the inserted ids and their page-aligned length: slots past it
        (a partly filled last page) still belong to the request."""
        n = req.kv_len
        ids = req.fill_ids[:n]
        prefix_len = self.cache.insert(ids, _t(req.kv_slots))
        dup = req.kv_slots[req.cache_len : max(prefix_len, req.cache_len)]
        if dup:
            self.pool.free(_t(dup))
        return ids, n - n % self.pool.page_size

    def release(self, req: Req, cache_kv: bool = True) -> None:
        """Give up the request's KV: computed KV goes into the radix cache, the rest to the pool."""
        if req.kv_len > req.seq_len:
            # NOTE: mid-step (an abort from a stream callback) slots past the tokens hold a verify
            # step's draft tokens, or the next token of a decode step launched ahead: no KV of
            # ``fill_ids``. Inserting them raised RadixCacheError into the callback.
            self._undo_alloc(req, req.kv_len - req.seq_len)
        if req.kv_len and cache_kv and not self.cache.disable:
            _, aligned = self._insert_computed(req)
            tail = req.kv_slots[aligned:]
            if tail:
                self.pool.free(_t(tail))
        elif req.kv_len > req.cache_len:
            self.pool.free(_t(req.kv_slots[req.cache_len :]))
        if req.last_node is not None:
            self.cache.unlock(req.last_node)
        req.kv_slots, req.cache_len, req.last_node = [], 0, None

    def _cache_partial(self, req: Req) -> None:
        """After a prefill step: move the computed KV into the tree and lock its new end."""
        if self.cache.disable:
            return
        ids, aligned = self._insert_computed(req)
        tail = req.kv_slots[aligned:]
        m = self.cache.match_prefix(ids[:aligned])
        self.cache.lock(m.node)
        if req.last_node is not None:
            self.cache.unlock(req.last_node)
        req.kv_slots = m.slots.tolist() + tail
        req.cache_len, req.last_node = m.length, m.node

    def _max_match(self, req: Req) -> int:
        # at least one token must be computed to get logits; prompt logprobs need their positions
        limit = req.seq_len - 1
        if req.logprob_start_len >= 0:
            limit = min(limit, req.logprob_start_len)
        return max(limit, 0)

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

    def _alloc_decode(self, reqs: list[Req]) -> bool:
        """One more slot for every request, all or none (False: the pool is full even after eviction).

        The same slots as one ``_alloc(1, ...)`` per request in order, in one pool call: a request
        continues its own page while the page has room, and the others take a fresh page each, in
        the order the pool hands them out.
        """
        p = self.pool.page_size
        if p == 1:
            fresh = reqs
        else:
            fresh = [r for r in reqs if r.kv_len == r.cache_len or r.kv_slots[-1] % p == p - 1]
        pages: list[int] = []
        if fresh:
            got = self.pool.alloc(len(fresh) * p)
            if got is None:
                self.cache.evict(self._evict_amount(len(fresh) * p + p))
                got = self.pool.alloc(len(fresh) * p)
            if got is None:
                return False
            pages = got.tolist()[::p]
        if len(fresh) == len(reqs):
            for req, slot in zip(reqs, pages):
                req.kv_slots.append(slot)
            return True
        it = iter(pages)
        take = {id(r) for r in fresh}
        for req in reqs:
            slots = req.kv_slots
            slots.append(next(it) if id(req) in take else slots[-1] + 1)
        return True

    def _alloc_drafts(self, reqs: list[Req]) -> list[int]:
        """After ``_alloc_decode``: slots for each request's draft tokens, continuing its own page.
        Returns the draft length per request (0 where it has none or the pool has no room)."""
        lens = []
        for req in reqs:
            d = len(req.draft)
            if d:
                slots = self._alloc(d, self._own_last_slot(req))
                if slots is None:
                    d = 0
                else:
                    req.kv_slots.extend(slots)
            lens.append(d)
        return lens

    def undo_step_alloc(self, batch: ScheduledBatch) -> None:
        """Give back the slots ``batch`` allocated for its new tokens: its forward failed, so no KV
        in them counts (a request finished before its rerun, an abort from a stream callback say,
        then caches only KV that was computed)."""
        for req, p in zip(batch.reqs, batch.prefix_lens):
            if len(req.kv_slots) > p:
                self._undo_alloc(req, len(req.kv_slots) - p)

    def redo_step_alloc(self, batch: ScheduledBatch, i: int) -> bool:
        """Allocate request ``i``'s slots of ``batch`` again (after ``undo_step_alloc``), for its
        rerun alone. False where the pool has no room for them."""
        req = batch.reqs[i]
        n = batch.prefix_lens[i] + batch.extend_lens[i] - len(req.kv_slots)
        if n <= 0:
            return True
        slots = self._alloc(n, self._own_last_slot(req))
        if slots is None:
            return False
        req.kv_slots = req.kv_slots + slots  # a new list: the decode slot table re-reads it
        return True

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


def _t(slots: list[int]) -> torch.Tensor:
    return int64_tensor(slots)
