"""ShadowKV prefix sharing of memory at the cache contract: a sequence started from a shared
prefix (``share_prefix`` / ``add_sequence(..., prefix=)``) attends like dense attention at full
rank and full budget, stays close to an unshared prefill at the default rank, holds the
prefix's pages once, and leaves every pool empty when all is freed."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from utils import assert_close_verbose, cache_for, greedy_with_logits, run_model

from shadowkv.bench.models import arch_config, random_model
from shadowkv.cache import make_cache as build
from shadowkv.cache.base import CacheCapacityError, CacheOptions, SharedPrefix, device_columns
from shadowkv.cache.methods import DenseConfig, ShadowKVConfig
from shadowkv.cache.shadow import ShadowKVCache
from shadowkv.cache.shadow_layout import cdiv
from shadowkv.cache.shadow_staging import STAGING, STAGING_GRAM
from shadowkv.cache.shadow_tables import BASIS, BLOCKS, FACTOR, KEYS, VALUE_POOLS
from shadowkv.cache.store import DEVICE, HOST
from shadowkv.config import ModelConfig
from shadowkv.kernels.fp8 import fp8_round_trip
from shadowkv.kernels.rope import apply_rope
from shadowkv.kernels.varlen_attention.reference import causal_attention

MAX_LEN = 512
C, P = 8, 128
HKV, D = 2, 16
PROMPT = 300  # the shared prompt p: 35 candidate chunks (2 local), so 256 tokens can be shared
SHARED = 256
# 256 tokens = 32 chunks: every seg-0 landmark (at most 32) is selected.
FULL = {"sparse_budget": 256, "outlier_chunks": 2, "local_chunks": 2, "rank": 1.0}


def make_cache(
    group: int = 1, layers: int = 2, dtype=torch.float64, head_dim: int = D, **knobs
) -> ShadowKVCache:
    mcfg = ModelConfig(
        "llama", 64, HKV * group * head_dim, 64, layers, HKV * group, HKV, head_dim
    )
    cache, _ = cache_for(mcfg, ShadowKVConfig(**{**FULL, **knobs}), MAX_LEN, 6, 2**25, dtype)
    assert isinstance(cache, ShadowKVCache)
    return cache


@dataclass
class Tokens:
    """Per layer queries ``[L, T, H, D]``, pre-RoPE keys and values ``[L, T, Hkv, D]`` of a
    sequence's tokens, at positions ``0 .. T-1``."""

    q: torch.Tensor
    k_pre: torch.Tensor
    v: torch.Tensor

    def __getitem__(self, s: slice) -> Tokens:
        return Tokens(self.q[:, s], self.k_pre[:, s], self.v[:, s])

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(*(torch.cat([a, b], 1) for a, b in zip(self.tensors, other.tensors)))

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.k_pre, self.v

    @property
    def num(self) -> int:
        return self.q.shape[1]


def tokens(cache: ShadowKVCache, n: int, seed: int, spectrum: bool = False) -> Tokens:
    """Random tokens; ``spectrum``: keys with decaying singular values (real keys are
    low-rank-ish, which a default-rank test needs to be meaningful)."""
    g = torch.Generator().manual_seed(seed)
    L, H, Hkv = cache.num_layers, cache.layout.spec.num_heads, cache.layout.num_kv_heads
    W = cache.layout.kv_dim
    k = torch.randn(L, n, W, generator=g, dtype=torch.float64)
    if spectrum:
        k = k * torch.logspace(0, -2, W, dtype=torch.float64)
    dt = cache.dtype
    return Tokens(
        torch.randn(L, n, H, cache.layout.head_dim, generator=g, dtype=torch.float64).to(dt),
        k.view(L, n, Hkv, -1).to(dt),
        torch.randn(L, n, Hkv, cache.layout.head_dim, generator=g, dtype=torch.float64).to(dt),
    )


def rotated(cache: ShadowKVCache, k_pre: torch.Tensor, start: int) -> torch.Tensor:
    """Post-RoPE keys of ``k_pre [T, Hkv, D]`` at positions ``start ..``."""
    cos, sin = cache.rope.rows(torch.arange(start, start + k_pre.shape[0]))
    return apply_rope(k_pre, k_pre, cos, sin, cache.rope.style)[1]


def prefill(cache: ShadowKVCache, sid: int, toks: Tokens, start: int, chunks: list[int]):
    """Prefill tokens ``[start, start + toks.num)`` of ``sid`` in ``chunks``; per layer the
    attention outputs ``[L, toks.num, H, D]``."""
    assert sum(chunks) == toks.num
    outs, at = [], start
    for size in chunks:
        part = toks[at - start : at - start + size]
        cache.begin_prefill(sid, size, at)
        outs.append(torch.stack([
            cache.prefill(layer, part.q[layer], rotated(cache, part.k_pre[layer], at),
                          part.v[layer], part.k_pre[layer])
            for layer in range(cache.num_layers)
        ]))
        cache.end_prefill()
        at += size
    return torch.cat(outs, 1)


def dense_prefill(cache: ShadowKVCache, toks: Tokens, start: int) -> torch.Tensor:
    """Exact attention outputs ``[L, T - start, H, D]`` of tokens ``[start, T)`` over all."""
    return torch.stack([
        causal_attention(toks.q[layer, start:], rotated(cache, toks.k_pre[layer], 0),
                         toks.v[layer], cache.scale)
        for layer in range(cache.num_layers)
    ])


def decode(cache: ShadowKVCache, seqs: list[int], step: Tokens) -> torch.Tensor:
    """One decode step of ``seqs``; ``step`` holds one token per sequence ``[L, B, ...]``.
    Returns ``[L, B, H, D]``."""
    cache.begin_decode(seqs)
    pos = [cache.length(s) for s in seqs]
    outs = []
    for layer in range(cache.num_layers):
        k = torch.cat([rotated(cache, step.k_pre[layer, b : b + 1], p) for b, p in enumerate(pos)])
        outs.append(cache.decode(layer, step.q[layer], k, step.v[layer], step.k_pre[layer]))
    cache.end_decode()
    return torch.stack(outs)


def start_shared(
    cache: ShadowKVCache, sid: int, prefix: SharedPrefix, toks: Tokens, new: int = 4,
    options: CacheOptions | None = None,
) -> int:
    """Admit ``sid`` (prompt ``toks``) from ``prefix`` as far as ``prefix_start`` allows."""
    n = cache.prefix_start(prefix, toks.num, new, options, prefix.num_tokens)
    assert n > 0
    cache.add_sequence(sid, toks.num, new, options, prefix=prefix, prefix_tokens=n)
    assert cache.length(sid) == n
    return n


def shared_prompt(cache: ShadowKVCache, seed: int = 0, spectrum: bool = False):
    """Prefill the shared prompt p as sequence 0 and share its first ``SHARED`` tokens."""
    p = tokens(cache, PROMPT, seed, spectrum)
    cache.add_sequence(0, PROMPT, 4)
    prefill(cache, 0, p, 0, [PROMPT])
    prefix = cache.share_prefix(0, PROMPT)
    assert prefix is not None and prefix.num_tokens == SHARED
    return p, prefix


def run_shared_vs_dense(
    cache: ShadowKVCache, suffix: int, chunks: list[int], steps: int = 3, keep: int = SHARED
):
    """A sequence from the first ``keep`` tokens of the shared prefix: (shared outputs, dense
    outputs) of its suffix prefill and of ``steps`` decode steps."""
    p, prefix = shared_prompt(cache)
    toks = p[:keep] + tokens(cache, suffix, seed=suffix)
    n = cache.prefix_start(prefix, toks.num, steps, None, keep)
    assert n == keep
    cache.add_sequence(1, toks.num, steps, prefix=prefix, prefix_tokens=n)
    got = [prefill(cache, 1, toks[keep:], keep, chunks)]
    want = [dense_prefill(cache, toks, keep)]
    for i in range(steps):
        step = tokens(cache, 1, seed=100 + i)
        got.append(decode(cache, [1], step)[:, 0])
        toks = toks + step
        want.append(dense_prefill(cache, toks, toks.num - 1)[:, 0])
    return got, want


# exact at full rank and full budget ------------------------------------------------------------
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize(
    "suffix,chunks,keep,budget",
    [(37, [37], SHARED, 256), (61, [13, 40, 8], SHARED, 256), (33, [1, 31, 1], SHARED, 256),
     # From one page of the two-page prefix: a suffix no longer than that page, and a budget
     # of its 16 chunks (so the 248-token prompt runs sparse and selects every landmark).
     (120, [70, 50], P, 128)],
)
def test_full_rank_full_budget_equals_dense(
    group: int, suffix: int, chunks: list[int], keep: int, budget: int
) -> None:
    cache = make_cache(group, sparse_budget=budget)
    got, want = run_shared_vs_dense(cache, suffix, chunks, keep=keep)
    lay = cache.record(1).lay
    assert lay.num_select == lay.num_landmarks and lay.local_len == suffix
    assert len(cache.seqs[1].pages[FACTOR]) == keep // P
    assert lay.outlier_rows > 0, "some outliers of p lie in the prefix: the copy is exercised"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_verbose(g, w, atol=1e-9, rtol=1e-7, what=f"prefill/decode step {i}")


@pytest.mark.parametrize("tier", [HOST, DEVICE])
def test_both_value_tiers_serve_a_prefix(tier: int) -> None:
    cache = make_cache(offload_values=tier == HOST)
    got, want = run_shared_vs_dense(cache, 35, [10, 25])
    assert cache.record(0).value_tier == tier and cache.record(1).value_tier == tier
    for g, w in zip(got, want):
        assert_close_verbose(g, w, atol=1e-9, rtol=1e-7, what=f"tier {tier}")


def test_without_outliers_the_prefix_holds_no_copy() -> None:
    cache = make_cache(outlier_chunks=0)
    got, want = run_shared_vs_dense(cache, 40, [40])
    assert BLOCKS not in cache.seqs[1].prefix.pages and cache.record(1).lay.outlier_rows == 0
    for g, w in zip(got, want):
        assert_close_verbose(g, w, atol=1e-9, rtol=1e-7, what="no outliers")


def test_fp8_values_are_read_back_as_the_store_keeps_them() -> None:
    """fp8 values: the suffix prefill attends over the prefix's values as stored (fp8 round
    trip), and the exact suffix; keys exact at full rank."""
    cache = make_cache(value_dtype="fp8")
    p, prefix = shared_prompt(cache)
    toks = p[:SHARED] + tokens(cache, 35, seed=35)
    start_shared(cache, 1, prefix, toks)
    got = prefill(cache, 1, toks[SHARED:], SHARED, [35])
    stored = Tokens(toks.q, toks.k_pre, toks.v.clone())
    stored.v[:, :SHARED] = torch.stack([fp8_round_trip(v) for v in toks.v[:, :SHARED]])
    assert not torch.equal(stored.v, toks.v)
    assert_close_verbose(got, dense_prefill(cache, stored, SHARED), atol=1e-9, rtol=1e-7,
                         what="fp8 prefix values")


# the default rank: close to an unshared prefill ------------------------------------------------
def test_default_rank_is_close_to_an_unshared_prefill() -> None:
    """Shared (rank-64 rebuilt prefix keys in the suffix prefill, p's basis for the whole
    prefix) against the same tokens prefilled whole, both at the default rank and a budget of
    half the landmarks; errors relative to dense attention's outputs."""
    cache = make_cache(head_dim=64, rank=None, sparse_budget=264, dtype=torch.float32)
    assert cache.rank == 64 < cache.layout.kv_dim
    p, prefix = shared_prompt(cache, spectrum=True)
    toks = p[:SHARED] + tokens(cache, 45, seed=7, spectrum=True)
    start_shared(cache, 1, prefix, toks, new=3)
    cache.add_sequence(2, toks.num, 3)
    shared = prefill(cache, 1, toks[SHARED:], SHARED, [20, 25])
    whole = prefill(cache, 2, toks, 0, [toks.num])[:, SHARED:]
    dense = dense_prefill(cache, toks, SHARED)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    errors = {"prefill": rel(shared, whole)}
    assert rel(whole, dense) < 1e-5, "an unshared prefill is exact"
    for i in range(3):
        step = tokens(cache, 2, seed=50 + i, spectrum=True)
        step = Tokens(*(t[:, :1].expand(-1, 2, *t.shape[2:]) for t in step.tensors))
        out = decode(cache, [1, 2], step)
        toks = toks + step[0:1]
        want = dense_prefill(cache, toks, toks.num - 1)[:, 0]
        errors[f"decode {i}"] = rel(out[:, 0], out[:, 1])
        errors[f"decode {i} vs dense (shared, unshared)"] = (
            rel(out[:, 0], want), rel(out[:, 1], want)
        )
    print("relative errors:", errors)
    assert errors["prefill"] < 0.05, errors
    for i in range(3):
        shared_err, whole_err = errors[f"decode {i} vs dense (shared, unshared)"]
        assert shared_err < max(2 * whole_err, 0.05), errors


# pages: held once, kept alive by their users, all freed ------------------------------------------
def memory_parts(cache: ShadowKVCache, pages: dict[str, list[int]]) -> tuple[int, int]:
    """(device, host) bytes of ``pages`` by allocator."""
    device = host = 0
    for name, held in pages.items():
        alloc = cache.allocators[name]
        if alloc.on_host:
            host += len(held) * alloc.page_bytes
        else:
            device += len(held) * alloc.page_bytes
    return device, host


@pytest.mark.parametrize("release_first", [True, False])
def test_two_sequences_hold_the_prefix_pages_once(release_first: bool) -> None:
    cache = make_cache()
    p, prefix = shared_prompt(cache)
    shared = {name: prefix.pages[name] for name in (FACTOR, VALUE_POOLS[HOST], BASIS)}
    copy = prefix.pages[BLOCKS]
    assert len(shared[FACTOR]) == len(shared[VALUE_POOLS[HOST]]) == SHARED // P
    assert shared[BASIS] == [cache.record(0).basis]
    blocks = cache.allocators[BLOCKS]
    assert [blocks.refcount(b) for b in copy] == [1] * len(copy), "the prefix's own copy"
    used = {name: cache.allocators[name].num_used for name in cache.allocators}
    toks = p[:SHARED] + tokens(cache, 40, seed=40)
    for sid in (1, 2):
        start_shared(cache, sid, prefix, toks, new=4)
    for name, pages in shared.items():
        assert [cache.allocators[name].refcount(x) for x in pages] == [4] * len(pages), name
        assert cache.allocators[name].num_used == used[name], f"{name}: nothing new taken"
    assert cache.allocators[VALUE_POOLS[DEVICE]].num_used == 0
    # Each sequence counts the shared pages in its own figure; the total counts them once.
    mems = [cache.memory(s) for s in (0, 1, 2)]
    dev, host = memory_parts(cache, shared)
    total = cache.memory()
    assert total.device_bytes == sum(m.device_bytes for m in mems) - 2 * dev
    assert total.host_bytes == sum(m.host_bytes for m in mems) - 2 * host
    own = len(cache.seqs[1].pages[BLOCKS]) * blocks.page_bytes
    assert mems[1].device_bytes == cache.sizing.slot_bytes + dev + own
    assert mems[1].host_bytes == host > 0
    held = cache.prefix_memory([prefix])
    assert (held.device_bytes, held.host_bytes) == (dev + len(copy) * blocks.page_bytes, host)
    # Both prefill their suffix and decode like dense attention over their tokens (full rank).
    for sid in (1, 2):
        prefill(cache, sid, toks[SHARED:], SHARED, [40])
    step = tokens(cache, 1, seed=9)
    both = Tokens(*(t.expand(-1, 2, *t.shape[2:]) for t in step.tensors))
    out = decode(cache, [1, 2], both)
    toks = toks + step
    want = dense_prefill(cache, toks, toks.num - 1)[:, 0]
    for b in range(2):
        assert_close_verbose(out[:, b], want, atol=1e-9, rtol=1e-7, what=f"seq {b + 1}")
    # The prefix and p go; their pages stay with the two sequences, a new prompt (which reuses
    # every freed page) overwrites none of them, and decode is unchanged.
    cache.release_prefix(prefix)
    cache.free_sequence(0)
    for name, pages in shared.items():
        assert [cache.allocators[name].refcount(x) for x in pages] == [2] * len(pages), name
    assert all(blocks.refcount(b) == 0 for b in copy), "the exact copy was the prefix's alone"
    cache.add_sequence(3, PROMPT, 4)
    prefill(cache, 3, tokens(cache, PROMPT, seed=3), 0, [PROMPT])
    step = tokens(cache, 1, seed=10)
    out = decode(cache, [1, 2], Tokens(*(t.expand(-1, 2, *t.shape[2:]) for t in step.tensors)))
    toks = toks + step
    want = dense_prefill(cache, toks, toks.num - 1)[:, 0]
    for b in range(2):
        assert_close_verbose(out[:, b], want, atol=1e-9, rtol=1e-7, what=f"seq {b + 1} after")
    assert cache.share_prefix(1, toks.num) is None, "a sequence from a prefix shares nothing"
    # Freed in any order, with the prefix released first or last: every pool is empty.
    p2 = cache.share_prefix(3, PROMPT)
    assert p2 is not None
    if release_first:
        cache.release_prefix(p2)
    for sid in (2, 3, 1):
        cache.free_sequence(sid)
    cache.release_prefix(p2)  # a second release does nothing
    assert {name: a.num_used for name, a in cache.allocators.items()} == dict.fromkeys(
        cache.allocators, 0
    )


def test_a_sequence_from_a_prefix_grows_by_buffer_blocks_only() -> None:
    cache = make_cache()
    p, prefix = shared_prompt(cache)
    toks = p[:SHARED] + tokens(cache, 45, seed=45)
    start_shared(cache, 1, prefix, toks, new=1)
    prefill(cache, 1, toks[SHARED:], SHARED, [45])
    held = {name: list(pages) for name, pages in cache.seqs[1].pages.items()}
    cache.grow(1, 40)  # 40 generated rows: past the first buffer block's room
    pages = cache.seqs[1].pages
    assert len(pages[BLOCKS]) > len(held[BLOCKS])
    assert {name: pages[name] for name in held if name != BLOCKS} == {
        name: held[name] for name in held if name != BLOCKS
    }
    for i in range(20):
        step = tokens(cache, 1, seed=300 + i)
        out = decode(cache, [1], step)[:, 0]
        toks = toks + step
        want = dense_prefill(cache, toks, toks.num - 1)[:, 0]
        assert_close_verbose(out, want, atol=1e-9, rtol=1e-7, what=f"grown, step {i}")


# when a sequence cannot start from a prefix ---------------------------------------------------
def test_prefix_start_is_zero_when_the_sequence_would_not_run_sparse_from_it() -> None:
    cache = make_cache(shared_suffix_tokens=200)
    p, prefix = shared_prompt(cache)

    def start(suffix: int, options: CacheOptions | None = None, matched: int = PROMPT) -> int:
        return cache.prefix_start(prefix, SHARED + suffix, 4, options, matched)

    assert start(40) == SHARED and start(37, CacheOptions(sparse_budget=64)) == SHARED
    # Whole pages of what matches: one page, but then the suffix (168) outweighs it.
    assert start(40, matched=200) == 0, "a suffix longer than the shared start: from scratch"
    assert start(40, CacheOptions(exact=True)) == 0, "exact: it runs dense"
    assert start(1) == 0, "257 tokens run dense at this budget"
    assert start(200) == SHARED and start(201) == SHARED, "a longer suffix is segment 1"
    assert cache._shared_layout(prefix, SHARED + 201, 4, None, SHARED).segment_start == SHARED
    with pytest.raises(ValueError, match="prefix_start"):
        cache.add_sequence(1, SHARED + 40, 4, prefix=prefix, prefix_tokens=P + 8)
    assert 1 not in cache.seqs
    cache.release_prefix(prefix)
    assert start(40) == 0, "a released prefix"
    cache.add_sequence(4, 60, 4)
    prefill(cache, 4, p[:60], 0, [60])
    assert cache.record(4).lay.dense and cache.share_prefix(4, 60) is None, "dense p"


def test_prefix_start_is_zero_when_no_landmark_is_left() -> None:
    """16 outlier chunks per head, all in the first 128 tokens (keys there vary within each
    chunk, later chunks are constant): from 128 tokens no landmark is left, from 256 there
    are 16."""
    cache = make_cache(outlier_chunks=16, sparse_budget=32)
    p = tokens(cache, PROMPT, seed=1)
    # Post-RoPE keys of every token of a chunk from 16 on equal the chunk's first: their
    # cosine to the mean is 1, so the outliers are the 16 chunks before.
    cos, sin = cache.rope.rows(torch.arange(PROMPT))
    end = PROMPT // C * C
    for layer in range(cache.num_layers):
        k = rotated(cache, p.k_pre[layer], 0)
        later = k[P:end].view(-1, C, HKV, D)
        later[:] = later[:, :1].clone()
        p.k_pre[layer] = apply_rope(k, k, cos, -sin, cache.rope.style)[1]  # rotated back
    cache.add_sequence(0, PROMPT, 4)
    prefill(cache, 0, p, 0, [PROMPT])
    outliers = cache.record(0).outlier_ids
    assert all(set(ids.flatten().tolist()) == set(range(16)) for ids in outliers.values())
    prefix = cache.share_prefix(0, PROMPT)
    assert prefix is not None and prefix.num_tokens == SHARED
    assert cache.prefix_start(prefix, SHARED + 40, 4, None, P + 50) == 0
    n = cache.prefix_start(prefix, SHARED + 40, 4, None, SHARED)
    assert n == SHARED
    cache.add_sequence(1, SHARED + 40, 4, prefix=prefix, prefix_tokens=n)
    lay = cache.record(1).lay
    assert (lay.num_landmarks, lay.outlier_rows, lay.num_select) == (16, 16 * C, 4)


def test_exact_rows_hold_every_prefix_chunk_not_a_landmark() -> None:
    """At the default rank: a sequence from a prefix holds, per layer and KV head, exactly the
    chunks of the prefix that are not among its first N' landmarks; p's outliers with their
    exact keys, the rest with keys rebuilt in p's basis (``RoPE(K W Wᵀ)``, not exact); values
    all exact."""
    cache = make_cache(head_dim=64, rank=None)
    assert cache.rank < cache.layout.kv_dim
    p, prefix = shared_prompt(cache, spectrum=True)
    toks = p[:SHARED] + tokens(cache, 40, seed=4, spectrum=True)
    start_shared(cache, 1, prefix, toks)
    rec, hd = cache.record(1), cache.layout.head_dim
    lay, nc = rec.lay, SHARED // C
    rows = cache.tables.buffer_rows(rec.row, lay.local_len, lay.select_start).view(-1, C)
    table = cache.tables.factor[rec.row].long()
    lm = torch.arange(lay.num_landmarks)
    rebuilt = 0

    def span(chunk: int) -> slice:
        return slice(chunk * C, chunk * C + C)

    for layer in range(cache.num_layers):
        keys = rotated(cache, p.k_pre[layer], 0)
        w_t = cache.w_t[layer][cache.record(0).basis]  # [R, Hkv*D]
        low = (p.k_pre[layer].reshape(PROMPT, -1) @ w_t.T @ w_t).view(PROMPT, HKV, hd)
        low = rotated(cache, low, 0)
        ids = cache.landmark_ids[layer].view(-1, HKV)[table[lm // 16] * 16 + lm % 16]
        outliers = cache.record(0).outlier_ids[layer]
        for h in range(HKV):
            held = cache.k_buf[layer].view(-1, HKV, hd)[rows, h]  # [k, C, D]
            values = cache.v_buf[layer].view(-1, HKV, hd)[rows, h]
            want = sorted(set(range(nc)) - set(ids[:, h].tolist()))
            assert len(want) == lay.outlier_rows // C
            chunks = []
            for slot in range(len(want)):  # which chunk the slot holds: its exact values say
                match = [c for c in want if torch.equal(values[slot], p.v[layer, span(c), h])]
                assert len(match) == 1
                c = match[0]
                chunks.append(c)
                if c in outliers[:, h].tolist():
                    assert torch.equal(held[slot], keys[span(c), h]), "p's exact outlier keys"
                else:
                    rebuilt += 1
                    assert not torch.allclose(held[slot], keys[span(c), h], atol=1e-3)
                    assert_close_verbose(held[slot], low[span(c), h], atol=1e-9, rtol=1e-7,
                                         what="rebuilt")
            assert sorted(chunks) == want
    assert rebuilt > 0, "some landmark chunk of p is exact here: the rebuild is exercised"


def test_mixed_static_batch_of_shared_unshared_and_dense_sequences() -> None:
    """p itself, two sequences from its prefix (different suffixes) and a dense one decode in
    one padded fixed-shape step (the CUDA-graph path's plan); at full rank and a budget that
    selects every landmark each equals dense attention over its own tokens."""
    cache = make_cache(sparse_budget=264)  # 33 chunks: p's every landmark too
    p, prefix = shared_prompt(cache)
    seqs = {0: p}
    for sid, suffix in ((1, 40), (2, 57)):
        seqs[sid] = p[:SHARED] + tokens(cache, suffix, seed=suffix)
        start_shared(cache, sid, prefix, seqs[sid])
        prefill(cache, sid, seqs[sid][SHARED:], SHARED, [suffix])
    seqs[3] = tokens(cache, 50, seed=3)
    cache.add_sequence(3, 50, 4)
    prefill(cache, 3, seqs[3], 0, [50])
    assert cache.record(3).lay.dense and not cache.record(1).lay.dense
    padded_static_steps_equal_dense(cache, seqs, seed=20)


# through a model's layers -------------------------------------------------------------------
def test_through_a_model_greedy_tokens_and_logits_equal_dense() -> None:
    """A random tiny model (float64) prefills p, shares its prefix, and a prompt starting with
    it prefills its suffix in two chunks and decodes greedily: at full rank and full budget the
    same tokens and logits as a dense cache running the prompt from scratch."""
    cpu, dt = torch.device("cpu"), torch.float64
    model = random_model(replace(arch_config("tiny"), vocab_size=96), cpu, dt, seed=1, std=0.08)
    rope = model.rope_tables(MAX_LEN, cpu, dt)

    def cache(cfg):
        return build(model.attention_specs(), cfg, rope, cpu, dt, 4, MAX_LEN, 2**25)

    shadow = cache(ShadowKVConfig(**FULL))
    gen = torch.Generator().manual_seed(0)
    p = torch.randint(3, 96, (PROMPT,), generator=gen).tolist()
    prompt = p[:SHARED] + torch.randint(3, 96, (45,), generator=gen).tolist()

    def forward(sid: int, ids: list[int], start: int, phase: str) -> torch.Tensor:
        pos = torch.arange(start, start + len(ids))
        last = torch.tensor([len(ids) - 1]) if phase == "prefill" else None
        return run_model(model, torch.tensor(ids), pos, rope, shadow, phase, logits_index=last)[0]

    shadow.add_sequence(0, PROMPT, 1)
    shadow.begin_prefill(0, PROMPT, 0)
    forward(0, p, 0, "prefill")
    shadow.end_prefill()
    prefix = shadow.share_prefix(0, PROMPT)
    n = shadow.prefix_start(prefix, len(prompt), 6, None, SHARED)
    assert n == SHARED
    shadow.add_sequence(1, len(prompt), 6, prefix=prefix, prefix_tokens=n)
    assert not shadow.record(1).lay.dense
    for start, end in ((SHARED, SHARED + 20), (SHARED + 20, len(prompt))):
        shadow.begin_prefill(1, end - start, start)
        out = forward(1, prompt[start:end], start, "prefill")
        shadow.end_prefill()
    logits = [out]
    for _ in range(5):
        shadow.begin_decode([1])
        logits.append(forward(1, [int(logits[-1].argmax())], shadow.length(1), "decode"))
        shadow.end_decode()
    got = torch.stack(logits)
    want_tokens, want = greedy_with_logits(model, rope, cache(DenseConfig()), prompt, 5)
    assert got.argmax(-1).tolist() == want_tokens and len(set(want_tokens)) > 1
    assert_close_verbose(got, want, atol=1e-9, rtol=1e-7, what="logits")


# exact prefix keys (``exact_prefix_keys``, on once the engine keeps prefixes) -------------------
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize(
    "knobs,suffix,chunks",
    [({}, 45, [45]), ({}, 45, [20, 25]),
     ({"shared_suffix_tokens": 16}, 120, [50, 70])],  # a segment 1
)
def test_exact_prefix_keys_make_the_suffix_prefill_exact(
    exact: bool, knobs: dict, suffix: int, chunks: list[int]
) -> None:
    """At the default rank (64 of 128 key columns) and a budget of half the landmarks, a
    suffix prefill from a prefix with its key copy equals the unshared prefill of the same
    tokens (and dense attention) to float tolerance: it reads the exact keys p stored, bit for
    bit. Without the copy (the knob off) it attends to rebuilt keys and is not exact."""
    cache = make_cache(
        head_dim=64, rank=None, sparse_budget=264, exact_prefix_keys=exact, **knobs
    )
    cache.will_share_prefixes()
    assert cache.rank == 64 < cache.layout.kv_dim
    p, prefix = shared_prompt(cache, spectrum=True)
    assert (KEYS in prefix.pages) == exact
    toks = p[:SHARED] + tokens(cache, suffix, seed=7, spectrum=True)
    start_shared(cache, 1, prefix, toks, new=3)
    assert bool(cache.record(1).lay.segment_start) == ("shared_suffix_tokens" in knobs)
    cache.add_sequence(2, toks.num, 3)
    shared = prefill(cache, 1, toks[SHARED:], SHARED, chunks)
    whole = prefill(cache, 2, toks, 0, [toks.num])[:, SHARED:]
    if not exact:
        assert rel(shared, whole) > 1e-3, "rebuilt rank-64 keys are not exact"
        return
    chunk_ids = torch.arange(SHARED // C)[:, None].expand(-1, HKV)
    for layer in range(cache.num_layers):  # the copy holds p's post-RoPE keys as prefilled
        stored = cache._stored_keys(layer, prefix.pages[KEYS], chunk_ids).flatten(0, 1)
        assert torch.equal(stored, rotated(cache, p.k_pre[layer, :SHARED], 0))
    assert_close_verbose(shared, whole, atol=1e-9, rtol=1e-7, what="shared vs unshared")
    assert_close_verbose(shared, dense_prefill(cache, toks, SHARED), atol=1e-9, rtol=1e-7,
                         what="shared vs dense")


def test_exact_prefix_keys_fill_the_extra_exact_chunks() -> None:
    """A sequence from a prefix holds the prefix chunks that are not among its landmarks
    exact in its buffer: with the key copy, their keys are p's exact keys (not rebuilt)."""
    cache = make_cache(head_dim=64, rank=None)
    cache.will_share_prefixes()
    p, prefix = shared_prompt(cache, spectrum=True)
    toks = p[:SHARED] + tokens(cache, 40, seed=4, spectrum=True)
    start_shared(cache, 1, prefix, toks)
    rec, hd = cache.record(1), cache.layout.head_dim
    lay = rec.lay
    rows = cache.tables.buffer_rows(rec.row, lay.local_len, lay.select_start).view(-1, C)
    not_outliers = 0
    for layer in range(cache.num_layers):
        keys = rotated(cache, p.k_pre[layer, :SHARED], 0).view(-1, C, HKV, hd)  # [chunks, C, ...]
        outliers = prefix.detail.outlier_ids[layer]
        for h in range(HKV):
            held = cache.k_buf[layer].view(-1, HKV, hd)[rows, h]  # [k, C, D]
            values = cache.v_buf[layer].view(-1, HKV, hd)[rows, h]
            for slot in range(held.shape[0]):
                chunk = next(c for c in range(SHARED // C)
                             if torch.equal(values[slot], p.v[layer, c * C : c * C + C, h]))
                not_outliers += chunk not in outliers[:, h].tolist()
                assert torch.equal(held[slot], keys[chunk, :, h]), (layer, h, slot)
    assert not_outliers > 0, "some exact chunk is a landmark chunk of p: the copy is read"


def run_with_key_copies(exact: bool):
    """p, a sequence from its prefix, one decode step of both; returns the cache, the prefix
    and the memory figures after the prefills and after the step."""
    cache = make_cache(exact_prefix_keys=exact)
    cache.will_share_prefixes()
    p, prefix = shared_prompt(cache)
    toks = p[:SHARED] + tokens(cache, 40, seed=40)
    start_shared(cache, 1, prefix, toks)
    prefill(cache, 1, toks[SHARED:], SHARED, [40])
    before = (cache.memory(), cache.memory(0), cache.memory(1), cache.prefix_memory([prefix]))
    step = tokens(cache, 1, seed=9)
    decode(cache, [0, 1], Tokens(*(t.expand(-1, 2, *t.shape[2:]) for t in step.tensors)))
    after = (cache.memory(), cache.memory(0), cache.memory(1), cache.prefix_memory([prefix]))
    return cache, prefix, before, after


@pytest.mark.parametrize("release_first", [True, False])
def test_key_copies_are_counted_held_by_the_prefix_and_freed(release_first: bool) -> None:
    """p takes key pages for its candidate region's whole pages beside its values (host tier);
    the prefix holds those of its tokens, a sequence from it holds them while it prefills;
    once decoding, neither sequence holds any (host memory as with the knob off), the prefix
    still does (``prefix_memory``), and everything returns when all is freed."""
    cache, prefix, before, after = run_with_key_copies(True)
    _, _, plain_before, plain_after = run_with_key_copies(False)
    page = cache.allocators[KEYS].page_bytes
    assert cache.allocators[KEYS] is cache.allocators[VALUE_POOLS[HOST]], "one host pool"
    num = 35 * C // P  # p's 35 candidate chunks: 2 whole pages (its local window is not kept)
    assert len(prefix.pages[KEYS]) == SHARED // P == num
    assert before[1].host_bytes == plain_before[1].host_bytes + num * page  # p's own copy
    assert before[2].host_bytes == plain_before[2].host_bytes + num * page  # held to prefill
    assert before[0].host_bytes == plain_before[0].host_bytes + num * page  # the same pages
    assert after[:3] == plain_after[:3], "decoding sequences hold no key copy"
    assert KEYS not in cache.record(0).pages and KEYS not in cache.record(1).pages
    held = after[3].host_bytes - plain_after[3].host_bytes
    assert held == before[3].host_bytes - plain_before[3].host_bytes == num * page
    keys = cache.allocators[KEYS]
    assert [keys.refcount(x) for x in prefix.pages[KEYS]] == [1] * num, "the prefix's alone"
    if release_first:
        cache.release_prefix(prefix)
    for sid in (1, 0):
        cache.free_sequence(sid)
    cache.release_prefix(prefix)
    assert all(a.num_used == 0 for a in cache.allocators.values())


def test_a_prefix_released_while_its_sequence_prefills_keeps_the_keys_readable() -> None:
    """The sequence holds the prefix's key pages until it decodes: the prefix evicted after
    its admission changes nothing, even when a new prompt takes every freed page."""
    cache = make_cache(head_dim=64, rank=None, sparse_budget=264)
    cache.will_share_prefixes()
    p, prefix = shared_prompt(cache, spectrum=True)
    toks = p[:SHARED] + tokens(cache, 45, seed=7, spectrum=True)
    start_shared(cache, 1, prefix, toks, new=3)
    cache.release_prefix(prefix)
    cache.free_sequence(0)
    cache.add_sequence(3, PROMPT, 4)
    prefill(cache, 3, tokens(cache, PROMPT, seed=3), 0, [PROMPT])
    shared = prefill(cache, 1, toks[SHARED:], SHARED, [20, 25])
    assert_close_verbose(shared, dense_prefill(cache, toks, SHARED), atol=1e-9, rtol=1e-7,
                         what="after release")


def test_no_key_copy_unless_prefixes_are_kept_and_the_host_tier_has_room() -> None:
    """No copy without ``will_share_prefixes`` (an engine without a prefix store), for values
    in the device tier, for a prompt running dense, or when the host tier has room for the
    values only (best effort: that prompt's prefixes rebuild their keys)."""
    plain = make_cache()
    plain.add_sequence(0, PROMPT, 4)
    assert KEYS not in plain.record(0).pages
    device = make_cache(offload_values=False)
    device.will_share_prefixes()
    device.add_sequence(0, PROMPT, 4)
    assert device.record(0).value_tier == DEVICE and KEYS not in device.record(0).pages
    cache = make_cache()
    cache.will_share_prefixes()
    cache.add_sequence(0, 40, 4)  # under local + outliers + budget: dense
    assert cache.record(0).lay.dense and KEYS not in cache.record(0).pages
    host = cache.allocators[VALUE_POOLS[HOST]]
    values = len(cache.store.layout.pages_for(cdiv(PROMPT, C)) * [0])
    taken = host.alloc(host.num_free - values)  # room for p's values, not its keys
    cache.add_sequence(1, PROMPT, 4)
    assert cache.record(1).value_tier == HOST and KEYS not in cache.record(1).pages
    host.release(taken)
    cache.add_sequence(2, PROMPT, 4)
    assert len(cache.record(2).pages[KEYS]) == 2


def test_fp8_key_copies_are_read_as_stored() -> None:
    """fp8 values: the key copy is stored as values are (e4m3 codes, a scale per token and
    head), so the suffix prefill attends over the prefix's keys and values as the store gives
    them back — at the default rank, with no rebuild."""
    cache = make_cache(head_dim=64, rank=None, sparse_budget=264, value_dtype="fp8")
    cache.will_share_prefixes()
    p, prefix = shared_prompt(cache, spectrum=True)
    toks = p[:SHARED] + tokens(cache, 45, seed=35, spectrum=True)
    start_shared(cache, 1, prefix, toks)
    got = prefill(cache, 1, toks[SHARED:], SHARED, [45])
    want = []
    for layer in range(cache.num_layers):
        k = rotated(cache, toks.k_pre[layer], 0).clone()
        v = toks.v[layer].clone()
        k[:SHARED], v[:SHARED] = fp8_round_trip(k[:SHARED]), fp8_round_trip(v[:SHARED])
        want.append(causal_attention(toks.q[layer, SHARED:], k, v, cache.scale))
    assert_close_verbose(got, torch.stack(want), atol=1e-9, rtol=1e-7, what="fp8 key copy")


# segment 1: a long suffix factorised as its own low-rank segment --------------------------------
SEG = {"shared_suffix_tokens": 16, "sparse_budget": 472}  # a suffix over 16 tokens: segment 1
P_OPTIONS = CacheOptions(sparse_budget=264)  # p's own budget: 33 chunks, every landmark of p


def every_landmark(num_tokens: int) -> CacheOptions:
    """The largest budget a sparse prompt of ``num_tokens`` can have (2 local and 2 outlier
    chunks): at least every landmark of both segments of a sequence with a segment 1."""
    return CacheOptions(sparse_budget=(num_tokens // C - 4) * C)


def segment_prompt(cache: ShadowKVCache, seed: int = 0, spectrum: bool = False):
    """Prefill p (sequence 0, at ``P_OPTIONS``) and share its first ``SHARED`` tokens."""
    p = tokens(cache, PROMPT, seed, spectrum)
    cache.add_sequence(0, PROMPT, 4, P_OPTIONS)
    prefill(cache, 0, p, 0, [PROMPT])
    prefix = cache.share_prefix(0, PROMPT)
    assert prefix is not None and prefix.num_tokens == SHARED
    return p, prefix


def start_segment(
    cache: ShadowKVCache, sid: int, prefix: SharedPrefix, toks: Tokens, new: int = 4,
    options: CacheOptions | None = None,
) -> None:
    """Admit ``sid`` from ``prefix`` with its suffix as segment 1 (every landmark selected
    unless ``options`` says otherwise)."""
    start_shared(cache, sid, prefix, toks, new, options or every_landmark(toks.num))
    lay = cache.record(sid).lay
    assert lay.segment_start == SHARED and lay.suffix_outlier_rows == 2 * C
    shared_exact = (lay.outlier_rows - lay.suffix_outlier_rows) // C
    suffix_landmarks = (toks.num - SHARED) // C - 4
    assert lay.num_landmarks == SHARED // C - shared_exact + suffix_landmarks
    assert lay.local_len == toks.num - SHARED - (suffix_landmarks + 2) * C


def run_segment_vs_dense(cache: ShadowKVCache, suffix: int, chunks: list[int], steps: int = 3):
    """A sequence whose ``suffix`` is segment 1, every landmark selected: (its outputs, dense
    outputs) of its suffix prefill in ``chunks`` and of ``steps`` decode steps."""
    p, prefix = segment_prompt(cache)
    toks = p[:SHARED] + tokens(cache, suffix, seed=suffix)
    start_segment(cache, 1, prefix, toks, steps)
    lay = cache.record(1).lay
    assert lay.num_select == lay.num_landmarks
    got = [prefill(cache, 1, toks[SHARED:], SHARED, chunks)]
    want = [dense_prefill(cache, toks, SHARED)]
    for i in range(steps):
        step = tokens(cache, 1, seed=100 + i)
        got.append(decode(cache, [1], step)[:, 0])
        toks = toks + step
        want.append(dense_prefill(cache, toks, toks.num - 1)[:, 0])
    return got, want


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("suffix,chunks", [(201, [201]), (203, [50, 100, 53]), (185, [1, 183, 1])])
def test_segment1_full_rank_full_budget_equals_dense(
    group: int, suffix: int, chunks: list[int]
) -> None:
    cache = make_cache(group, **SEG)
    got, want = run_segment_vs_dense(cache, suffix, chunks)
    rec = cache.record(1)
    assert rec.pages[BASIS][0] == cache.record(0).basis and len(rec.pages[BASIS]) == 2
    assert cache.tables.seg_starts[rec.row].tolist() == [0, SHARED]
    assert STAGING not in rec.pages and cache.allocators[STAGING].num_used == 0, "released"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_verbose(g, w, atol=1e-9, rtol=1e-7, what=f"prefill/decode step {i}")


@pytest.mark.parametrize("tier", [HOST, DEVICE])
def test_segment1_in_both_value_tiers(tier: int) -> None:
    cache = make_cache(offload_values=tier == HOST, **SEG)
    got, want = run_segment_vs_dense(cache, 195, [95, 100])
    assert cache.record(0).value_tier == tier and cache.record(1).value_tier == tier
    assert cache.allocators[VALUE_POOLS[1 - tier]].num_used == 0
    for g, w in zip(got, want):
        assert_close_verbose(g, w, atol=1e-9, rtol=1e-7, what=f"tier {tier}")


def test_segment1_default_rank_is_close_to_an_unshared_prefill() -> None:
    """Segment 1 in its own basis and segment 0 in p's, both at the default rank, against the
    same tokens prefilled whole (one basis), at a budget of about half the landmarks; errors
    relative to each other and to dense attention."""
    cache = make_cache(head_dim=64, rank=None, dtype=torch.float32, **SEG)
    assert cache.rank == 64 < cache.layout.kv_dim
    p, prefix = segment_prompt(cache, spectrum=True)
    toks = p[:SHARED] + tokens(cache, 190, seed=7, spectrum=True)
    half = CacheOptions(sparse_budget=224)
    start_segment(cache, 1, prefix, toks, new=3, options=half)
    shared = prefill(cache, 1, toks[SHARED:], SHARED, [90, 100])
    cache.add_sequence(2, toks.num, 3, half, staged=True)  # the staging pool is free again
    assert cache.record(1).lay.num_select == cache.record(2).lay.num_select == 28
    whole = prefill(cache, 2, toks, 0, [200, toks.num - 200])[:, SHARED:]
    dense = dense_prefill(cache, toks, SHARED)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    errors = {"prefill": rel(shared, whole), "prefill vs dense": rel(shared, dense)}
    for i in range(3):
        step = tokens(cache, 2, seed=50 + i, spectrum=True)
        step = Tokens(*(t[:, :1].expand(-1, 2, *t.shape[2:]) for t in step.tensors))
        out = decode(cache, [1, 2], step)
        toks = toks + step[0:1]
        want = dense_prefill(cache, toks, toks.num - 1)[:, 0]
        errors[f"decode {i} vs dense (segment 1, unshared)"] = (
            rel(out[:, 0], want), rel(out[:, 1], want)
        )
    print("relative errors:", errors)
    assert errors["prefill"] < 0.05, errors
    for i in range(3):
        seg_err, whole_err = errors[f"decode {i} vs dense (segment 1, unshared)"]
        assert seg_err < max(2 * whole_err, 0.05), errors


def shared_state(cache: ShadowKVCache, prefix: SharedPrefix) -> list[torch.Tensor]:
    """Copies of everything the prefix's factor pages hold, every layer."""
    pages = torch.tensor(prefix.pages[FACTOR])
    pools = [cache.a_pages, cache.landmarks, cache.landmark_ids]
    if cache.landmark_scales is not None:
        pools.append(cache.landmark_scales)
    return [t[pages].clone() for pool in pools for t in pool]


@pytest.mark.parametrize("landmark_dtype", ["auto", "fp8"])
def test_segment1_landmark_copy_page_and_read_only_shared_pages(landmark_dtype: str) -> None:
    """Segment 0's landmarks read through the landmark table equal those of the shared pages
    (the partial last page from the copy page, with its ids and fp8 scales); the suffix's
    follow with ids from ``n/C``; nothing writes the shared pages."""
    cache = make_cache(landmark_dtype=landmark_dtype, **SEG)
    p, prefix = segment_prompt(cache)
    before = shared_state(cache, prefix)
    toks = p[:SHARED] + tokens(cache, 201, seed=1)
    start_segment(cache, 1, prefix, toks)
    prefill(cache, 1, toks[SHARED:], SHARED, [150, 51])
    decode(cache, [1], tokens(cache, 1, seed=2))
    rec = cache.record(1)
    lay, own = rec.lay, rec.pages[FACTOR][SHARED // P :]
    n0 = lay.seg0_landmarks
    assert 0 < n0 % 16, "a partial last page of segment 0's landmarks: the copy is exercised"
    lm_table = cache.tables.landmark[rec.row].long()
    factor = cache.tables.factor[rec.row].long()
    assert lm_table[n0 // 16].item() == own[0] and own[0] not in factor.tolist()
    i = torch.arange(lay.num_landmarks)
    through = lm_table[i // 16] * 16 + i % 16
    in_shared = factor[i[:n0] // 16] * 16 + i[:n0] % 16  # p's pages, read directly
    pools = [cache.landmarks, cache.landmark_ids]
    if cache.landmark_scales is not None:
        pools.append(cache.landmark_scales)
    for pool in pools:
        for t in pool:
            flat = t.view(-1, *t.shape[2:])
            assert torch.equal(flat[through[:n0]], flat[in_shared])
    for t in cache.landmark_ids:
        ids = t.view(-1, HKV)[through]
        assert (ids[:n0] < SHARED // C).all() and (ids[n0:] >= SHARED // C).all()
        assert (ids[1:] > ids[:-1]).all(), "ascending per head"
    after = shared_state(cache, prefix)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "shared pages are read-only"


def pool_use(cache: ShadowKVCache) -> dict[str, int]:
    return {name: a.num_used for name, a in cache.allocators.items()}


@pytest.mark.parametrize("release_first", [True, False])
def test_segment1_pages_held_once_and_all_freed(release_first: bool) -> None:
    cache = make_cache(**SEG)
    p, prefix = segment_prompt(cache)
    toks = p[:SHARED] + tokens(cache, 201, seed=3)
    used = pool_use(cache)
    start_segment(cache, 1, prefix, toks)
    rec, tier = cache.record(1), VALUE_POOLS[HOST]
    own = {name: len(pages) for name, pages in rec.pages.items()}
    shared = SHARED // P
    assert own[FACTOR] == shared + 1 + cdiv(toks.num, P) - shared, "suffix pages + the copy"
    assert own[BASIS] == 2 and own[tier] == cdiv(cdiv(toks.num, C), 16)
    assert own[STAGING] == cdiv(toks.num - SHARED, P) and own[STAGING_GRAM] == 1
    taken = {name: pool_use(cache)[name] - used[name] for name in used}
    assert taken[FACTOR] == own[FACTOR] - shared and taken[tier] == own[tier] - shared
    assert taken[BASIS] == 1
    prefill(cache, 1, toks[SHARED:], SHARED, [201])
    assert STAGING not in rec.pages and pool_use(cache)[STAGING] == 0
    # The total counts the shared pages once; sequence 1's own figure counts them.
    mems = [cache.memory(s) for s in (0, 1)]
    dev, host = memory_parts(cache, {FACTOR: prefix.pages[FACTOR], tier: prefix.pages[tier]})
    total = cache.memory()
    assert total.device_bytes == sum(m.device_bytes for m in mems) - dev
    assert total.host_bytes == sum(m.host_bytes for m in mems) - host
    assert cache.share_prefix(1, toks.num) is None, "a sequence from a prefix shares nothing"
    if release_first:
        cache.release_prefix(prefix)
    for sid in (0, 1):
        cache.free_sequence(sid)
    cache.release_prefix(prefix)
    assert pool_use(cache) == dict.fromkeys(cache.allocators, 0)
    assert cache.tables.seg_starts[rec.row, 1].item() == torch.iinfo(torch.int32).max


@pytest.mark.parametrize("pool", [FACTOR, BASIS, VALUE_POOLS[HOST], STAGING, STAGING_GRAM])
def test_segment1_admission_takes_all_or_nothing(pool: str) -> None:
    """With one pool short of what segment 1 needs, the admission fails naming it and holds
    nothing; with the pool back, it succeeds."""
    cache = make_cache(**SEG)
    p, prefix = segment_prompt(cache)
    toks = p[:SHARED] + tokens(cache, 201, seed=3)
    opts = every_landmark(toks.num)
    n = cache.prefix_start(prefix, toks.num, 4, opts, SHARED)
    assert n == SHARED
    alloc = cache.allocators[pool]
    hog = alloc.alloc(alloc.capacity - alloc.num_used)
    used = pool_use(cache)
    assert not cache.can_add(toks.num, 4, opts, prefix=prefix, prefix_tokens=n)
    with pytest.raises(CacheCapacityError, match=alloc.name):
        cache.add_sequence(1, toks.num, 4, opts, prefix=prefix, prefix_tokens=n)
    assert pool_use(cache) == used and 1 not in cache.seqs
    alloc.release(hog)
    cache.add_sequence(1, toks.num, 4, opts, prefix=prefix, prefix_tokens=n)


def test_segment1_prefix_start() -> None:
    """A suffix over ``shared_suffix_tokens``: segment 1 when it has at least local + outlier
    + 1 = 5 chunks and is no longer than the prefix, else 0; ``shared_suffix_tokens=0`` never
    shares."""
    cache = make_cache(**SEG)
    _, prefix = segment_prompt(cache)
    opts = CacheOptions(sparse_budget=64)

    def start(suffix: int) -> int:
        return cache.prefix_start(prefix, SHARED + suffix, 4, opts, SHARED)

    assert start(16) == SHARED and cache._shared_layout(prefix, SHARED + 16, 4, opts, SHARED)
    assert start(39) == 0 and start(40) == SHARED
    lay = cache._shared_layout(prefix, SHARED + 40, 4, opts, SHARED)
    assert lay is not None and lay.segment_start == SHARED and lay.local_len == 2 * C
    with pytest.raises(ValueError, match="prefix_start"):
        cache.add_sequence(1, SHARED + 39, 4, opts, prefix=prefix, prefix_tokens=SHARED)
    never = make_cache(shared_suffix_tokens=0)
    _, prefix = shared_prompt(never)
    assert never.prefix_start(prefix, SHARED + 40, 4, None, SHARED) == 0
    # A suffix past shared_suffix_tokens and longer than the prefix: from scratch (its prompt
    # can then be shared in turn); as long as the prefix: segment 1.
    assert start(SHARED) == SHARED and start(SHARED + C) == 0


def test_segment1_in_a_padded_static_step_with_p_and_an_exact_suffix() -> None:
    """p, a sequence with a segment 1, one with an exact suffix from the same prefix, and two
    padding entries decode in one fixed-shape step (the CUDA-graph path's plan: widths bucketed,
    the landmark table read at its bucketed width); every landmark selected, full rank: each
    equals dense attention over its own tokens."""
    cache = make_cache(**{**SEG, "shared_suffix_tokens": 40})
    p, prefix = segment_prompt(cache)
    seqs = {0: p, 1: p[:SHARED] + tokens(cache, 201, seed=201)}
    start_segment(cache, 1, prefix, seqs[1])
    prefill(cache, 1, seqs[1][SHARED:], SHARED, [201])
    seqs[2] = p[:SHARED] + tokens(cache, 32, seed=32)
    start_shared(cache, 2, prefix, seqs[2], options=every_landmark(SHARED + 32))
    prefill(cache, 2, seqs[2][SHARED:], SHARED, [32])
    assert not cache.record(2).lay.segment_start and cache.record(2).lay.local_len == 32
    padded_static_steps_equal_dense(cache, seqs, seed=40)


def test_segment1_without_outliers_equals_dense() -> None:
    """``outlier_chunks=0``: no exact copy, no seg-0 exact chunks, no suffix outliers; segment
    1 still has its own basis and landmarks (every landmark selected, full rank)."""
    cache = make_cache(outlier_chunks=0, **SEG)
    p, prefix = segment_prompt(cache)
    toks = p[:SHARED] + tokens(cache, 187, seed=187)
    every = CacheOptions(sparse_budget=(toks.num // C - 2) * C)
    start_shared(cache, 1, prefix, toks, 2, every)
    lay = cache.record(1).lay
    assert lay.segment_start == SHARED and lay.outlier_rows == 0
    assert lay.num_select == lay.num_landmarks == toks.num // C - 2
    got = prefill(cache, 1, toks[SHARED:], SHARED, [87, 100])
    assert_close_verbose(got, dense_prefill(cache, toks, SHARED), atol=1e-9, rtol=1e-7,
                         what="prefill")
    for i in range(2):
        step = tokens(cache, 1, seed=60 + i)
        out = decode(cache, [1], step)[:, 0]
        toks = toks + step
        assert_close_verbose(out, dense_prefill(cache, toks, toks.num - 1)[:, 0], atol=1e-9,
                             rtol=1e-7, what=f"decode {i}")


def padded_static_steps_equal_dense(cache, seqs: dict, seed: int, steps: int = 2) -> None:  # type: ignore[no-untyped-def]
    """Decode every sequence of ``seqs`` (id -> its tokens so far) ``steps`` times in one
    fixed-shape step padded with two padding entries; each output equals dense attention over
    its tokens (float64)."""
    ids = list(seqs)
    for i in range(steps):
        step = tokens(cache, len(ids), seed=seed + i)
        cols, widths = cache.begin_static_decode(ids)
        pad = cache.pad_columns()
        cols = {name: vals + [pad[name]] * 2 for name, vals in cols.items()}
        cache.plan_decode(device_columns(cols, torch.device("cpu")), widths)
        padded = Tokens(*(torch.cat([t, torch.zeros_like(t[:, :2])], 1) for t in step.tensors))
        pos = [cache.length(s) for s in ids] + [0, 0]
        out = torch.stack([
            cache.decode(layer, padded.q[layer],
                         torch.cat([rotated(cache, padded.k_pre[layer, b : b + 1], x)
                                    for b, x in enumerate(pos)]),
                         padded.v[layer], padded.k_pre[layer])
            for layer in range(cache.num_layers)
        ])
        cache.end_decode()
        for b, sid in enumerate(ids):
            seqs[sid] = seqs[sid] + step[b : b + 1]
            want = dense_prefill(cache, seqs[sid], seqs[sid].num - 1)[:, 0]
            assert_close_verbose(out[:, b], want, atol=1e-9, rtol=1e-7, what=f"seq {sid}, step {i}")
