"""Growing a decoding sequence's reservation (``AttentionCache.grow``, optimistic admission):
a grown sequence decodes exactly as one admitted with its worst case, growth takes its pages all
or none (a failed grow leaves every page and table as it was), decode past the reservation is
refused, and a ``LayeredCache`` grows every part or none."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from utils import assert_close_verbose, cache_for, greedy_with_logits, run_model

from shadowkv.cache import CacheCapacityError, LayeredCache, WindowCache, make_cache
from shadowkv.cache.base import AttentionCache
from shadowkv.cache.layout import AttentionSpec
from shadowkv.cache.methods import DenseConfig, ShadowKVConfig, method_config
from shadowkv.cache.shadow_tables import FACTOR
from shadowkv.models.loader import load_model

CPU = torch.device("cpu")
MAX_LEN = 512
CONFIGS = {
    "dense": DenseConfig(),
    "shadowkv": ShadowKVConfig(sparse_budget=32, outlier_chunks=2, rank=16),
    "quest": method_config("quest", sparse_budget=32),
}
PROMPT = [(7 * i) % 90 + 3 for i in range(97)]  # sparse for ShadowKV and Quest at 32 tokens


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint("llama", num_layers=2), CPU, torch.float32)


def tables(cache: AttentionCache, seq_id: int) -> list[torch.Tensor]:
    """The per-sequence page-table rows a growth extends (a copy)."""
    row = cache.seqs[seq_id].row
    if hasattr(cache, "block_tables"):
        return [cache.block_tables[row].clone()]
    return [cache.tables.buffer[row].clone(), cache.tables.factor[row].clone()]


def exhaust(cache: AttentionCache, name: str) -> list[int]:
    """Take every free page of one pool (as other sequences would)."""
    return cache.allocators[name].alloc(cache.allocators[name].num_free)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_grown_sequence_decodes_as_a_worst_case_one(model, method: str) -> None:
    mcfg, m = model
    cache, rope = cache_for(mcfg, CONFIGS[method], MAX_LEN, 2)
    steps = 40
    want_tokens, want = greedy_with_logits(m, rope, cache, PROMPT, steps)
    n = len(PROMPT)
    cache.add_sequence(0, n, 1)  # room for one token past the prompt: grows 3 at a time
    cache.begin_prefill(0, n)
    logits = [run_model(m, torch.tensor(PROMPT), torch.arange(n), rope, cache, "prefill",
                        logits_index=torch.tensor([n - 1]))[0]]
    cache.end_prefill()
    grows = 0
    for _ in range(steps):
        if cache.length(0) - n + 1 > cache.reserved_tokens(0):
            cache.grow(0, cache.reserved_tokens(0) + 3)
            grows += 1
        cache.begin_decode([0])
        pos = torch.tensor([cache.length(0)])
        logits.append(run_model(m, logits[-1].argmax()[None], pos, rope, cache, "decode")[0])
        cache.end_decode()
    got = torch.stack(logits)
    assert got.argmax(-1).tolist() == want_tokens
    assert_close_verbose(got, want, atol=0, rtol=0, what="logits of the grown sequence")
    assert grows == 13 and cache.reserved_tokens(0) == 40
    cache.free_sequence(0)
    assert cache.memory().device_bytes == 0


@pytest.mark.parametrize("method", list(CONFIGS))
def test_decode_past_the_reservation_is_refused_until_grown(model, method: str) -> None:
    mcfg, m = model
    cache, rope = cache_for(mcfg, CONFIGS[method], MAX_LEN, 1)
    n = len(PROMPT)
    cache.add_sequence(0, n, 1)
    cache.begin_prefill(0, n)
    run_model(m, torch.tensor(PROMPT), torch.arange(n), rope, cache, "prefill")
    cache.end_prefill()
    cache.begin_decode([0])
    run_model(m, torch.tensor([5]), torch.tensor([n]), rope, cache, "decode")
    cache.end_decode()
    with pytest.raises(CacheCapacityError, match="grow it first"):
        cache.begin_decode([0])
    cache.grow(0, 2)
    cache.begin_decode([0])  # room again


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_failing_grow_takes_nothing(model, method: str) -> None:
    mcfg, _ = model
    cache, _ = cache_for(mcfg, CONFIGS[method], MAX_LEN, 2)
    cache.add_sequence(0, len(PROMPT), 4)
    rec = cache.seqs[0]
    pages, held, rows = copy.deepcopy(rec.pages), rec.max_new_tokens, tables(cache, 0)
    name = "blocks"  # dense K/V blocks, ShadowKV's buffer blocks: what generated tokens use
    taken = exhaust(cache, name)
    free = {n: a.num_free for n, a in cache.allocators.items()}
    assert not cache.can_grow(0, 200)
    pool = cache.allocators[name].name
    with pytest.raises(CacheCapacityError, match=pool):
        cache.grow(0, 200)
    assert rec.pages == pages and rec.max_new_tokens == held == cache.reserved_tokens(0)
    assert {n: a.num_free for n, a in cache.allocators.items()} == free
    for before, after in zip(rows, tables(cache, 0)):
        assert torch.equal(before, after)
    cache.allocators[name].release(taken)
    assert cache.can_grow(0, 200)
    cache.grow(0, 200)
    assert cache.reserved_tokens(0) == 200 and len(rec.pages[name]) > len(pages[name])
    assert rec.pages[name][: len(pages[name])] == pages[name], "held pages stay, in order"
    if FACTOR in pages:  # ShadowKV: the prompt's factor pages (and values) never change
        assert rec.pages[FACTOR] == pages[FACTOR]
        assert torch.equal(tables(cache, 0)[1], rows[1])
    cache.free_sequence(0)
    assert all(a.num_used == 0 for a in cache.allocators.values())


def test_growth_is_capped_by_the_context_and_never_shrinks(model) -> None:
    mcfg, _ = model
    cache, _ = cache_for(mcfg, DenseConfig(), MAX_LEN, 1)
    cache.add_sequence(0, len(PROMPT), 8)
    cache.grow(0, 4)  # fewer than held: nothing changes
    assert cache.reserved_tokens(0) == 8
    cache.grow(0, 10_000)
    assert cache.reserved_tokens(0) == MAX_LEN - len(PROMPT)
    assert len(cache.seqs[0].pages["blocks"]) == MAX_LEN // 16


def layered(memory: int = 2**22) -> LayeredCache:
    """Two sliding-window layers (12-token window, ``WindowCache``) and a global dense one."""
    spec = AttentionSpec(4, 2, 16, 0.25, 16)
    window = replace(spec, sliding_window=12)
    cache = make_cache([window, window, spec], DenseConfig(page_size=8), None, CPU,
                       torch.float32, 2, MAX_LEN, memory)
    assert isinstance(cache, LayeredCache) and isinstance(cache.parts[0], WindowCache)
    return cache


def test_layered_cache_grows_every_part_or_none() -> None:
    cache = layered()
    ring, dense = cache.parts
    cache.add_sequence(0, 5, 1)  # 6 tokens: one 8-slot block in each part
    assert len(ring.seqs[0].pages["blocks"]) == len(dense.seqs[0].pages["blocks"]) == 1
    taken = exhaust(dense, "blocks")
    with pytest.raises(CacheCapacityError, match="cache blocks"):
        cache.grow(0, 10)
    assert not cache.can_grow(0, 10)
    assert len(ring.seqs[0].pages["blocks"]) == 1, "the window part did not grow alone"
    assert ring.reserved_tokens(0) == dense.reserved_tokens(0) == cache.reserved_tokens(0) == 1
    dense.allocators["blocks"].release(taken)
    cache.grow(0, 20)  # 25 tokens: the ring's 12 slots in two blocks, the global part's four
    assert len(ring.seqs[0].pages["blocks"]) == 2 and len(dense.seqs[0].pages["blocks"]) == 4
    assert cache.reserved_tokens(0) == 20
    cache.grow(0, 100)  # the ring is full: only the global part takes blocks
    assert len(ring.seqs[0].pages["blocks"]) == 2 and len(dense.seqs[0].pages["blocks"]) == 14
    cache.free_sequence(0)
    assert cache.memory().device_bytes == 0
