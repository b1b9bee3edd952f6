from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmir_lang.executor.kv_pool import KVPool
from llmir_lang.executor.radix_cache import RadixCache, RadixCacheError, RadixNode

torch.set_num_threads(1)


def make(capacity: int = 64, page_size: int = 1, disable: bool = False) -> tuple[KVPool, RadixCache]:
    pool = KVPool(1, 1, 2, capacity, torch.float32, "cpu", page_size=page_size)
    return pool, RadixCache(pool, disable=disable)


def fill(pool: KVPool, cache: RadixCache, tokens: list[int]) -> torch.Tensor:
    """Allocate fresh slots for ``tokens``, insert them, free duplicates; return the slots used."""
    slots = pool.alloc(len(tokens))
    assert slots is not None
    prefix_len = cache.insert(tokens, slots)
    pool.free(slots[:prefix_len])
    aligned = len(tokens) - len(tokens) % pool.page_size
    if aligned < len(tokens):
        pool.free(slots[aligned:])
    return slots


def path_of(node: RadixNode) -> tuple[int, ...]:
    keys = []
    while node.parent is not None:
        keys.append(node.key)
        node = node.parent
    return tuple(t for key in reversed(keys) for t in key)


# --- unit tests -------------------------------------------------------------------------------
def test_empty_cache_matches_nothing() -> None:
    _, cache = make()
    m = cache.match_prefix([1, 2, 3])
    assert m.length == 0 and m.slots.numel() == 0 and m.node is cache.root
    assert cache.match_prefix([]).length == 0


def test_insert_then_match_prefixes() -> None:
    pool, cache = make()
    slots = fill(pool, cache, [1, 2, 3, 4])
    assert cache.total_size == 4 and cache.evictable_size == 4 and pool.num_used == 4
    for query, length in (([1, 2, 3, 4], 4), ([1, 2, 3, 4, 5, 6], 4), ([1, 2, 9], 2), ([7], 0), ([1], 1)):
        m = cache.match_prefix(query)
        assert m.length == length and m.slots.tolist() == slots[:length].tolist()
        assert path_of(m.node) == tuple(query[:length])
    assert cache.match_prefix(torch.tensor([1, 2, 3])).length == 3  # token ids as a tensor work too


def test_match_splits_node() -> None:
    pool, cache = make()
    slots = fill(pool, cache, [1, 2, 3, 4])
    m = cache.match_prefix([1, 2, 9])
    assert m.node.key == (1, 2) and m.node.value.tolist() == slots[:2].tolist()
    (lower,) = m.node.children.values()
    assert lower.key == (3, 4) and lower.parent is m.node and lower.value.tolist() == slots[2:].tolist()
    assert cache.total_size == 4  # a split moves no memory


def test_insert_diverging_splits_and_reports_prefix_len() -> None:
    pool, cache = make()
    a = fill(pool, cache, [1, 2, 3, 4])
    b = pool.alloc(4)
    assert b is not None
    assert cache.insert([1, 2, 5, 6], b) == 2
    pool.free(b[:2])  # duplicates of [1, 2]: ours to free
    assert cache.total_size == 6 and pool.num_used == 6
    assert cache.match_prefix([1, 2, 5, 6]).slots.tolist() == a[:2].tolist() + b[2:].tolist()
    assert cache.match_prefix([1, 2, 3, 4]).slots.tolist() == a.tolist()
    assert set(cache.root.children[1].children) == {3, 5}


def test_duplicate_insert_owns_nothing_new() -> None:
    pool, cache = make()
    a = fill(pool, cache, [1, 2, 3])
    b = pool.alloc(3)
    assert b is not None
    assert cache.insert([1, 2, 3], b) == 3
    pool.free(b)
    assert cache.total_size == 3 and pool.num_used == 3
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == a.tolist()
    # Extending an existing sequence: the tree takes only the new part.
    c = pool.alloc(5)
    assert c is not None
    assert cache.insert([1, 2, 3, 4, 5], c) == 3
    pool.free(c[:3])
    assert cache.total_size == 5 and pool.num_used == 5
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == a.tolist() + c[3:].tolist()


def test_insert_length_mismatch_raises() -> None:
    _, cache = make()
    with pytest.raises(RadixCacheError, match="one KV slot per token"):
        cache.insert([1, 2, 3], torch.tensor([0, 1]))


def test_lock_protects_from_eviction() -> None:
    pool, cache = make()
    fill(pool, cache, [1, 2, 3, 4])
    fill(pool, cache, [1, 2, 5, 6])
    fill(pool, cache, [7, 8])
    m = cache.match_prefix([1, 2, 3])
    cache.lock(m.node)  # locks [1, 2] then [3] (after the split)
    assert cache.protected_size == 3 and cache.evictable_size == 5
    assert cache.evict(100) == 5  # everything but the locked path
    assert cache.total_size == 3 and pool.num_used == 3
    assert cache.match_prefix([1, 2, 3, 4]).length == 3
    assert m.slots.tolist() == cache.match_prefix([1, 2, 3]).slots.tolist()
    cache.unlock(m.node)
    assert cache.protected_size == 0 and cache.evictable_size == 3
    assert cache.evict(1) == 1  # the leaf [3] goes first (whole nodes only)
    assert cache.evict(10) == 2 and pool.num_used == 0


def test_lock_counts_and_unlock_underflow() -> None:
    pool, cache = make()
    fill(pool, cache, [1, 2, 3])
    m = cache.match_prefix([1, 2, 3])
    cache.lock(m.node)
    cache.lock(m.node)
    cache.unlock(m.node)
    assert cache.protected_size == 3
    cache.unlock(m.node)
    assert cache.protected_size == 0
    with pytest.raises(RadixCacheError, match="not locked"):
        cache.unlock(m.node)
    cache.lock(cache.root)  # the root is never counted
    cache.unlock(cache.root)
    assert cache.protected_size == 0 and cache.evictable_size == 3


def test_split_keeps_locks() -> None:
    pool, cache = make()
    fill(pool, cache, [1, 2, 3, 4])
    m = cache.match_prefix([1, 2, 3, 4])
    cache.lock(m.node)
    fill(pool, cache, [1, 2, 9])  # splits the locked node
    assert cache.protected_size == 4 and cache.evictable_size == 1
    assert cache.evict(10) == 1
    cache.unlock(m.node)
    assert cache.evictable_size == 4 and cache.evict(10) == 4 and pool.num_used == 0


def test_evict_lru_order_and_parent_becomes_leaf() -> None:
    pool, cache = make()
    a = fill(pool, cache, [1, 1])
    fill(pool, cache, [2, 2])
    fill(pool, cache, [3, 3])
    fill(pool, cache, [3, 3, 4])  # a child of [3, 3], inserted last
    cache.match_prefix([1, 1])  # touch A: now B is the oldest
    assert cache.evict(1) == 2 and cache.match_prefix([2, 2]).length == 0
    # Next oldest leaf: [3, 3, 4]'s leaf [4]; its parent [3, 3] then becomes a leaf, older than A.
    assert cache.evict(2) == 3
    assert cache.match_prefix([3, 3]).length == 0 and cache.match_prefix([1, 1]).length == 2
    assert cache.evict(5) == 2 and cache.total_size == 0 and pool.num_used == 0
    assert cache.evict(5) == 0
    st = cache.stats()
    assert st["evictions"] == 4 and st["evicted_tokens"] == 7
    assert pool.num_free == pool.capacity and pool.is_free(a[0].item())


def test_stale_node_cannot_be_locked() -> None:
    pool, cache = make()
    fill(pool, cache, [1, 2])
    m = cache.match_prefix([1, 2])
    cache.evict(2)  # the caller broke the contract: it did not lock before evicting
    with pytest.raises(RadixCacheError, match="was evicted"):
        cache.lock(m.node)


def test_paged_matching_is_page_aligned() -> None:
    pool, cache = make(capacity=32, page_size=4)
    tokens = list(range(10))
    slots = fill(pool, cache, tokens)  # caches 8 tokens, the last 2 stay the caller's (freed)
    assert cache.total_size == 8 and pool.num_used == 8
    assert cache.match_prefix(tokens).length == 8
    assert cache.match_prefix(tokens[:7]).length == 4
    assert cache.match_prefix(tokens[:3]).length == 0
    m = cache.match_prefix([0, 1, 2, 3, 4, 5, 99, 7])  # diverges inside page 2: match page 1 only
    assert m.length == 4 and m.slots.tolist() == slots[:4].tolist() and m.node.key == (0, 1, 2, 3)
    assert list(cache.root.children) == [(0, 1, 2, 3)]


def test_paged_insert_splits_at_page_boundary() -> None:
    pool, cache = make(capacity=32, page_size=4)
    fill(pool, cache, list(range(8)))
    other = [0, 1, 2, 3, 4, 5, 99, 7, 8, 9, 10, 11]
    b = pool.alloc(len(other))
    assert b is not None
    assert cache.insert(other, b) == 4
    pool.free(b[:4])
    assert cache.total_size == 16 and pool.num_used == 16
    top = cache.root.children[(0, 1, 2, 3)]
    assert top.key == (0, 1, 2, 3) and set(top.children) == {(4, 5, 6, 7), (4, 5, 99, 7)}
    assert cache.match_prefix(other).slots.tolist()[4:] == b[4:].tolist()
    assert cache.evict(100) == 16 and pool.num_used == 0  # freeing whole pages, none twice


def test_record_stats() -> None:
    pool, cache = make()
    fill(pool, cache, [1, 2, 3])
    cache.match_prefix([1, 2, 3, 4], record_stats=True)
    cache.match_prefix([9, 9, 9, 9], record_stats=True)
    cache.match_prefix([1, 2])  # not recorded
    st = cache.stats()
    assert st["hit_tokens"] == 3 and st["requested_tokens"] == 8 and st["hit_rate"] == 3 / 8
    assert st["cached_tokens"] == 3 and st["evictable_tokens"] == 3 and st["protected_tokens"] == 0


def test_reset_frees_everything_unless_locked() -> None:
    pool, cache = make()
    fill(pool, cache, [1, 2, 3])
    fill(pool, cache, [1, 5])
    m = cache.match_prefix([1, 5])
    cache.lock(m.node)
    with pytest.raises(RadixCacheError, match="still locked"):
        cache.reset()
    cache.unlock(m.node)
    cache.reset()
    assert cache.total_size == 0 and pool.num_used == 0 and cache.match_prefix([1, 2]).length == 0
    with pytest.raises(RadixCacheError, match="was evicted"):
        cache.lock(m.node)


def test_disabled_cache_never_matches_or_owns() -> None:
    pool, cache = make(disable=True)
    slots = pool.alloc(3)
    assert slots is not None
    assert cache.insert([1, 2, 3], slots) == 0
    m = cache.match_prefix([1, 2, 3], record_stats=True)
    assert m.length == 0 and m.node is cache.root
    assert cache.total_size == 0 and cache.evict(10) == 0
    assert cache.stats()["requested_tokens"] == 3
    pool.free(slots)  # still the caller's
    assert pool.num_used == 0


# --- stateful property test -------------------------------------------------------------------
@dataclass
class Running:
    """A request that holds a lock on its cached prefix and owns the KV of its uncached tail."""

    tokens: list[int]
    node: RadixNode  # locked; its path is tokens[: len(tree_slots)]
    tree_slots: torch.Tensor
    tail_slots: torch.Tensor  # the caller's, for tokens[len(tree_slots):]


# Sequences that share prefixes of every length and diverge anywhere (inside pages, too): a cut of
# one of a few long base sequences, then a random suffix.
_BASES = (
    [0] * 16,
    [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0],
    [1, 1, 0, 0, 2, 2, 1, 1, 0, 0, 2, 2, 1, 1, 0, 0],
)
token_lists = st.builds(
    lambda base, cut, suffix: base[:cut] + suffix,
    st.sampled_from(_BASES),
    st.integers(0, 16),
    st.lists(st.integers(0, 2), max_size=4),
).map(lambda t: t[:16])


class RadixCacheMachine(RuleBasedStateMachine):
    """Drives a pool + radix cache the way an engine does and checks it against a set model.

    The model is the set of cached page-aligned prefixes: the tree caches tokens in whole pages, and
    the page that ends at prefix ``P`` holds the KV of ``P``'s last ``page_size`` tokens. Every slot's
    K holds an id of the token prefix ending at it, written at allocation time, so any mix-up of
    slots (a wrong match, a locked slot freed and reused) shows up as a wrong value.
    """

    PAGE: ClassVar[int] = 1
    CAPACITY: ClassVar[int] = 24

    def __init__(self) -> None:
        super().__init__()
        self.pool = KVPool(1, 1, 2, self.CAPACITY, torch.float32, "cpu", page_size=self.PAGE)
        self.cache = RadixCache(self.pool)
        self.cached: set[tuple[int, ...]] = set()
        self.prefix_ids: dict[tuple[int, ...], int] = {}
        self.running: list[Running] = []
        self.extra_locks: list[tuple[tuple[int, ...], RadixNode]] = []

    # helpers -----------------------------------------------------------------------------------
    def write(self, tokens: list[int], start: int, slots: torch.Tensor) -> None:
        ids = [
            self.prefix_ids.setdefault(tuple(tokens[: start + i + 1]), len(self.prefix_ids) + 1)
            for i in range(len(slots))
        ]
        k, v = self.pool.k_buffers[0], self.pool.v_buffers[0]
        k[slots, 0, 0] = torch.tensor(ids, dtype=torch.float32)
        v[slots, 0, 0] = -k[slots, 0, 0]

    def check_values(self, prefixes: list[tuple[int, ...]], slots: torch.Tensor) -> None:
        """``slots[i]`` holds the KV written for token prefix ``prefixes[i]`` and is not free."""
        want = torch.tensor([self.prefix_ids[p] for p in prefixes], dtype=torch.float32)
        assert torch.equal(self.pool.k_buffers[0][slots, 0, 0], want)
        assert torch.equal(self.pool.v_buffers[0][slots, 0, 0], -want)
        assert not any(self.pool.is_free(s) for s in slots.tolist())

    def check_sequence(self, tokens: list[int] | tuple[int, ...], slots: torch.Tensor) -> None:
        self.check_values([tuple(tokens[: i + 1]) for i in range(len(slots))], slots)

    def aligned(self, n: int) -> int:
        return n - n % self.PAGE

    def page_prefixes(self, tokens: list[int] | tuple[int, ...], n: int) -> set[tuple[int, ...]]:
        return {tuple(tokens[:i]) for i in range(self.PAGE, n + 1, self.PAGE)}

    def expected_match(self, tokens: list[int]) -> int:
        best = 0
        for n in range(self.PAGE, len(tokens) + 1, self.PAGE):
            if tuple(tokens[:n]) not in self.cached:
                break
            best = n
        return best

    def walk(self) -> list[tuple[RadixNode, tuple[int, ...]]]:
        """Every node but the root with the token path that ends at it."""
        out, stack = [], [(c, c.key) for c in self.cache.root.children.values()]
        while stack:
            node, path = stack.pop()
            out.append((node, path))
            stack.extend((c, path + c.key) for c in node.children.values())
        return out

    def tree_pages(self) -> set[tuple[int, ...]]:
        return {
            path[: len(path) - len(n.key) + i]
            for n, path in self.walk()
            for i in range(self.PAGE, len(n.key) + 1, self.PAGE)
        }

    def owned_slots(self) -> set[int]:
        owned = {s for n, _ in self.walk() for s in n.value.tolist()}
        return owned | {s for r in self.running for s in r.tail_slots.tolist()}

    def alloc(self, n: int, last_slot: int | None = None) -> torch.Tensor | None:
        slots = self.pool.alloc(n, last_slot)
        if slots is None:
            self.evict_and_check(n + self.PAGE)
            slots = self.pool.alloc(n, last_slot)
        if slots is not None:
            assert not self.owned_slots() & set(slots.tolist()), "alloc handed out a slot somebody owns"
        return slots

    def evict_and_check(self, n: int) -> int:
        before = self.cached
        freed = self.cache.evict(n)
        after = self.tree_pages()
        assert after <= before and freed == (len(before) - len(after)) * self.PAGE
        assert freed >= n or self.cache.evictable_size == 0
        locked = [r.tokens[: len(r.tree_slots)] for r in self.running] + [p for p, _ in self.extra_locks]
        for path in locked:
            assert self.page_prefixes(path, len(path)) <= after, "a locked prefix was evicted"
        self.cached = after
        return freed

    def insert_and_settle(self, tokens: list[int], slots: torch.Tensor, own_from: int) -> int:
        """Insert as a finishing request does and free our duplicates; slots[own_from:] are ours.

        Returns aligned_len: slots from there on stay ours.
        """
        expected = self.expected_match(tokens)
        prefix_len = self.cache.insert(tokens, slots)
        assert prefix_len == expected
        if prefix_len > own_from:
            self.pool.free(slots[own_from:prefix_len])
        aligned = self.aligned(len(tokens))
        self.cached |= self.page_prefixes(tokens, aligned)
        return aligned

    # rules -------------------------------------------------------------------------------------
    @rule(tokens=token_lists, use_match=st.booleans(), keep=st.booleans())
    def request(self, tokens: list[int], use_match: bool, keep: bool) -> None:
        node, prefix, prefix_slots = self.cache.root, 0, torch.empty(0, dtype=torch.int64)
        if use_match:  # the engine's path; without it, insert sees duplicates it must report
            m = self.cache.match_prefix(tokens, record_stats=True)
            assert m.length == self.expected_match(tokens)
            node, prefix, prefix_slots = m.node, m.length, m.slots
            self.cache.lock(node)
        new = self.alloc(len(tokens) - prefix)
        if new is None:  # out of memory even after eviction: the request is rejected
            if use_match:
                self.cache.unlock(node)
            return
        self.write(tokens, prefix, new)
        full = torch.cat([prefix_slots, new])
        aligned = self.insert_and_settle(tokens, full, own_from=prefix)
        if keep:
            m2 = self.cache.match_prefix(tokens[:aligned])
            assert m2.length == aligned
            self.cache.lock(m2.node)
            self.running.append(Running(tokens, m2.node, m2.slots, full[aligned:]))
        elif aligned < len(tokens):
            self.pool.free(full[aligned:])
        if use_match:
            self.cache.unlock(node)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99), more=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def decode(self, i: int, more: list[int]) -> None:
        r = self.running[i % len(self.running)]
        last = r.tail_slots if r.tail_slots.numel() else r.tree_slots
        last_slot = int(last[-1]) if last.numel() else None
        new = self.alloc(len(more), last_slot)
        if new is None:
            return
        if r.tail_slots.numel() and self.PAGE > 1:  # the request's own page is filled first
            assert last_slot is not None
            room = min(self.PAGE - 1 - last_slot % self.PAGE, len(more))
            assert new[:room].tolist() == list(range(last_slot + 1, last_slot + 1 + room))
        start = len(r.tokens)
        r.tokens = r.tokens + more
        self.write(r.tokens, start, new)
        r.tail_slots = torch.cat([r.tail_slots, new])

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99), cache_it=st.booleans())
    def finish(self, i: int, cache_it: bool) -> None:
        r = self.running.pop(i % len(self.running))
        own_from = len(r.tree_slots)
        full = torch.cat([r.tree_slots, r.tail_slots])
        aligned = self.insert_and_settle(r.tokens, full, own_from) if cache_it else own_from
        if aligned < len(full):
            self.pool.free(full[aligned:])
        self.cache.unlock(r.node)

    @rule(tokens=token_lists)
    def match(self, tokens: list[int]) -> None:
        m = self.cache.match_prefix(tokens)
        assert m.length == self.expected_match(tokens) == len(m.slots)
        assert m.length % self.PAGE == 0 and path_of(m.node) == tuple(tokens[: m.length])
        self.check_sequence(tokens, m.slots)

    @rule(tokens=token_lists)
    def lock_match(self, tokens: list[int]) -> None:
        m = self.cache.match_prefix(tokens)
        self.cache.lock(m.node)
        self.extra_locks.append((tuple(tokens[: m.length]), m.node))

    @precondition(lambda self: self.extra_locks)
    @rule(i=st.integers(0, 99))
    def unlock_match(self, i: int) -> None:
        _, node = self.extra_locks.pop(i % len(self.extra_locks))
        self.cache.unlock(node)

    @rule(n=st.integers(0, 30))
    def evict(self, n: int) -> None:
        self.evict_and_check(n)

    @precondition(lambda self: not self.running and not self.extra_locks)
    @rule()
    def reset(self) -> None:
        self.cache.reset()
        self.cached = set()
        assert self.pool.num_used == 0

    # invariants (one function: one tree walk per step) -----------------------------------------
    @invariant()
    def consistent(self) -> None:
        nodes = self.walk()
        # The tree holds exactly the model's prefixes, each slot once, with the KV written for it.
        assert self.tree_pages() == self.cached
        if nodes:
            slots = torch.cat([n.value for n, _ in nodes])
            assert len(set(slots.tolist())) == len(slots), "a slot is owned twice by the tree"
            prefixes = [
                path[: len(path) - len(n.key) + i + 1] for n, path in nodes for i in range(len(n.key))
            ]
            self.check_values(prefixes, slots)
        # Lock counts: a node is locked once per lock whose path runs through it; sizes agree.
        locked = [path_of(r.node) for r in self.running] + [p for p, _ in self.extra_locks]
        protected = sum(len(n.key) for n, _ in nodes if n.lock_ref)
        for n, path in nodes:
            assert n.lock_ref == sum(p[: len(path)] == path for p in locked)
            assert len(n.key) % self.PAGE == 0 and len(n.value) == len(n.key)
        assert self.cache.protected_size == protected
        assert self.cache.evictable_size == sum(len(n.key) for n, _ in nodes) - protected
        # Running requests' KV (locked prefix and own tail) is intact and not free.
        for r in self.running:
            self.check_sequence(r.tokens, torch.cat([r.tree_slots, r.tail_slots]))
        # Memory: pool free + used == capacity; tree + callers + free == capacity.
        pool = self.pool
        assert pool.num_free + pool.num_used == pool.capacity
        caller_pages = {s // self.PAGE for r in self.running for s in r.tail_slots.tolist()}
        assert self.cache.total_size + len(caller_pages) * self.PAGE + pool.num_free == pool.capacity


class PagedRadixCacheMachine(RadixCacheMachine):
    PAGE = 4
    CAPACITY = 32


_settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRadixCacheStateful = RadixCacheMachine.TestCase
TestRadixCacheStateful.settings = _settings
TestPagedRadixCacheStateful = PagedRadixCacheMachine.TestCase
TestPagedRadixCacheStateful.settings = _settings
