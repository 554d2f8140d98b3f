"""Prefix sharing of cache memory (``AttentionCache.share_prefix`` and friends) for the dense
pool: dense and the sparse baselines hold a shared prefix's blocks read-only and refcounted,
admission counts them once, and every page returns when its last holder lets go."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from shadowkv.cache import LayeredCache, WindowCache, build_cache, make_cache
from shadowkv.cache.base import AttentionCache, CacheOptions
from shadowkv.cache.dense import BLOCKS, DenseCache
from shadowkv.cache.layout import AttentionSpec, KVLayout
from shadowkv.cache.methods import DenseConfig, method_config

CPU = torch.device("cpu")
SPEC = AttentionSpec(4, 2, 8, 8**-0.5, 8)
LAYERS, MAX_LEN, S = 2, 256, 16


def make(method: str = "dense", blocks: int = 40) -> AttentionCache:
    cfg = DenseConfig() if method == "dense" else method_config(method, sparse_budget=32)
    layout = KVLayout(SPEC, LAYERS, torch.float32)
    probe = build_cache(cfg, layout, None, CPU, 4, MAX_LEN, 2**20)
    per_block = probe.block_bytes()  # type: ignore[attr-defined]
    return build_cache(cfg, layout, None, CPU, 4, MAX_LEN, (blocks + 1) * per_block)


def keys(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(k, v)`` ``[n, Hkv, D]`` of a prompt (equal seeds: equal rows)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 2, 8, generator=g), torch.randn(n, 2, 8, generator=g))
        for _ in range(LAYERS)
    ]


def prefill(cache: AttentionCache, seq: int, kv, start: int = 0) -> None:
    """Store prompt rows ``[start, len)`` of ``kv`` (one chunk)."""
    n = kv[0][0].shape[0]
    cache.begin_prefill(seq, n - start, start)
    for layer, (k, v) in enumerate(kv):
        cache.store_prompt(layer, k[start:], v[start:], k[start:])
    cache.end_prefill()


def rows(cache: DenseCache, seq: int, n: int) -> torch.Tensor:
    """The K rows ``[n, Hkv, D]`` of layer 0 a sequence reads through its block table."""
    return cache.k_cache[0].view(-1, 2, 8)[cache._slots(seq, 0, n)]


def joined(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A prompt of ``n`` tokens starting with the first 96 rows of ``keys(100, 0)``."""
    return [(torch.cat([k[:96], k2[96:]]), torch.cat([v[:96], v2[96:]]))
            for (k, v), (k2, v2) in zip(keys(100, 0), keys(n, 1))]


@pytest.mark.parametrize("method", ["dense", "quest", "loki", "streaming", "oracle"])
def test_a_shared_prefix_is_held_once_and_freed_by_its_last_holder(method: str) -> None:
    cache = make(method)
    cache.add_sequence(0, 100, 10)
    prefill(cache, 0, keys(100, 0))
    prefix = cache.share_prefix(0, 100)
    assert prefix is not None and prefix.num_tokens == 96  # whole blocks
    assert prefix.pages[BLOCKS] == cache.seqs[0].pages[BLOCKS][:6]
    n = cache.prefix_start(prefix, 130, 10, None, 96)
    assert n == 96 and cache.prefix_start(prefix, 50, 10, None, 48) == 48
    assert cache.prefix_start(prefix, 96, 10, None, 96) == 80  # one token left to prefill
    used = cache.blocks.num_used  # 7 blocks: the sequence's (prefix's 6 among them)
    pages = sum(a.num_used * a.page_bytes for a in cache.allocators.values())
    cache.add_sequence(1, 130, 10, prefix=prefix, prefix_tokens=96)
    own = cache.blocks_for(140) - 6
    assert cache.blocks.num_used == used + own  # the shared blocks are not taken again
    assert cache.seqs[1].pages[BLOCKS][:6] == prefix.pages[BLOCKS] and cache.length(1) == 96
    low = cache.allocators.get("low")  # Loki: projected keys of the whole prompt, its own
    low_bytes = cache.blocks_for(130) * low.page_bytes if low is not None else 0
    total = cache.memory()
    assert total.device_bytes == pages + own * cache.blocks.page_bytes + low_bytes  # once
    mine = cache.blocks_for(140) * cache.blocks.page_bytes + low_bytes
    assert cache.memory(1).device_bytes == mine
    suffix = joined(130)
    prefill(cache, 1, suffix, start=96)
    assert torch.equal(rows(cache, 1, 130), suffix[0][0])  # prefix rows read through the share
    cache.release_prefix(prefix)
    cache.release_prefix(prefix)  # twice is once
    cache.free_sequence(0)
    assert cache.blocks.num_used == cache.blocks_for(140)  # sequence 1 keeps the prefix's blocks
    assert torch.equal(rows(cache, 1, 130), suffix[0][0])
    cache.free_sequence(1)
    assert all(a.num_used == 0 for a in cache.allocators.values())
    with pytest.raises(ValueError, match="released"):
        cache.can_add(130, 10, None, prefix=prefix, prefix_tokens=96)


def test_admission_counts_shared_blocks_once() -> None:
    cache = make(blocks=20)
    cache.add_sequence(0, 200, 8)  # 13 blocks
    prefill(cache, 0, keys(200, 0))
    prefix = cache.share_prefix(0, 192)
    assert not cache.can_add(200, 8)  # 13 more: 7 are free
    assert cache.can_add(200, 8, prefix=prefix, prefix_tokens=192)  # 1 of its own
    cache.add_sequence(1, 200, 8, prefix=prefix, prefix_tokens=192)
    with pytest.raises(ValueError, match="prefix_start"):
        cache.can_add(200, 8, prefix=prefix, prefix_tokens=100)  # not whole blocks


def test_quest_leaves_the_shared_blocks_bounds_alone() -> None:
    cache = make("quest")
    cache.add_sequence(0, 100, 10)
    prefill(cache, 0, keys(100, 0))
    prefix = cache.share_prefix(0, 100)
    shared = torch.tensor(prefix.pages[BLOCKS])
    mark = torch.full_like(cache.page_min[0][shared], 123.0)
    cache.page_min[0][shared] = mark  # a write to the read-only blocks would show
    cache.add_sequence(1, 130, 10, prefix=prefix, prefix_tokens=96)
    suffix = joined(130)
    prefill(cache, 1, suffix, start=96)
    assert torch.equal(cache.page_min[0][shared], mark)
    own = torch.tensor(cache.seqs[1].pages[BLOCKS][6:9])
    want = suffix[0][0][96:128].view(2, 16, 2, 8).amin(dim=1)  # its two whole own blocks
    assert torch.equal(cache.page_min[0][own[:2]], want)


@pytest.mark.parametrize("method", ["dense", "quest", "loki"])
def test_a_fork_shares_the_prefix_and_copies_its_own_blocks(method: str) -> None:
    cache = make(method)
    cache.add_sequence(0, 100, 10)
    prefill(cache, 0, keys(100, 0))
    prefix = cache.share_prefix(0, 100)
    kv = joined(130)
    for seq in (1, 2):  # a prompt and its sample, both started from the prefix
        cache.add_sequence(seq, 130, 10, prefix=prefix, prefix_tokens=96)
    prefill(cache, 1, kv, start=96)
    cache.fork(1, 2)
    one, two = cache.seqs[1].pages[BLOCKS], cache.seqs[2].pages[BLOCKS]
    assert one[:6] == two[:6] == prefix.pages[BLOCKS] and not set(one[6:]) & set(two[6:])
    assert cache.length(2) == 130 and torch.equal(rows(cache, 2, 130), kv[0][0])
    if method == "quest":
        assert torch.equal(cache.page_min[0][two[6:8]], cache.page_min[0][one[6:8]])
    if method == "loki":
        low = [cache.seqs[s].pages["low"] for s in (1, 2)]
        one, two = (cache.k_low[0][pages].flatten(0, 1)[:130] for pages in low)
        assert torch.equal(one, two)
    for seq in (0, 1, 2):
        cache.free_sequence(seq)
    cache.release_prefix(prefix)
    assert all(a.num_used == 0 for a in cache.allocators.values())


def test_loki_projects_a_shared_prefix_in_its_own_basis() -> None:
    """A sequence started from a shared prefix holds its K/V blocks, but its projected keys and
    basis are those of its own whole prompt: what an unshared sequence of it builds."""
    cache = make("loki")
    cache.add_sequence(0, 100, 10)
    prefill(cache, 0, keys(100, 0))
    prefix = cache.share_prefix(0, 100)
    kv = joined(130)
    cache.add_sequence(1, 130, 10, prefix=prefix, prefix_tokens=96)
    prefill(cache, 1, kv, start=96)
    cache.add_sequence(2, 130, 10)  # the same prompt, unshared
    prefill(cache, 2, kv)
    assert cache.seqs[1].pages[BLOCKS][:6] == prefix.pages[BLOCKS]
    low = [cache.seqs[s].pages["low"] for s in (0, 1, 2)]
    assert not set(low[0]) & set(low[1])  # projections are never shared
    for layer in range(LAYERS):
        r1, r2 = cache.seqs[1].row, cache.seqs[2].row
        assert torch.equal(cache.basis[layer][r1], cache.basis[layer][r2])
        one, two = (cache.k_low[layer][low[s]].flatten(0, 1)[:130] for s in (1, 2))
        assert torch.equal(one, two)  # the prompt's rows (the last page's tail is unused)
    assert not torch.equal(cache.k_low[0][low[0][:6]], cache.k_low[0][low[1][:6]])  # 0's basis


def test_a_ring_does_not_share() -> None:
    layout = KVLayout(replace(SPEC, sliding_window=32), LAYERS, torch.float32)
    window = WindowCache(DenseConfig(), layout, CPU, 2, MAX_LEN, 2**20)
    assert not window.supports_shared_prefix
    window.add_sequence(0, 100, 4)
    prefill(window, 0, keys(100, 0))
    assert window.share_prefix(0, 100) is None


def test_a_layered_cache_shares_when_every_part_does() -> None:
    other = replace(SPEC, num_kv_heads=1)
    cache = make_cache([SPEC, other], DenseConfig(), None, CPU, torch.float32, 2, MAX_LEN, 2**20)
    assert isinstance(cache, LayeredCache) and cache.supports_shared_prefix
    windowed = make_cache(
        [SPEC, replace(SPEC, sliding_window=32)], DenseConfig(), None, CPU, torch.float32, 2,
        MAX_LEN, 2**20,
    )
    assert not windowed.supports_shared_prefix  # the engine keeps host copies for it
    cache.add_sequence(0, 100, 4)
    g = torch.Generator().manual_seed(0)
    cache.begin_prefill(0, 100, 0)
    for layer, h in enumerate((2, 1)):
        k = torch.randn(100, h, 8, generator=g)
        cache.store_prompt(layer, k, k, k)
    cache.end_prefill()
    prefix = cache.share_prefix(0, 100)
    assert prefix is not None and prefix.num_tokens == 96 and len(prefix.detail) == 2
    assert cache.prefix_start(prefix, 120, 4, CacheOptions(), 90) == 80
    cache.add_sequence(1, 120, 4, prefix=prefix, prefix_tokens=80)
    parts = cache.parts
    assert all(p.seqs[1].pages[BLOCKS][:5] == p.seqs[0].pages[BLOCKS][:5] for p in parts)
    mem = cache.prefix_memory([prefix])
    assert mem.device_bytes == sum(6 * p.blocks.page_bytes for p in parts)
    cache.release_prefix(prefix)
    cache.free_sequence(0)
    cache.free_sequence(1)
    assert all(p.blocks.num_used == 0 for p in parts)
