"""The one page allocator: reference counts, the null page, reuse order; all-or-nothing admission.
"""

from __future__ import annotations

import pytest
import torch

from shadowkv.cache.errors import CacheCapacityError
from shadowkv.cache.pages import PageAllocator


def test_pages_are_shared_by_reference_and_freed_by_the_last_user() -> None:
    pool = PageAllocator("test pages", 5, "8 tokens", "free some", page_bytes=64)
    assert (pool.capacity, pool.num_free) == (4, 4), "page 0 is the null page"
    a = pool.alloc(3)
    assert a == [1, 2, 3] and 0 not in a and pool.num_free == 1
    pool.retain(a[:2])  # a second sequence shares the first two pages
    assert [pool.refcount(p) for p in a] == [2, 2, 1]
    pool.release(a)  # the first sequence leaves: only page 3 is free again
    assert pool.num_free == 2 and pool.refcount(1) == 1 and pool.refcount(3) == 0
    pool.release(a[:2])
    assert pool.num_free == 4 and pool.num_used == 0
    assert pool.alloc(2) == [1, 2], "freed pages are reused first, in the order they were held"


def test_shortfall_names_the_pool_and_the_fix() -> None:
    pool = PageAllocator("ShadowKV factor pages", 3, "128 tokens", "raise cache_memory_gb")
    pool.alloc(2)
    why = pool.shortfall(1)
    assert why is not None and "needs 1 pages of 128 tokens, 0 free of 2" in why
    assert "raise cache_memory_gb" in why
    with pytest.raises(CacheCapacityError, match="ShadowKV factor pages"):
        pool.alloc(1)
    with pytest.raises(ValueError, match="not in use"):
        pool.retain([7])


def test_a_pool_without_null_page_hands_out_page_zero_and_can_retire() -> None:
    pool = PageAllocator("blocks", 3, "16 tokens", "-", null_page=False)
    assert pool.capacity == 3 and pool.alloc(1) == [0]
    with pytest.raises(RuntimeError, match="pages in use"):
        pool.retire()
    pool.release([0])
    pool.retire()
    assert pool.capacity == 0 and pool.num_free == 0 and pool.shortfall(1) is not None


def test_cache_admission_takes_every_pool_or_none(tiny_checkpoint) -> None:
    """ShadowKV takes buffer blocks, factor pages, a basis slot and value pages; when the last
    pool is short nothing stays held."""
    from utils import cache_for

    from shadowkv.cache.methods import ShadowKVConfig
    from shadowkv.config import ModelConfig

    mcfg = ModelConfig("llama", 64, 96, 64, 1, 6, 2, 16)
    page = 16 * 8 * 32 * 4  # one value page: 16 chunks of 8 tokens, 2 heads x 16 dims, fp32
    cfg = ShadowKVConfig(sparse_budget=32, outlier_chunks=2, host_memory_gb=3 * page / 2**30)
    cache, _ = cache_for(mcfg, cfg, 512, seqs=4)
    cache.add_sequence(0, 200, 8, staged=True)  # 2 value pages: the host tier is now full
    used = {name: a.num_used for name, a in cache.allocators.items()}
    # buffer: 32 local + 16 outlier + 32 selected + 8 generated rows = 6 blocks of 16; staging
    # (a prompt prefilled in chunks): 2 pages of 128 tokens and a Gram slot
    assert used == {"blocks": 6, "factor": 2, "basis": 1, "host values": 2, "device values": 0,
                    "staging": 2, "staging gram": 1}
    with pytest.raises(CacheCapacityError, match="value store"):
        cache.add_sequence(1, 200, 8, staged=True)
    assert {name: a.num_used for name, a in cache.allocators.items()} == used
    mem = cache.memory(0)
    assert mem.host_bytes == 2 * page and mem.device_bytes > 0
    cache.free_sequence(0)
    assert all(a.num_used == 0 for a in cache.allocators.values()) and not cache.seqs
    assert torch.all(cache.tables.factor == 0), "a freed slot's tables point at the null page"
