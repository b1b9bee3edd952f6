"""The scheduler's KV bookkeeping: slots for each step's tokens (evicting from the radix cache when
the pool is full), given back when a step fails or a request is done, computed KV moved into the
radix cache.

``Scheduler`` inherits this through ``SchedulerAdmission``. Needs of the scheduler: ``pool`` and
``cache``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llmir_lang.executor.cuda_graph import int64_tensor
from llmir_lang.executor.request import Req

if TYPE_CHECKING:
    from llmir_lang.executor.kv_pool import KVPool
    from llmir_lang.executor.radix_cache import RadixCache
    from llmir_lang.executor.scheduled_batch import ScheduledBatch


class SchedulerKV:
    pool: KVPool
    cache: RadixCache

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

    # ---- a step's slots ----------------------------------------------------------------
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


def _t(slots: list[int]) -> torch.Tensor:
    return int64_tensor(slots)
