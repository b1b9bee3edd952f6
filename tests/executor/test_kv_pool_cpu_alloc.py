"""The CPU KV pool's storage: lazy zeros from a private anonymous mapping instead of ``torch.zeros``."""

from __future__ import annotations

import gc
import mmap
import os

import pytest
import torch
from hf_fixtures import hf_greedy

from llmir_lang.errors import OutOfKVMemoryError
from llmir_lang.executor import kv_pool
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.kv_pool import KVPool

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAZY = hasattr(mmap, "MAP_PRIVATE")  # the platforms where the CPU pool is a mapping


def _rss() -> int | None:
    """Resident bytes of this process, or None where they cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _mapping_perms(addr: int) -> str | None:
    """The permissions column of /proc/self/maps for the mapping holding ``addr`` (None: unreadable)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= addr < hi:
                    return line.split()[1]
    except OSError:
        return None
    return None


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_pool_is_zeros_with_the_layout_of_torch_zeros(dtype):
    pool = KVPool(3, 2, 8, 40, dtype, "cpu", page_size=4)
    ref = torch.zeros((3, 41, 2, 8), dtype=dtype)
    for storage in (pool._k_storage, pool._v_storage):
        assert storage.dtype == dtype and storage.device.type == "cpu"
        assert storage.shape == ref.shape and storage.stride() == ref.stride()
        assert storage.is_contiguous() and storage.storage_offset() == 0
        assert not storage.requires_grad and not storage.is_pinned()
        assert torch.equal(storage, ref)
        assert not storage.isnan().any()
    for buf in pool.k_buffers + pool.v_buffers:
        assert buf.shape == (41, 2, 8) and buf.stride() == ref[0].stride() and buf.is_contiguous()
    # writable, and K, V and layers are distinct memory
    pool.k_buffers[1][pool.pad_slot] = 1.5
    pool.v_buffers[2][3, 1].fill_(-2.0)
    assert pool._k_storage.sum().item() == 1.5 * 16 and pool._v_storage.sum().item() == -2.0 * 8
    assert pool.k_buffers[0].abs().sum() == 0 and pool.v_buffers[1].abs().sum() == 0


def test_fp32_pool_numpy_views_share_its_memory():
    """The numpy attention path writes the pool through numpy views of the buffers."""
    pool = KVPool(2, 2, 4, 8, torch.float32, "cpu")
    arr = pool.k_buffers[1].numpy()
    assert arr.flags.writeable and arr.flags.c_contiguous
    arr[5] = 3.0
    assert pool.k_buffers[1][5].sum().item() == 24.0 and pool.k_buffers[0].abs().sum() == 0


@pytest.mark.skipif(not LAZY, reason="no MAP_PRIVATE here: the CPU pool is torch.zeros")
def test_cpu_pool_memory_is_lazy_private_and_outlives_the_pool():
    budget = 256 * 2**20
    before = _rss()
    pool = KVPool.from_memory_budget(budget, 4, 4, 32, torch.float32, "cpu")
    after = _rss()
    if before is not None and after is not None:
        # torch.zeros would make all 256 MiB resident; the mapping hands out pages on first touch
        # (the free list's arrays take about 1.5 MiB here)
        assert after - before < budget // 16, (before, after)
        pool.k_buffers[0][:1000] = 1.0  # touching a few slots takes only their pages
        touched = _rss()
        assert touched is not None and touched - before < budget // 16
    perms = _mapping_perms(pool._k_storage.data_ptr())
    if perms is not None:
        assert perms.startswith("rw") and perms.endswith("p")  # private: copy-on-write in a fork
    # the views keep the mapping alive after the pool is gone
    k0 = pool.k_buffers[0]
    del pool
    gc.collect()
    assert k0[:1000].sum().item() == 1000 * 4 * 32 and k0[1000:].abs().sum().item() == 0


def test_mapping_failure_is_out_of_kv_memory(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    if not LAZY:
        pytest.skip("no MAP_PRIVATE here: the CPU pool is torch.zeros")
    monkeypatch.setattr(kv_pool.mmap, "mmap", fail)
    with pytest.raises(OutOfKVMemoryError, match="kv_memory"):
        KVPool(2, 2, 4, 8, torch.float32, "cpu")


def test_other_devices_keep_torch_zeros():
    t = kv_pool.zeros((2, 5, 3), torch.bfloat16, torch.device("meta"))
    assert t.device.type == "meta" and t.shape == (2, 5, 3) and t.dtype == torch.bfloat16


PROMPTS = [
    "Q: What is 7 + 5?\nA:",
    "Name: Ada Lovelace. Born 1815 in London. She wrote the first program.",
    "Hello",
]


def _greedy(dtype: torch.dtype) -> list[list[int]]:
    params = {"max_new_tokens": 12, "ignore_eos": True}
    with Engine(device="cpu", dtype=dtype, kv_memory="4MiB") as eng:
        # one alone (the numpy path for fp32), then all together (batched, padded steps)
        alone = [eng.generate(PROMPTS[0], params).token_ids]
        together = [r.token_ids for r in eng.generate(PROMPTS, [params] * len(PROMPTS))]
    return alone + together


@pytest.mark.parametrize("dtype", DTYPES)
def test_bundled_model_greedy_output_matches_a_torch_zeros_pool(dtype, monkeypatch):
    lazy = _greedy(dtype)
    monkeypatch.setattr(kv_pool, "zeros", lambda shape, dt, dev: torch.zeros(shape, dtype=dt, device=dev))
    eager = _greedy(dtype)
    assert lazy == eager
    assert all(len(t) == 12 for t in lazy)


def test_greedy_matches_transformers_on_a_lazy_pool(checkpoints):
    folder, hf = checkpoints("llama")
    ids = [5, 17, 99, 3, 250, 42, 7, 7, 180]
    with Engine(str(folder), device="cpu", kv_memory="8MB") as eng:
        assert eng.device.type == "cpu"
        r = eng.generate(ids, {"max_new_tokens": 16, "ignore_eos": True})
    tokens, _ = hf_greedy(hf, ids, 16)
    assert r.token_ids == tokens
