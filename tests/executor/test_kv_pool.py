from __future__ import annotations

import pytest
import torch

from llmir_lang.errors import OutOfKVMemoryError
from llmir_lang.executor.kv_pool import KVDoubleFreeError, KVPool, KVPoolError

torch.set_num_threads(1)


def make_pool(capacity: int = 16, page_size: int = 1, layers: int = 2) -> KVPool:
    return KVPool(layers, 2, 4, capacity, torch.float32, "cpu", page_size=page_size)


def as_list(t: torch.Tensor | None) -> list[int]:
    assert t is not None
    assert t.dtype == torch.int64 and t.device.type == "cpu"
    return t.tolist()


def test_buffers_shape_and_pad_slot() -> None:
    pool = make_pool(capacity=8, layers=3)
    assert len(pool.k_buffers) == len(pool.v_buffers) == 3
    for buf in pool.k_buffers + pool.v_buffers:
        assert buf.shape == (9, 2, 4) and buf.dtype == torch.float32
    assert pool.pad_slot == 8
    # Layers are distinct storage: writing one layer leaves the others alone.
    pool.k_buffers[0][3] = 1.0
    assert pool.k_buffers[1][3].abs().sum() == 0 and pool.v_buffers[0][3].abs().sum() == 0


def test_alloc_free_page_size_1() -> None:
    pool = make_pool(capacity=8)
    assert as_list(pool.alloc(3)) == [0, 1, 2]
    assert as_list(pool.alloc(1)) == [3]
    assert pool.num_used == 4 and pool.num_free == 4
    assert pool.alloc(5) is None
    assert pool.num_free == 4  # a failed alloc takes nothing
    rest = as_list(pool.alloc(4))
    assert sorted(rest) == [4, 5, 6, 7]
    assert pool.alloc(1) is None and pool.num_free == 0
    pool.free(torch.tensor([2, 5]))
    assert sorted(as_list(pool.alloc(2))) == [2, 5]
    assert as_list(pool.alloc(0)) == []


def test_alloc_never_hands_out_a_used_slot() -> None:
    pool = make_pool(capacity=32)
    gen = torch.Generator().manual_seed(0)
    owned: set[int] = set()
    for _ in range(200):
        if owned and torch.rand((), generator=gen) < 0.5:
            k = int(torch.randint(1, len(owned) + 1, (), generator=gen))
            give = sorted(owned)[:k]
            pool.free(torch.tensor(give))
            owned -= set(give)
        else:
            n = int(torch.randint(1, 6, (), generator=gen))
            got = pool.alloc(n)
            if got is None:
                assert n > pool.num_free
                continue
            new = set(got.tolist())
            assert len(new) == n and not (new & owned) and pool.pad_slot not in new
            owned |= new
        assert pool.num_used == len(owned) and pool.num_free + pool.num_used == pool.capacity


def test_double_free_raises_and_changes_nothing() -> None:
    pool = make_pool(capacity=8)
    slots = pool.alloc(4)
    assert slots is not None
    pool.free(slots[:2])
    with pytest.raises(KVDoubleFreeError, match="already free"):
        pool.free(slots)  # slots 0 and 1 are free already
    assert pool.num_free == 6  # nothing changed, 2 and 3 still in use
    with pytest.raises(KVDoubleFreeError):
        pool.free(torch.tensor([2, 2]))  # a duplicate inside one call
    assert pool.num_free == 6 and not pool.is_free(2)
    pool.free(slots[2:])
    assert pool.num_free == 8


def test_single_slot_double_free_raises() -> None:
    for page_size in (1, 4):
        pool = make_pool(capacity=8, page_size=page_size)
        slot = pool.alloc(1)
        assert slot is not None
        pool.free(slot)
        with pytest.raises(KVDoubleFreeError):
            pool.free(slot)
        assert pool.num_free == 8


def test_large_alloc_and_free_round_trip() -> None:
    for page_size in (1, 16):
        pool = make_pool(capacity=4096, page_size=page_size)
        a = as_list(pool.alloc(1000))
        b = as_list(pool.alloc(2000, last_slot=a[-1]))
        assert len(set(a + b)) == 3000 and pool.num_used == -(-3000 // page_size) * page_size
        # p == 1: any subset; p == 16: whole pages only (b continues a's last page, 992..1007).
        first, second = (a[::2], a[1::2] + b) if page_size == 1 else (a[:992], a[992:] + b)
        pool.free(torch.tensor(first))
        with pytest.raises(KVDoubleFreeError):
            pool.free(torch.tensor(first[:10]))
        pool.free(torch.tensor(second))
        assert pool.num_free == 4096
        assert sorted(as_list(pool.alloc(4096))) == list(range(4096))


def test_free_out_of_range_and_pad_slot_raise() -> None:
    pool = make_pool(capacity=8)
    pool.alloc(8)
    for bad in ([8], [-1], [100]):
        with pytest.raises(KVPoolError, match="outside"):
            pool.free(torch.tensor(bad))
    assert pool.num_free == 0


def test_paged_alloc_continues_last_page() -> None:
    pool = make_pool(capacity=16, page_size=4)
    a = as_list(pool.alloc(3))
    assert a == [0, 1, 2] and pool.num_used == 4  # a whole page is taken
    b = as_list(pool.alloc(3))
    assert b == [4, 5, 6]
    # The next token of request a fills its own page first, then moves to a new page.
    assert as_list(pool.alloc(1, last_slot=2)) == [3]
    c = as_list(pool.alloc(6, last_slot=6))
    assert c == [7, 8, 9, 10, 11, 12] and pool.num_used == 16
    # No room left in the page of slot 12 is needed for 3 more tokens: 13, 14, 15.
    assert as_list(pool.alloc(3, last_slot=12)) == [13, 14, 15]
    assert pool.alloc(1, last_slot=15) is None  # page full and no free page
    assert pool.num_used == 16


def test_paged_alloc_fails_atomically() -> None:
    pool = make_pool(capacity=8, page_size=4)
    pool.alloc(2)
    assert pool.alloc(7, last_slot=1) is None  # 2 fit in the page, 5 more need 2 pages, 1 free
    assert pool.num_free == 4
    assert as_list(pool.alloc(6, last_slot=1)) == [2, 3, 4, 5, 6, 7]


def test_paged_last_slot_must_be_owned() -> None:
    pool = make_pool(capacity=8, page_size=4)
    with pytest.raises(KVPoolError, match="free page"):
        pool.alloc(1, last_slot=5)
    with pytest.raises(KVPoolError, match="outside"):
        pool.alloc(1, last_slot=8)


def test_paged_free_frees_whole_pages_and_detects_double_free() -> None:
    pool = make_pool(capacity=16, page_size=4)
    s = pool.alloc(10)
    assert s is not None and pool.num_used == 12
    pool.free(s[5:6])  # one slot of page 1 frees page 1 (slots 4..7)
    assert pool.num_free == 8 and pool.is_free(4) and pool.is_free(7) and not pool.is_free(8)
    with pytest.raises(KVDoubleFreeError, match="page 1"):
        pool.free(s[:8])  # page 0 is still owned, page 1 is not: nothing may change
    assert pool.num_free == 8 and not pool.is_free(0)
    pool.free(torch.cat([s[:4], s[8:]]))
    assert pool.num_free == 16
    assert sorted(as_list(pool.alloc(16))) == list(range(16))  # every page came back


def test_capacity_must_be_page_multiple() -> None:
    with pytest.raises(KVPoolError, match="multiple of page_size"):
        make_pool(capacity=10, page_size=4)
    with pytest.raises(KVPoolError):
        make_pool(capacity=0)
    with pytest.raises(KVPoolError, match="must be >= 0"):
        make_pool().alloc(-1)


def test_from_memory_budget_sizes_capacity() -> None:
    per_token = 2 * 3 * 2 * 8 * 2  # K and V, 3 layers, 2 heads, head_dim 8, bf16
    pool = KVPool.from_memory_budget(100 * per_token + 7, 3, 2, 8, torch.bfloat16, "cpu")
    assert pool.bytes_per_token == per_token
    assert pool.capacity == 100 and pool.k_buffers[0].shape == (101, 2, 8)
    paged = KVPool.from_memory_budget(100 * per_token, 3, 2, 8, torch.bfloat16, "cpu", page_size=16)
    assert paged.capacity == 96  # rounded down to a page multiple
    fp32 = KVPool.from_memory_budget(100 * per_token, 3, 2, 8, torch.float32, "cpu")
    assert fp32.capacity == 50


def test_from_memory_budget_too_small_says_minimum() -> None:
    per_token = 2 * 1 * 1 * 4 * 4
    with pytest.raises(OutOfKVMemoryError, match=f"needs {16 * per_token} bytes"):
        KVPool.from_memory_budget(15 * per_token, 1, 1, 4, torch.float32, "cpu", page_size=16)
    assert (
        KVPool.from_memory_budget(16 * per_token, 1, 1, 4, torch.float32, "cpu", page_size=16).capacity == 16
    )


def test_stats() -> None:
    pool = make_pool(capacity=16, page_size=4)
    pool.alloc(5)
    st = pool.stats()
    assert st == {
        "capacity": 16,
        "used": 8,
        "free": 8,
        "usage": 0.5,
        "page_size": 4,
        "bytes": pool.bytes_per_token * 17,
    }
    assert pool.bytes_per_token == 2 * 2 * 2 * 4 * 4


@pytest.mark.parametrize("page_size", [1, 4])
def test_array_and_tensor_paths_agree_at_their_boundary(page_size: int) -> None:
    """Up to ``_SMALL`` pages, alloc and free use array work (no tensor op that releases the GIL);
    above, tensor ops: the same slots, order and double-free checks on both sides."""
    from llmir_lang.executor.kv_pool import _SMALL

    for pages in (_SMALL, _SMALL + 1):
        n = pages * page_size
        pool = make_pool(capacity=4 * n, page_size=page_size)
        got = as_list(pool.alloc(n))
        assert got == list(range(n))  # a fresh pool hands out ascending slots
        more = as_list(pool.alloc(n))
        assert more == list(range(n, 2 * n))
        if page_size == 1:  # a slot listed twice (pages may be: their slots are freed once)
            with pytest.raises(KVDoubleFreeError):
                pool.free(torch.tensor(got[:-1] + [got[0]]))
            assert pool.num_used == 2 * n  # nothing changed
        pool.free(torch.tensor(got))
        with pytest.raises(KVDoubleFreeError):
            pool.free(torch.tensor(got))  # already free
        assert pool.num_used == n
        pool.free(torch.tensor(more))
        assert pool.num_free == pool.capacity
