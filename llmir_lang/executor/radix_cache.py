"""The radix cache: a radix tree over token ids whose nodes own KV slots in a KVPool.

Requests that start with the same tokens reuse the KV of that prefix instead of recomputing it.
The tree is the only long-lived owner of KV besides running requests; it gives memory back to the
pool only by evicting unlocked leaves in least-recently-used order (or on reset).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from llmir_lang.errors import LLMIRError
from llmir_lang.executor.kv_pool import KVPool

_EMPTY_SLOTS = torch.empty(0, dtype=torch.int64)
_node_ids = itertools.count()


class RadixCacheError(LLMIRError, RuntimeError):
    """The radix cache was misused: unbalanced lock/unlock, a stale node, or reset while locked."""


@dataclass(slots=True, eq=False)
class RadixNode:
    """One edge of the tree together with the node it leads to.

    ``key`` holds the token ids of the edge and ``value`` their KV slots (same length, a multiple of
    page_size except at the root, whose key is empty). ``lock_ref`` counts the locks held on this
    node or any descendant; a node with ``lock_ref > 0`` is never evicted. ``last_access`` is a
    logical clock (larger = more recent) used for LRU eviction.
    """

    key: tuple[int, ...]
    value: torch.Tensor
    parent: RadixNode | None
    children: dict[int | tuple[int, ...], RadixNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0
    evicted: bool = False
    id: int = field(default_factory=lambda: next(_node_ids))

    def __len__(self) -> int:
        return len(self.key)

    def __repr__(self) -> str:
        head = list(self.key[:8]) + (["..."] if len(self.key) > 8 else [])
        return f"RadixNode(id={self.id}, len={len(self.key)}, key={head}, lock_ref={self.lock_ref})"


class MatchResult(NamedTuple):
    """The cached prefix of a token sequence.

    ``slots``: int64 CPU tensor, KV slots of the matched prefix in token order. ``node``: the deepest
    node whose root path is exactly the matched prefix (the root when nothing matched). ``length``:
    ``len(slots)``, a multiple of page_size.
    """

    slots: torch.Tensor
    node: RadixNode
    length: int


class RadixCache:
    """Prefix cache over token ids; the tree's nodes own KV slots of a KVPool.

    Contract (callers must follow it; the cache cannot check all of it):

    * A node returned by ``match_prefix`` must be ``lock``-ed before anything that can evict runs
      (``evict`` itself, or any later allocation that may trigger eviction). The slots of a match are
      valid only while its node stays locked; ``unlock`` it when the request no longer needs them.
    * Locked nodes (and so their ancestors) are never evicted.
    * ``insert`` transfers ownership: the tree owns the slots it newly stores (see ``insert``) and
      gives them back to the pool only through ``evict`` or ``reset``. Callers never free them.
    * With ``page_size`` p > 1 only whole pages are cached: keys are split only at page boundaries,
      and matches and inserts consider only the page-aligned prefix of the tokens. The caller's slots
      must be page-aligned to token positions (token i sits at offset i % p of its page), which is
      what ``KVPool.alloc`` gives when a request continues its own pages after an aligned match.
    * ``disable=True``: ``match_prefix`` never matches and ``insert`` stores nothing (returns 0);
      the caller keeps and frees all its slots.

    Accounting: ``evictable_size + protected_size == total_size`` tokens held by the tree, where a
    node counts as protected while its ``lock_ref > 0``.
    """

    def __init__(self, pool: KVPool, disable: bool = False) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.disable = disable
        self._clock = 0
        self._hit_tokens = 0
        self._requested_tokens = 0
        self._evicted_nodes = 0
        self._evicted_tokens = 0
        self._init_tree()

    def _init_tree(self) -> None:
        self.root = RadixNode(key=(), value=_EMPTY_SLOTS, parent=None)
        self.root.lock_ref = 1  # the root is never evictable; lock/unlock skip it
        self._evictable_size = 0
        self._protected_size = 0

    # --- sizes --------------------------------------------------------------------------------
    @property
    def evictable_size(self) -> int:
        """Tokens in unlocked nodes: what ``evict`` could free right now."""
        return self._evictable_size

    @property
    def protected_size(self) -> int:
        """Tokens in locked nodes."""
        return self._protected_size

    @property
    def total_size(self) -> int:
        """Tokens (== slots) the tree owns."""
        return self._evictable_size + self._protected_size

    # --- matching and inserting ---------------------------------------------------------------
    def match_prefix(
        self, token_ids: Sequence[int] | torch.Tensor, *, record_stats: bool = False
    ) -> MatchResult:
        """The longest cached page-aligned prefix of ``token_ids``.

        Touches the LRU clock of every node on the path. If the match ends inside a node's key, that
        node is split so the returned node's path is exactly the match. ``record_stats`` adds
        ``len(token_ids)`` to requested tokens and the match length to hit tokens.
        """
        tokens = _as_tuple(token_ids)
        node, values, length = self.root, [], 0
        if not self.disable:
            node, values, length = self._walk(tokens[: self._aligned(len(tokens))])
        if record_stats:
            self._requested_tokens += len(tokens)
            self._hit_tokens += length
        slots = _EMPTY_SLOTS if not values else values[0] if len(values) == 1 else torch.cat(values)
        return MatchResult(slots, node, length)

    def insert(self, token_ids: Sequence[int] | torch.Tensor, slots: torch.Tensor) -> int:
        """Cache the page-aligned prefix of ``(token_ids, slots)``; return ``prefix_len``.

        ``prefix_len`` is how many leading tokens were already in the tree. Ownership afterwards,
        with ``aligned_len`` = ``len(token_ids)`` rounded down to a page multiple:

        * ``slots[:prefix_len]`` duplicate KV the tree already has; the tree does not take them.
          The caller must free those it allocated itself (not those it got from ``match_prefix``).
        * ``slots[prefix_len:aligned_len]`` now belong to the tree.
        * ``slots[aligned_len:]`` stay the caller's.
        """
        tokens = _as_tuple(token_ids)
        if len(slots) != len(tokens):
            raise RadixCacheError(
                f"RadixCache.insert: got {len(tokens)} token ids but {len(slots)} slots; pass one KV slot "
                "per token id"
            )
        if self.disable:
            return 0
        n = self._aligned(len(tokens))
        tokens = tokens[:n]
        node, _, pos = self._walk(tokens)
        if pos < n:
            key = tokens[pos:]
            leaf = RadixNode(
                key=key,
                value=slots[pos:n].to(device="cpu", dtype=torch.int64).clone(),
                parent=node,
                last_access=self._tick(),
            )
            node.children[self._child_key(key)] = leaf
            self._evictable_size += len(key)
        return pos

    def _walk(self, tokens: tuple[int, ...]) -> tuple[RadixNode, list[torch.Tensor], int]:
        """Follow ``tokens`` (already page-aligned) down the tree, touching and splitting as needed.

        Returns the deepest node whose path is exactly the matched prefix, the slot tensors along
        the path, and the matched length.
        """
        node, values, pos, n = self.root, [], 0, len(tokens)
        now = self._tick()
        node.last_access = now
        while pos < n:
            child = node.children.get(self._child_key(tokens, pos))
            if child is None:
                break
            child.last_access = now
            m = self._match_len(child.key, tokens, pos)
            if m < len(child.key):
                child = self._split(child, m)
            values.append(child.value)
            pos += m
            node = child
            # After a split the loop ends by itself: the next token (page) differs from the lower
            # half's first one, or the tokens are used up.
        return node, values, pos

    def _split(self, child: RadixNode, m: int) -> RadixNode:
        """Split ``child``'s edge after ``m`` tokens; return the new upper node.

        The upper node inherits ``lock_ref`` and ``last_access``: every lock through ``child`` also
        passes through it, so sizes and protection stay unchanged.
        """
        parent = child.parent
        assert parent is not None
        upper = RadixNode(
            key=child.key[:m],
            value=child.value[:m],
            parent=parent,
            lock_ref=child.lock_ref,
            last_access=child.last_access,
        )
        parent.children[self._child_key(upper.key)] = upper
        child.key = child.key[m:]
        child.value = child.value[m:]
        child.parent = upper
        upper.children[self._child_key(child.key)] = child
        return upper

    def _match_len(self, key: tuple[int, ...], tokens: tuple[int, ...], pos: int) -> int:
        """Length of the common prefix of ``key`` and ``tokens[pos:]``, rounded down to a page."""
        lim = min(len(key), len(tokens) - pos)
        if tokens[pos : pos + lim] == (key if lim == len(key) else key[:lim]):
            m = lim  # the common case: one C-level comparison
        else:
            m = 0
            while key[m] == tokens[pos + m]:
                m += 1
        return m - m % self.page_size

    def _child_key(self, tokens: tuple[int, ...], pos: int = 0) -> int | tuple[int, ...]:
        if self.page_size == 1:
            return tokens[pos]
        return tokens[pos : pos + self.page_size]

    def _aligned(self, n: int) -> int:
        return n - n % self.page_size

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # --- locking ------------------------------------------------------------------------------
    def lock(self, node: RadixNode) -> None:
        """Add one reference to ``node`` and all its ancestors (the root excluded)."""
        self._check_live(node, "lock")
        while node.parent is not None:  # the root is the only node without a parent
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        """Remove one reference from ``node`` and all its ancestors; raises if ``node`` is not locked."""
        self._check_live(node, "unlock")
        if node.parent is not None and node.lock_ref == 0:
            raise RadixCacheError(
                f"RadixCache.unlock: {node!r} is not locked; every unlock must match an earlier lock of "
                "the same node"
            )
        # An ancestor's lock_ref is >= any descendant's, so the check above covers the whole path.
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected_size -= len(node.key)
                self._evictable_size += len(node.key)
            node = node.parent

    def _check_live(self, node: RadixNode, what: str) -> None:
        if node.evicted:
            raise RadixCacheError(
                f"RadixCache.{what}: {node!r} was evicted; lock a matched node before anything can evict "
                "(any allocation that may trigger eviction), and match again to get a live node"
            )

    # --- eviction -----------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free unlocked leaves, least recently used first, until ``num_tokens`` are freed.

        A parent whose last child is evicted becomes a leaf and a candidate in turn. Stops early when
        nothing evictable is left. Returns the number of tokens (slots) given back to the pool, which
        may exceed ``num_tokens`` because whole nodes are freed.
        """
        if num_tokens <= 0 or self.disable:
            return 0
        heap = [(n.last_access, n.id, n) for n in self._unlocked_leaves()]
        heapq.heapify(heap)
        freed: list[torch.Tensor] = []
        num_freed = 0
        while num_freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None and not node.children and node.lock_ref == 0
            del parent.children[self._child_key(node.key)]
            node.evicted = True
            freed.append(node.value)
            num_freed += len(node.key)
            self._evictable_size -= len(node.key)
            self._evicted_nodes += 1
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        if freed:
            self.pool.free(torch.cat(freed))
        self._evicted_tokens += num_freed
        return num_freed

    def _unlocked_leaves(self) -> list[RadixNode]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.lock_ref == 0:
                leaves.append(node)
        return leaves

    def reset(self) -> None:
        """Free every cached slot and empty the tree. Only allowed while nothing is locked.

        Hit/request/eviction counters are kept; nodes from before the reset become stale.
        """
        if self._protected_size:
            raise RadixCacheError(
                f"RadixCache.reset: {self._protected_size} cached tokens are still locked by running "
                "requests; unlock them (finish or abort those requests) before resetting"
            )
        freed, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            node.evicted = True
            freed.append(node.value)
            stack.extend(node.children.values())
        if freed:
            self.pool.free(torch.cat(freed))
        self._init_tree()

    # --- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict[str, float | int]:
        """Hit accounting (from ``record_stats`` matches) and current sizes, in tokens."""
        req = self._requested_tokens
        return {
            "hit_tokens": self._hit_tokens,
            "requested_tokens": req,
            "hit_rate": self._hit_tokens / req if req else 0.0,
            "cached_tokens": self.total_size,
            "evictable_tokens": self._evictable_size,
            "protected_tokens": self._protected_size,
            "evictions": self._evicted_nodes,
            "evicted_tokens": self._evicted_tokens,
        }

    def pretty(self, max_nodes: int = 50) -> str:
        """The tree as indented text, for debugging."""
        lines: list[str] = []
        stack = [(c, 0) for c in reversed(list(self.root.children.values()))]
        while stack and len(lines) < max_nodes:
            node, depth = stack.pop()
            lines.append("  " * depth + repr(node))
            stack.extend((c, depth + 1) for c in reversed(list(node.children.values())))
        return "\n".join(lines) if lines else "(empty)"


def _as_tuple(token_ids: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    if isinstance(token_ids, torch.Tensor):
        return tuple(token_ids.tolist())
    return tuple(token_ids)


def common_cached_prefix(reqs: Sequence[Any]) -> int:
    """Tokens of KV prefix that every request holds in the same slots, from the radix tree.

    Each request's first ``cache_len`` slots are the values along the tree path to its locked
    ``last_node``, so the shared prefix is the path to the deepest common ancestor of those nodes.
    Cost: O(requests x tree depth). Requests without a node share nothing.
    """
    first = reqs[0].last_node
    if first is None:
        return 0
    chain = []
    node = first
    while node is not None:
        chain.append(node)
        node = node.parent
    chain.reverse()  # root first
    index = {id(nd): i for i, nd in enumerate(chain)}
    deepest = len(chain) - 1
    for req in reqs[1:]:
        node = req.last_node
        while node is not None and (id(node) not in index or index[id(node)] > deepest):
            node = node.parent
        if node is None:
            return 0
        deepest = index[id(node)]
        if deepest == 0:
            return 0
    return sum(len(nd.key) for nd in chain[1 : deepest + 1])
