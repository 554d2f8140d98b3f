"""Token-chunked prefill at the cache contract: ``begin_prefill(seq, n, start)`` chunks give the
same logits and tokens as one whole prefill, for every method (and sliding-window layers);
ShadowKV stages a sparse prompt's chunks and factorises it at the last one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from utils import assert_close_verbose, full_budget, greedy_with_logits, run_model
from utils import small_cache_cfg as cache_cfg

from shadowkv.bench.models import arch_config, random_model
from shadowkv.cache import group_cost, make_cache
from shadowkv.cache.base import CacheCapacityError
from shadowkv.cache.methods import DenseConfig, ShadowKVConfig
from shadowkv.cache.shadow_prefill import lowrank_factors
from shadowkv.cache.shadow_staging import STAGING, STAGING_GRAM
from shadowkv.cache.window import sliding_window_attention
from shadowkv.kernels.varlen_attention.reference import causal_attention

CPU = torch.device("cpu")
MAX_LEN = 256
METHODS = ["dense", "shadowkv", "quest", "loki", "streaming", "oracle"]
N = 141  # sparse for every method at small_cache_cfg's 32-token budget


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model():
    cfg = replace(arch_config("tiny"), vocab_size=96)
    return cfg, random_model(cfg, CPU, torch.float32, seed=1, std=0.08)


def cache(model_, method_cfg, dtype=torch.float32):
    cfg, m = model_
    rope = m.rope_tables(MAX_LEN, CPU, dtype)
    return make_cache(m.attention_specs(), method_cfg, rope, CPU, dtype, 2, MAX_LEN, 2**23), rope


@pytest.mark.parametrize("S", [5, 13, 40])
def test_attention_over_earlier_keys_is_the_tail_of_whole_attention(S: int) -> None:
    T = 5
    gen = torch.Generator().manual_seed(S)
    q, k, v = (torch.randn(S, h, 8, generator=gen, dtype=torch.float64) for h in (6, 2, 2))
    assert_close_verbose(causal_attention(q[-T:], k, v, 0.3),
                         causal_attention(q, k, v, 0.3)[-T:], what="lower-right causal")
    assert_close_verbose(sliding_window_attention(q[-T:], k, v, 0.3, 7),
                         sliding_window_attention(q, k, v, 0.3, 7)[-T:], what="windowed")


def test_attention_over_many_earlier_keys_goes_in_row_blocks(monkeypatch) -> None:
    from shadowkv.kernels.varlen_attention import reference

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    want = causal_attention(q[-13:], k, v, 0.3)
    monkeypatch.setattr(reference, "MASK_ELEMENTS", 40 * 3)  # blocks of 3 query rows
    assert_close_verbose(causal_attention(q[-13:], k, v, 0.3), want, what="row blocks")
    assert_close_verbose(want, causal_attention(q, k, v, 0.3)[-13:], what="tail")


def test_gram_summed_by_chunks_gives_the_same_factors() -> None:
    k = torch.randn(100, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gram = sum(c.T @ c for c in k.split(13))
    a, b = lowrank_factors(k, 8), lowrank_factors(k, 8, gram)
    assert_close_verbose(b.a @ b.w_t, a.a @ a.w_t, what="rank-8 keys")


@pytest.mark.parametrize("method", METHODS)
def test_chunked_prefill_equals_whole(model, method: str) -> None:
    c, rope = cache(model, cache_cfg(method))
    m = model[1]
    p = prompt(N)
    want_tokens, want = greedy_with_logits(m, rope, c, p, 6)
    for chunk in (13, 64):
        tokens, got = greedy_with_logits(m, rope, c, p, 6, chunk=chunk)
        assert tokens == want_tokens, (method, chunk)
        assert_close_verbose(got, want, atol=1e-4, rtol=1e-4, what=f"{method} chunk {chunk}")
    assert len(set(want_tokens)) > 1, "a constant output would make the comparison vacuous"


def test_shadowkv_chunked_full_rank_full_budget_equals_dense(model) -> None:
    m = model[1]
    dense, rope = cache(model, DenseConfig(), torch.float64)
    m64 = random_model(model[0], CPU, torch.float64, seed=1, std=0.08)
    full = ShadowKVConfig(sparse_budget=full_budget(N), outlier_chunks=2, rank=1.0)
    shadow, _ = cache(model, full, torch.float64)
    for n in (N, 30):  # 30 tokens: ShadowKV's dense fallback
        p = prompt(n, seed=n)
        want_tokens, want = greedy_with_logits(m64, rope, dense, p, 5)
        tokens, got = greedy_with_logits(m64, rope, shadow, p, 5, chunk=13)
        assert tokens == want_tokens
        assert_close_verbose(got, want, atol=1e-9, rtol=1e-7, what=f"prompt {n}")
    del m


def test_window_layers_chunked_equal_whole() -> None:
    from .test_window import WINDOW, gemma_like

    cfg = gemma_like()
    m = random_model(cfg, CPU, torch.float32, seed=2, std=0.08)
    for method in (DenseConfig(), cache_cfg("shadowkv")):
        c, rope = cache((cfg, m), method)
        p = prompt(90)
        want_tokens, want = greedy_with_logits(m, rope, c, p, 5)
        for chunk in (WINDOW - 1, 13, 8):
            tokens, got = greedy_with_logits(m, rope, c, p, 5, chunk=chunk)
            assert tokens == want_tokens
            assert_close_verbose(got, want, atol=1e-4, rtol=1e-4, what=f"window chunk {chunk}")


def staging_used(c) -> tuple[int, int]:
    """(staging pages, Gram slots) in use."""
    return c.allocators[STAGING].num_used, c.allocators[STAGING_GRAM].num_used


def test_staging_is_reserved_at_admission_counted_and_freed(model) -> None:
    c, rope = cache(model, cache_cfg("shadowkv"))
    m = model[1]
    p = prompt(N)
    pages = c.allocators[STAGING]
    assert pages.capacity * c.page_tokens == MAX_LEN  # default: one max_model_len prompt
    c.add_sequence(6, N, 4)  # prefilled whole: no staging
    held = c.memory(6).device_bytes
    assert staging_used(c) == (0, 0)
    with pytest.raises(ValueError, match="admitted without staging"):
        c.begin_prefill(6, 40, 0)
    c.free_sequence(6)
    c.add_sequence(7, N, 4, staged=True)
    staged = 2 * pages.page_bytes + c.allocators[STAGING_GRAM].page_bytes  # 141 tokens: 2 pages
    assert staging_used(c) == (2, 1)
    assert pages.page_bytes == 128 * 2 * c.layout.kv_dim * 4 * c.num_layers  # fp32 k_pre and v
    assert c.memory(7).device_bytes == held + staged
    c.begin_prefill(7, 40, 0)
    run_model(m, torch.tensor(p[:40]), torch.arange(40), rope, c, "prefill")
    c.end_prefill()
    assert c.memory(7).device_bytes == held + staged  # nothing allocated at the first chunk
    with pytest.raises(ValueError, match="cannot decode"):
        c.begin_decode([7])
    with pytest.raises(ValueError, match="cannot prefill"):
        c.begin_prefill(7, 10, 50)  # chunks go in order
    c.free_sequence(7)  # an abort mid-prefill
    assert staging_used(c) == (0, 0) and c.memory().device_bytes == 0
    c.add_sequence(8, N, 4, staged=True)
    for start in (0, 50, 100):  # the last chunk stores the prompt and frees the staging
        end = min(N, start + 50)
        c.begin_prefill(8, end - start, start)
        run_model(m, torch.tensor(p[start:end]), torch.arange(start, end), rope, c, "prefill")
        c.end_prefill()
    assert staging_used(c) == (0, 0) and c.memory(8).device_bytes == held
    c.begin_decode([8])  # the whole prompt is cached: it decodes


def test_staging_pool_bounds_what_stages(model) -> None:
    """The pool (one 256-token prompt by default) refuses a second staged prompt with a
    capacity error naming it; a prompt longer than the pool could never stage; a dense-fallback
    prompt needs no staging."""
    c, _ = cache(model, cache_cfg("shadowkv"))
    c.add_sequence(0, N, 4, staged=True)
    assert not c.can_add(N, 4, staged=True) and c.can_add(N, 4)
    with pytest.raises(CacheCapacityError, match="ShadowKV staging pages.*staging_tokens"):
        c.add_sequence(1, N, 4, staged=True)
    assert 1 not in c.seqs and staging_used(c) == (2, 1)
    assert c.can_add(30, 4, staged=True)  # 30 tokens run dense: stored as they come
    assert c.can_stage(N, 4)
    small, _ = cache(model, replace(cache_cfg("shadowkv"), staging_tokens=128))
    assert not small.can_stage(N, 4) and small.can_stage(128, 4) and small.can_stage(30, 4)
    off, _ = cache(model, replace(cache_cfg("shadowkv"), staging_tokens=0))
    assert not off.can_stage(N, 4) and off.can_add(N, 4) and off.sizing.staging.nbytes == 0


def test_staging_comes_out_of_the_device_budget(model) -> None:
    """The staging pool is carved from the budget: everything on the device stays within it,
    and the factor and buffer pools shrink by the pool's size (to a page of each)."""
    cfg = cache_cfg("shadowkv")
    budget = 2**23
    with_pool, _ = cache(model, replace(cfg, staging_tokens=MAX_LEN))
    without, _ = cache(model, replace(cfg, staging_tokens=0))

    def pools(c) -> int:  # factor pages and buffer blocks
        sz = c.sizing
        return sz.num_factor_pages * sz.factor_page_bytes + sz.num_blocks * sz.block_bytes

    def device(c) -> int:  # every device byte the sizing hands out
        sz = c.sizing
        fixed = (c.max_num_seqs + 1) * sz.slot_bytes + sz.block_bytes + sz.device_value_bytes
        return fixed + pools(c) + sz.staging.nbytes

    pool = with_pool.sizing.staging.nbytes
    lay = with_pool.layout  # fp32 k_pre and v of MAX_LEN tokens, and Gram slots
    assert without.sizing.staging.nbytes == 0
    assert pool == lay.num_layers * (2 * MAX_LEN * lay.kv_dim * 4 + 2 * lay.kv_dim**2 * 4)
    assert device(with_pool) <= budget and device(without) <= budget
    page = with_pool.sizing.factor_page_bytes + with_pool.sizing.block_bytes
    assert pool - page <= pools(without) - pools(with_pool) <= pool + page
    # A LayeredCache's budget split counts the pool in the group's fixed bytes.
    costs = [group_cost(c.cfg, lay, CPU, 2, MAX_LEN, budget) for c in (with_pool, without)]
    assert costs[0][0] - costs[1][0] == pool and costs[0][1] == costs[1][1]


@pytest.mark.parametrize("family", ["qwen2", "glm4", "qwen3"])
def test_shadowkv_chunked_equals_whole_across_families(tiny_checkpoint, family: str) -> None:
    """Projection biases (Qwen2), interleaved partial rotary (GLM-4) and q/k norms (Qwen3): the
    staged keys are rebuilt as the model rotated them."""
    from shadowkv.models.loader import load_model

    mcfg, m = load_model(tiny_checkpoint(family), CPU, torch.float32)
    c, rope = cache((mcfg, m), cache_cfg("shadowkv"))
    p = prompt(N)
    want_tokens, want = greedy_with_logits(m, rope, c, p, 5)
    tokens, got = greedy_with_logits(m, rope, c, p, 5, chunk=29)
    assert tokens == want_tokens
    assert_close_verbose(got, want, atol=1e-4, rtol=1e-4, what=family)


def test_packed_chunks_of_two_sequences_equal_each_alone() -> None:
    """Two sequences' chunks planned at once and run in one packed forward through
    ``RaggedPrefill`` (``select_prefill`` per segment), on sliding-window and global layers
    (``LayeredCache``): the prefill and the next decode step equal each sequence alone."""
    from shadowkv.engine.ragged import RaggedPrefill, Segment

    from .test_window import gemma_like

    cfg = gemma_like()
    m = random_model(cfg, CPU, torch.float32, seed=2, std=0.08)
    a, b = prompt(90), prompt(37, seed=1)
    for method in (DenseConfig(), cache_cfg("shadowkv")):
        c, rope = cache((cfg, m), method)
        want = [greedy_with_logits(m, rope, c, p, 1)[1] for p in (a, b)]  # [2, V] each
        c.add_sequence(0, 90, 2, staged=True)  # prefilled in chunks
        c.add_sequence(1, 37, 2)
        c.begin_prefill(0, 40, 0)  # a's first chunk alone (ShadowKV stages it)
        run_model(m, torch.tensor(a[:40]), torch.arange(40), rope, c, "prefill")
        c.end_prefill()
        ragged = RaggedPrefill.of(c, [Segment(0, 40, 50, c), Segment(1, 0, 37, c)])
        for s in ragged.segments:
            c.begin_prefill(s.seq_id, s.num_tokens, s.start)
        ids = torch.tensor(a[40:] + b)
        got = run_model(m, ids, ragged.positions(CPU), rope, ragged, "prefill",
                        ragged.last_index(CPU))
        for s in ragged.segments:
            c.end_prefill(s.seq_id)
        c.begin_decode([0, 1])
        step = run_model(m, got.argmax(-1), torch.tensor([90, 37]), rope, c, "decode")
        c.end_decode()
        for i in range(2):
            got_i = torch.stack([got[i], step[i]])
            assert_close_verbose(got_i, want[i], atol=1e-4, rtol=1e-4, what=f"{method} seq {i}")
