"""Decode steps without per-step Python cost: batch buckets, a device slot table, static inputs, graphs.

A decode step feeds the model one token per request. To make it cheap at batch 64-256 with long
contexts, and replayable as a CUDA graph, four pieces work together:

* ``batch_buckets`` / ``bucket_for``: a decode batch of B requests runs padded to the smallest
  bucket >= B, so one captured graph serves every B of its bucket. Padded rows read no KV (length
  0), write their K/V to the pool's ``pad_slot`` and their logits are ignored.
* ``SlotTable``: each running request's KV slots as a row of a device table (req_to_token). A
  decode step uploads only the one new slot per request; the whole row is re-uploaded only when
  the request's slot list changed in another way (prefill, retraction, rebase).
* ``DecodeBuffers``: the step's inputs at fixed addresses (ids, positions, out slots, kv_indptr,
  kv_indices in a max-size buffer that grows only when a batch needs more, shared-prefix lists),
  refilled in place before every step.
* ``GraphCache``: one CUDA graph per (bucket, shared prefix length), captured lazily on first use
  from a warm-up run, replayed after the inputs were refilled.
"""

from __future__ import annotations

import array
import bisect
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmir_lang.errors import InvalidRequestError

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Bucket sizes up to ``max_batch`` (always included): the defaults, then steps of 128 above 256."""
    if max_batch < 1:
        raise InvalidRequestError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [b for b in DEFAULT_BUCKETS if b < max_batch]
    nxt = DEFAULT_BUCKETS[-1] + 128
    while nxt < max_batch:
        sizes.append(nxt)
        nxt += 128
    sizes.append(max_batch)
    return tuple(sizes)


def int64_tensor(values: Sequence[int]) -> torch.Tensor:
    """A CPU int64 tensor of ``values``: about 3x faster than ``torch.tensor`` on a list of ints
    (through ``array.array``, whose buffer the tensor keeps alive), which counts for the long slot
    lists of an extend step."""
    if not values:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(array.array("q", values), dtype=torch.int64)


def bucket_for(batch_size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``batch_size``; raises when the batch is larger than every bucket."""
    i = bisect.bisect_left(buckets, batch_size)
    if batch_size < 1 or i == len(buckets):
        raise InvalidRequestError(
            f"decode batch of {batch_size} requests has no bucket (largest {buckets[-1]}); "
            "raise max_running_requests"
        )
    return buckets[i]


META_IDS, META_POS, META_LOC, META_ROW, META_LEN, META_SUFFIX_LEN = range(6)


def _grown(need: int, have: int, floor: int = 1024) -> int:
    """A capacity >= need: at least double the old one, so growth (and re-capture) stays rare."""
    return max(need, 2 * have, floor)


@dataclass(slots=True, eq=False)
class _Row:
    # NOTE: not the Req (records outlive it: a batch's finished requests stayed alive); by rid
    row: int
    slots: list[int]  # the Req's kv_slots list object when the row was last written
    synced: int  # table[row, :synced] == slots[:synced]


class SlotTable:
    """Device table ``[rows, width]`` of request KV slots, updated incrementally.

    Invariant: for a record of request r, ``table[row, :synced] == r.kv_slots[:synced]`` as long
    as ``r.kv_slots`` is still the same list object and was only appended to. ``rows_for`` checks
    that and re-uploads the whole row otherwise, so callers may replace or shrink slot lists freely
    between steps (the scheduler does, on prefill, retraction and rebase). ``forget`` drops a
    record explicitly (extend steps, where a list changes in place). Records of requests that left
    the batch are reclaimed when rows run out; width and row count grow by doubling.
    """

    def __init__(self, device: torch.device, max_width: int, rows: int = 64, width: int = 1024):
        self.device = device
        self.max_width = max_width
        self.table = torch.zeros(rows, min(width, max_width), dtype=torch.int64, device=device)
        self._records: dict[int, _Row] = {}  # by rid
        self._free = list(range(rows - 1, -1, -1))
        self.num_row_uploads = 0  # whole-row uploads (tests and stats)
        self.generation = 0  # bumped when the table moves (graphs that read it are then stale)

    @property
    def num_rows(self) -> int:
        return int(self.table.shape[0])

    def forget(self, req: Any) -> None:
        rec = self._records.get(req.rid)
        if rec is not None:
            rec.synced = -1

    def rows_for(self, reqs: Sequence[Any], kv_lens: Sequence[int]) -> list[int]:
        """Rows of ``reqs`` whose first ``kv_len - 1`` slots are in the table.

        The caller then writes each request's last slot (``kv_slots[kv_len - 1]``, this step's) at
        column ``kv_len - 1`` and calls ``mark_synced``. A request listed several times in a row
        with ``kv_len`` rising by one gets one table row with every column its rows read.
        """
        need = max(kv_lens, default=0)
        if need > self.table.shape[1]:
            self._grow(self.num_rows, need)
        rows: list[int] = []
        # a request may own several consecutive rows (a short extend run as decode rows, kv_lens
        # rising by one): the first syncs the table row, the rest share it
        span: dict[int, tuple[_Row, int, int]] = {}
        for req, n in zip(reqs, kv_lens):
            seen = span.get(req.rid)
            if seen is not None:
                span[req.rid] = (seen[0], seen[1], n)
                rows.append(seen[0].row)
                continue
            rec = self._records.get(req.rid)
            if rec is None:
                rec = _Row(self._take_row({r.rid for r in reqs}), req.kv_slots, -1)
                self._records[req.rid] = rec
            if rec.slots is not req.kv_slots or rec.synced != n - 1:
                self._upload(rec.row, req.kv_slots[: n - 1])
                rec.slots, rec.synced = req.kv_slots, n - 1
            span[req.rid] = (rec, n, n)
            rows.append(rec.row)
        for rec, first, last in span.values():
            if last > first:
                # the columns the later rows add are written by other programs of the device list
                # kernel than the rows that read them: upload them now so no read races a write
                cols = rec.slots[first - 1 : last]  # the request's kv_slots, synced above
                self.table[rec.row, first - 1 : last].copy_(int64_tensor(cols))
        return rows

    def mark_synced(self, reqs: Sequence[Any], kv_lens: Sequence[int]) -> None:
        for req, n in zip(reqs, kv_lens):
            self._records[req.rid].synced = n

    def _upload(self, row: int, slots: list[int]) -> None:
        if slots:
            self.table[row, : len(slots)].copy_(int64_tensor(slots))
        self.num_row_uploads += 1

    def _take_row(self, current: set[int]) -> int:
        if not self._free:
            # Reclaim rows of requests outside this batch; they re-upload if they come back.
            for rid in [rid for rid in self._records if rid not in current]:
                self._free.append(self._records.pop(rid).row)
        if not self._free:
            old = self.num_rows
            self._grow(2 * old, self.table.shape[1])
            self._free.extend(range(2 * old - 1, old - 1, -1))
        return self._free.pop()

    def _grow(self, rows: int, width: int) -> None:
        if width > self.max_width:
            raise InvalidRequestError(
                f"a request holds {width} KV slots but the slot table allows {self.max_width}; "
                "it cannot be longer than the model's context"
            )
        old = self.table
        new_width = (
            old.shape[1] if width <= old.shape[1] else min(self.max_width, _grown(width, old.shape[1]))
        )
        self.table = torch.zeros(rows, new_width, dtype=torch.int64, device=self.device)
        self.table[: old.shape[0], : old.shape[1]].copy_(old)
        self.generation += 1


def gather_rows(
    table: torch.Tensor,
    rows: torch.Tensor,
    lens: torch.Tensor,
    indptr: torch.Tensor,
    out: torch.Tensor,
    total: int,
    start: int = 0,
    single_row: int | None = None,
) -> None:
    """CSR lists from table rows: ``indptr[:n+1] = [0, cumsum(lens)]`` and, for each b,
    ``out[indptr[b]:indptr[b+1]] = table[rows[b], start:start + lens[b]]``.

    ``total`` (= sum(lens), known on the host) keeps this free of host syncs. ``single_row``: the
    host's copy of ``rows[0]`` when only the first row has a non-zero length (one slice copy).
    """
    n = rows.shape[0]
    indptr[0] = 0
    torch.cumsum(lens, 0, out=indptr[1 : n + 1])
    if total == 0:
        return
    if single_row is not None:
        out[:total].copy_(table[single_row, start : start + total])
        return
    which = torch.repeat_interleave(torch.arange(n, device=rows.device), lens, output_size=total)
    col = torch.arange(start, start + total, device=rows.device) - indptr[which]
    out[:total] = table[rows[which], col]


def build_decode_lists_torch(
    buf: DecodeBuffers,
    table: torch.Tensor,
    n: int,
    bsz: int,
    rows0: int,
    total: int,
    plen: int,
    suffix_total: int,
) -> None:
    """The decode lists with torch ops (CPU, and the fallback on CUDA): this step's slot into the
    table, then ``kv_indptr``/``kv_indices`` and, with a shared prefix of ``plen``, the suffix lists."""
    meta = buf.meta
    table[meta[META_ROW, :n], meta[META_POS, :n]] = meta[META_LOC, :n]
    single = rows0 if n == 1 else None
    rows = meta[META_ROW, :bsz]
    gather_rows(table, rows, meta[META_LEN, :bsz], buf.kv_indptr, buf.kv_indices, total, single_row=single)
    if plen:
        lens = meta[META_SUFFIX_LEN, :bsz]
        gather_rows(table, rows, lens, buf.suffix_indptr, buf.suffix_indices, suffix_total, plen, single)


# Set on first use of the Triton kernel below: Triton reads TRITON_INTERPRET when a kernel is
# defined, so it is defined lazily (as the kernels package does), and the body resolves ``tl`` here.
tl: Any = None
_decode_lists_jit: Any = None


def _decode_lists_kernel(
    Meta,
    stride_meta,
    Table,
    stride_table,
    KvIndptr,
    KvIndices,
    SufIndptr,
    SufIndices,
    prefix_len,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SUFFIX: tl.constexpr,
):
    # One program per (bucket row, column chunk). Row b's list starts after the lengths of rows
    # < b (a masked sum over at most BLOCK_B lengths), so no separate scan is needed. The step's
    # new slot is written into the table by chunk 0 and taken from Meta by every reader of that
    # column, so no program depends on another's store.
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    step = tl.num_programs(1) * BLOCK_N
    offs_b = tl.arange(0, BLOCK_B)
    before = offs_b < b
    start = tl.sum(tl.load(Meta + 4 * stride_meta + offs_b, mask=before, other=0), 0)
    n = tl.load(Meta + 4 * stride_meta + b).to(tl.int32)
    row = tl.load(Meta + 3 * stride_meta + b)
    loc = tl.load(Meta + 2 * stride_meta + b)
    base = Table + row * stride_table
    if chunk == 0:
        tl.store(KvIndptr + b + 1, start + n)
        if b == 0:
            tl.store(KvIndptr, start)
        if n > 0:
            tl.store(base + n - 1, loc)
    for j in range(chunk * BLOCK_N, n, step):
        offs = j + tl.arange(0, BLOCK_N)
        keep = offs < n
        last = offs == n - 1
        v = tl.load(base + offs, mask=keep & (offs != n - 1), other=0)
        tl.store(KvIndices + start + offs, tl.where(last, loc, v), mask=keep)
    if HAS_SUFFIX:
        sstart = tl.sum(tl.load(Meta + 5 * stride_meta + offs_b, mask=before, other=0), 0)
        ns = tl.load(Meta + 5 * stride_meta + b).to(tl.int32)
        if chunk == 0:
            tl.store(SufIndptr + b + 1, sstart + ns)
            if b == 0:
                tl.store(SufIndptr, sstart)
        for j in range(chunk * BLOCK_N, ns, step):
            offs = j + tl.arange(0, BLOCK_N)
            keep = offs < ns
            col = prefix_len + offs
            v = tl.load(base + col, mask=keep & (col != n - 1), other=0)
            tl.store(SufIndices + sstart + offs, tl.where(col == n - 1, loc, v), mask=keep)


def build_decode_lists_triton(buf: DecodeBuffers, table: torch.Tensor, bsz: int, plen: int) -> None:
    """Same result as ``build_decode_lists_torch`` in one launch that reads only device memory, so
    it can sit inside a captured graph (the host refills ``buf.meta`` before each replay)."""
    global tl, _decode_lists_jit
    if _decode_lists_jit is None:
        import triton
        import triton.language

        tl = triton.language
        _decode_lists_jit = triton.jit(_decode_lists_kernel)
    import triton

    _decode_lists_jit[(bsz, 8)](
        buf.meta,
        buf.meta.stride(0),
        table,
        table.stride(0),
        buf.kv_indptr,
        buf.kv_indices,
        buf.suffix_indptr,
        buf.suffix_indices,
        plen,
        BLOCK_B=triton.next_power_of_2(buf.max_batch),
        BLOCK_N=512,
        HAS_SUFFIX=plen > 0,
    )


class DecodeBuffers:
    """The inputs of a decode step at fixed addresses (see the module docstring).

    ``meta`` holds, per row of the bucket, what the host uploads each step (one copy): input id,
    position, out slot, slot-table row, KV length, suffix length (rows ``META_*``); padded rows have
    length 0.
    ``kv_indices`` / ``suffix_indices`` / ``prefix_indices`` grow by doubling when a batch needs
    more; ``ensure`` reports that, since graphs captured on the old buffers are then stale.
    """

    def __init__(self, device: torch.device, max_batch: int, kv_capacity: int = 1 << 16):
        self.device = device
        self.max_batch = max_batch
        z = dict(dtype=torch.int64, device=device)
        self.meta = torch.zeros(6, max_batch, **z)
        self.qo_indptr = torch.arange(max_batch + 1, **z)
        self.kv_indptr = torch.zeros(max_batch + 1, **z)
        self.suffix_indptr = torch.zeros(max_batch + 1, **z)
        self.kv_indices = torch.zeros(kv_capacity, **z)
        self.suffix_indices = torch.zeros(1024, **z)
        self.prefix_indices = torch.zeros(1024, **z)

    def ensure(self, batch: int, kv_total: int, suffix_total: int, prefix_len: int) -> bool:
        """Grow whatever is too small for this step; True if any buffer moved."""
        moved = False
        if batch > self.max_batch:
            self.__init__(self.device, _grown(batch, self.max_batch, 1), self.kv_indices.shape[0])
            moved = True
        z = dict(dtype=torch.int64, device=self.device)
        if kv_total > self.kv_indices.shape[0]:
            self.kv_indices = torch.zeros(_grown(kv_total, self.kv_indices.shape[0]), **z)
            moved = True
        if suffix_total > self.suffix_indices.shape[0]:
            self.suffix_indices = torch.zeros(_grown(suffix_total, self.suffix_indices.shape[0]), **z)
            moved = True
        if prefix_len > self.prefix_indices.shape[0]:
            self.prefix_indices = torch.zeros(_grown(prefix_len, self.prefix_indices.shape[0]), **z)
            moved = True
        return moved


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor


class GraphCache:
    """Captured decode graphs by key, sharing one memory pool (never replayed concurrently).

    ``run`` replays the graph of ``key``, capturing it first (after one warm-up call of ``fn`` on a
    side stream, which also compiles Triton kernels and sets up cuBLAS) when there is none. The
    returned tensor is the graph's static output: valid until the next replay of any graph here.
    Keys whose ``prefix_len`` (second item) is non-zero are kept in LRU order, at most
    ``max_prefix_graphs`` of them, so a stream of distinct shared prefixes cannot pile up graphs.
    """

    def __init__(self, device: torch.device, max_prefix_graphs: int = 8):
        self.device = device
        self.max_prefix_graphs = max_prefix_graphs
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._pool: Any = None
        self.num_captures = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        if self._graphs:  # a replay may still be queued (run-ahead decode): let it finish first
            torch.cuda.synchronize(self.device)
        self._graphs.clear()

    def run(self, key: tuple[int, ...], fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        g = self._graphs.get(key)
        if g is None:
            g = self._capture(fn)
            self._graphs[key] = g
            self._evict()
        else:
            self._graphs.move_to_end(key)
        g.graph.replay()
        return g.output

    def _capture(self, fn: Callable[[], torch.Tensor]) -> _Graph:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()  # warm-up: lazy init and kernel compilation must not happen while capturing
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine captures on its own thread while others may use CUDA
        with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
            out = fn()
        self.num_captures += 1
        return _Graph(graph, out)

    def _evict(self) -> None:
        prefixed = [k for k in self._graphs if k[1]]
        for k in prefixed[: max(0, len(prefixed) - self.max_prefix_graphs)]:
            del self._graphs[k]


__all__ = [
    "DEFAULT_BUCKETS",
    "build_decode_lists_torch",
    "build_decode_lists_triton",
    "DecodeBuffers",
    "GraphCache",
    "SlotTable",
    "batch_buckets",
    "bucket_for",
    "gather_rows",
    "int64_tensor",
]
