"""The KV pool: preallocated K/V storage for every layer, handed out slot by slot (or page by page).

A *slot* is one token's K and V in every layer: ``k_buffers[layer][slot]`` is ``[num_kv_heads,
head_dim]``. The pool knows nothing about requests or prefixes; it only tracks which slots are free.
Ownership of allocated slots lies with the caller (a running request) or the radix cache.
"""

from __future__ import annotations

import math
import mmap
from array import array

import torch

from llmir_lang.errors import LLMIRError, OutOfKVMemoryError

# pages taken or given back with array work instead of tensor ops (see ``alloc``)
_SMALL = 1024


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous tensor of zeros, as ``torch.zeros``; on the CPU its memory is zeroed lazily.

    ``torch.zeros`` on the CPU writes every page up front (about 0.2 s and the whole size in
    resident memory for the default 512 MiB pool, and freeing the touched pages at exit). Here the
    CPU storage is a private anonymous mapping instead: the kernel hands out a zero page on the
    first touch of each page, so start-up costs nothing and memory is only taken as slots are
    written. Private (not ``mmap``'s default shared), so that a forked child gets copy-on-write
    memory as with malloc. ``torch.frombuffer`` holds a reference to the mapping for as long as the
    storage lives (views included), and the mapping is unmapped when the storage is freed. CUDA,
    and platforms without ``MAP_PRIVATE``, keep ``torch.zeros``.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    except OSError as e:
        raise OutOfKVMemoryError(
            f"allocating {nbytes / 2**30:.2f} GiB of KV cache on the CPU failed ({e}); "
            "lower kv_memory (e.g. kv_memory='256MiB')"
        ) from None
    return torch.frombuffer(buf, dtype=dtype).view(shape)


class KVPoolError(LLMIRError, ValueError):
    """The KV pool was misused: bad sizes, a slot out of range, or freeing memory that is not in use."""


class KVDoubleFreeError(KVPoolError):
    """A slot (or page) was freed while already free; some owner freed memory it did not own."""


class KVPool:
    """Preallocated K/V storage for every layer; token-granular slots handed out from a free list.

    Invariants:

    * ``k_buffers[l]`` / ``v_buffers[l]`` have shape ``[capacity + 1, num_kv_heads, head_dim]``;
      slot ``pad_slot == capacity`` is scratch for padded tokens (CUDA graphs) and is never allocated
      or freed.
    * ``capacity`` is a multiple of ``page_size``; memory is handed out in whole pages
      (``page_size`` consecutive slots starting at a multiple of ``page_size``), and a page has
      exactly one owner. With ``page_size == 1`` a page is a slot.
    * ``num_free + num_used == capacity`` at all times (both counted in slots).

    Cost: ``alloc`` and ``free`` are O(n) in the slots (pages) moved, and nothing scales with
    ``capacity``. The free list is a stack of page ids and the free/used state is one int per page;
    each lives in a stdlib ``array`` with a torch tensor view over the same memory. Single pages go
    through the array (plain Python indexing, for the hot ``alloc(1)`` once per running request per
    decode step); many pages at once go through the tensor view (a few vector ops, for prefill and
    eviction), so neither path loops in Python over slots.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        page_size: int = 1,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("page_size", page_size),
        ):
            if value < 1:
                raise KVPoolError(f"KVPool: {name} must be >= 1, got {value}")
        if capacity < page_size or capacity % page_size:
            raise KVPoolError(
                f"KVPool: capacity ({capacity}) must be a positive multiple of page_size ({page_size}); "
                "round it down to a page multiple (from_memory_budget does this for you)"
            )
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.capacity = capacity
        self.page_size = page_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.pad_slot = capacity
        # One allocation per K and per V; each layer is a view. Zeros, not empty: the pad slot and
        # never-written slots may be read by padded kernels, and garbage NaNs would leak through
        # masked-out attention (0 * NaN = NaN). On the CPU the zeros are lazy (see `zeros`).
        shape = (num_layers, capacity + 1, num_kv_heads, head_dim)
        self._k_storage = zeros(shape, dtype, self.device)
        self._v_storage = zeros(shape, dtype, self.device)
        self.k_buffers: list[torch.Tensor] = list(self._k_storage.unbind(0))
        self.v_buffers: list[torch.Tensor] = list(self._v_storage.unbind(0))

        num_pages = capacity // page_size
        # Stack of free page ids: entries [0, _top) are free, popped from the top. Filled in reverse
        # so a fresh pool hands out pages 0, 1, 2, ... (contiguous memory, easy-to-read tests).
        # The arrays are never resized, so their tensor views stay valid.
        self._stack = array("q", bytes(8 * num_pages))
        self._stack_t = torch.frombuffer(self._stack, dtype=torch.int64)
        self._stack_t.copy_(torch.arange(num_pages - 1, -1, -1, dtype=torch.int64))
        self._top = num_pages
        # 1 = free, 0 = in use. int32 rather than bytes: free() adds 1 per listed page and reads the
        # sums to catch double frees and duplicates in one pass, which must not wrap around.
        self._state = array("i", bytes(4 * num_pages))
        self._state_t = torch.frombuffer(self._state, dtype=torch.int32)
        self._state_t.fill_(1)

    # --- sizing -------------------------------------------------------------------------------
    @staticmethod
    def token_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of K plus V for one token across all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.token_bytes(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    @classmethod
    def from_memory_budget(
        cls,
        budget_bytes: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        page_size: int = 1,
    ) -> KVPool:
        """A pool whose capacity is ``budget_bytes // bytes_per_token`` rounded down to a page multiple.

        The pad slot adds one token's worth of bytes on top of the budget.
        """
        per_token = cls.token_bytes(num_layers, num_kv_heads, head_dim, dtype)
        capacity = budget_bytes // per_token
        capacity -= capacity % page_size
        if capacity < page_size:
            minimum = page_size * per_token
            raise OutOfKVMemoryError(
                f"KV memory budget of {budget_bytes} bytes is too small: one page of {page_size} token(s) "
                f"needs {minimum} bytes ({per_token} bytes per token); give the KV cache at least "
                f"{minimum} bytes (in practice much more), or use a smaller model or dtype"
            )
        return cls(num_layers, num_kv_heads, head_dim, capacity, dtype, device, page_size)

    # --- allocation ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Free slots (always a multiple of page_size)."""
        return self._top * self.page_size

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def is_free(self, slot: int) -> bool:
        """Whether ``slot``'s page is currently free (not owned by anybody)."""
        self._check_range(slot, slot)
        return bool(self._state[slot // self.page_size])

    def alloc(self, n: int, last_slot: int | None = None) -> torch.Tensor | None:
        """``n`` slots as an int64 CPU tensor, or None (and nothing allocated) if not enough are free.

        page_size 1: any ``n`` free slots (``last_slot`` is ignored). page_size p > 1: if
        ``last_slot`` is given, it must be a slot whose page the caller owns; the first slots
        returned are ``last_slot + 1, last_slot + 2, ...`` up to that page's end (free by
        construction, since the page is the caller's), then the slots of whole new pages in order.
        A new page is owned whole by the caller even if fewer of its slots are returned now.
        """
        if n < 0:
            raise KVPoolError(f"KVPool.alloc: n must be >= 0, got {n}")
        p = self.page_size
        head, start = 0, 0  # `head` slots continue last_slot's page, from `start`
        if p > 1 and last_slot is not None:
            self._check_range(last_slot, last_slot)
            if self._state[last_slot // p]:
                raise KVPoolError(
                    f"KVPool.alloc: last_slot {last_slot} lies in a free page; pass the last slot of a "
                    "page you own, or None to start on new pages"
                )
            head, start = min(p - 1 - last_slot % p, n), last_slot + 1
        rest = n - head
        num_new = -(-rest // p)
        if num_new > self._top:
            return None
        if num_new == 0:
            return torch.arange(start, start + head, dtype=torch.int64)
        if num_new == 1:  # the decode hot path: no vector ops
            self._top -= 1
            page = self._stack[self._top]
            self._state[page] = 0
            if p == 1:
                return torch.tensor([page], dtype=torch.int64)
            new_slots = torch.arange(page * p, page * p + rest, dtype=torch.int64)
        elif num_new <= _SMALL:
            # plain array work, no tensor op: an op that releases the GIL waits up to a switch
            # interval (5 ms) to take it back while another Python thread is busy (a program
            # batch submitting), and a request's admission is on the engine's critical path
            top = self._top - num_new
            picked = self._stack[top : self._top]
            picked.reverse()  # ascending stack order
            self._top = top
            state = self._state
            for page in picked:
                state[page] = 0
            pages = torch.frombuffer(picked, dtype=torch.int64)  # keeps ``picked`` alive
            if p == 1:
                return pages
            new_slots = (pages.unsqueeze(1) * p + torch.arange(p, dtype=torch.int64)).flatten()[:rest]
        else:
            top = self._top - num_new
            pages = self._stack_t[top : self._top].flip(0)  # a copy, in ascending stack order
            self._top = top
            self._state_t[pages] = 0
            if p == 1:
                return pages
            new_slots = (pages.unsqueeze(1) * p + torch.arange(p, dtype=torch.int64)).flatten()[:rest]
        if head == 0:
            return new_slots
        return torch.cat([torch.arange(start, start + head, dtype=torch.int64), new_slots])

    def free(self, slots: torch.Tensor) -> None:
        """Return ``slots`` to the pool.

        page_size 1: frees exactly those slots. page_size p > 1: frees every page that contains any
        of the slots (callers only free pages they own whole). Freeing a slot or page that is already
        free, or listing a slot twice, raises KVDoubleFreeError and frees nothing.
        """
        n = slots.numel()
        if n == 0:
            return
        p = self.page_size
        if n == 1:
            slot = int(slots.reshape(()))
            self._check_range(slot, slot)
            page = slot // p
            if self._state[page]:
                raise self._double_free(page)
            self._state[page] = 1
            self._stack[self._top] = page
            self._top += 1
            return
        if n <= _SMALL:  # array work, no tensor op (see alloc)
            self._free_small(slots.reshape(-1).tolist())
            return
        flat = slots.reshape(-1).to(device="cpu", dtype=torch.int64)
        lo, hi = torch.aminmax(flat)
        self._check_range(int(lo), int(hi))
        if p == 1:
            pages = flat
            # Add 1 per listing: a page that ends above 1 was free already or is listed twice.
            self._state_t.index_put_((pages,), self._fill(n, 1), accumulate=True)
            bad = self._state_t[pages] > 1
            if bool(bad.any()):  # undo, so a caught error leaves the pool unchanged
                self._state_t.index_put_((pages,), self._fill(n, -1), accumulate=True)
                raise self._double_free(int(pages[bad.nonzero()[0, 0]]))
        else:
            pages = torch.unique(flat // p)  # many slots of one page are fine: it is freed once
            state = self._state_t[pages]
            if bool(state.any()):
                raise self._double_free(int(pages[state.nonzero()[0, 0]]))
            self._state_t[pages] = 1
        num = pages.numel()
        self._stack_t[self._top : self._top + num] = pages
        self._top += num

    @staticmethod
    def _fill(n: int, value: int) -> torch.Tensor:
        return torch.full((1,), value, dtype=torch.int32).expand(n)

    def _double_free(self, page: int) -> KVDoubleFreeError:
        p = self.page_size
        what = f"slot {page}" if p == 1 else f"page {page} (slots {page * p}..{page * p + p - 1})"
        return KVDoubleFreeError(
            f"KVPool.free: {what} is already free or listed twice; an owner freed memory twice or "
            "freed memory it does not own (a radix-cache slot, or a duplicate prefix slot already freed)"
        )

    def _check_range(self, lo: int, hi: int) -> None:
        if lo < 0 or hi >= self.capacity:
            bad = lo if lo < 0 else hi
            raise KVPoolError(
                f"KVPool: slot {bad} is outside 0..{self.capacity - 1} (slot {self.pad_slot} is the "
                "pad slot and is never allocated or freed)"
            )

    def _free_small(self, slots: list[int]) -> None:
        self._check_range(min(slots), max(slots))
        p, state = self.page_size, self._state
        if p == 1:
            pages = slots
            seen: set[int] = set()
            for page in pages:
                if page in seen:
                    raise self._double_free(page)
                seen.add(page)
        else:
            pages = sorted({slot // p for slot in slots})  # many slots of one page: freed once
        for page in pages:
            if state[page]:
                raise self._double_free(page)
        stack, top = self._stack, self._top
        for page in pages:
            state[page] = 1
            stack[top] = page
            top += 1
        self._top = top

    # --- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict[str, float | int]:
        """capacity, used and free (slots), usage (used / capacity), page_size, bytes (K+V storage)."""
        used = self.num_used
        return {
            "capacity": self.capacity,
            "used": used,
            "free": self.num_free,
            "usage": used / self.capacity,
            "page_size": self.page_size,
            "bytes": self.bytes_per_token * (self.capacity + 1),
        }

    def __repr__(self) -> str:
        return (
            f"KVPool(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"capacity={self.capacity}, page_size={self.page_size}, dtype={self.dtype}, "
            f"device={self.device}, used={self.num_used})"
        )
