"""ShadowKV cache: its invariants on tiny random models, a property test of the slot buffer, and
agreement with dense attention on the real SmolLM2 checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from utils import (
    assert_close_verbose,
    cache_for,
    full_budget,
    greedy_with_logits,
    passkey_prompt,
    read_essays,
    run_model,
)

from shadowkv import LLM, DenseConfig, EngineConfig, SamplingParams, ShadowKVConfig
from shadowkv.cache import CacheCapacityError
from shadowkv.cache.base import CacheOptions
from shadowkv.cache.shadow import ShadowKVCache
from shadowkv.cache.shadow_prefill import lowrank_factors, summarize_chunks
from shadowkv.cache.shadow_tables import BLOCKS, FACTOR, VALUE_POOLS
from shadowkv.cache.store import HOST
from shadowkv.config import ConfigError, ModelConfig
from shadowkv.kernels.rope import apply_rope
from shadowkv.models.loader import load_model

CPU = torch.device("cpu")
MAX_LEN = 512


# low-rank factors ---------------------------------------------------------------------------
def spectrum_keys(T: int, width: int, dtype=torch.float64) -> torch.Tensor:
    """Keys with well separated singular values 2^0 .. 2^-(width-1)*..., so subspaces are unique."""
    gen = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(T, width, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64, generator=gen))
    s = torch.logspace(1, -1, width, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)


def test_full_rank_factors_rebuild_keys_exactly() -> None:
    keys = torch.randn(77, 48, generator=torch.Generator().manual_seed(6))
    f = lowrank_factors(keys, 48)
    assert_close_verbose(f.a @ f.w_t, keys, atol=2e-5, rtol=1e-5, what="A Wᵀ at full rank")


@pytest.mark.parametrize("rank", [1, 7, 20])
def test_truncation_error_is_the_dropped_eigen_energy(rank: int) -> None:
    keys = spectrum_keys(90, 32)
    f = lowrank_factors(keys, rank)
    err = (keys - f.a @ f.w_t).pow(2).sum()
    dropped = f.eigenvalues[rank:].sum()
    assert math.isclose(err.item(), dropped.item(), rel_tol=1e-7), (err.item(), dropped.item())
    # fp32 keys: the same identity up to fp32 Gram accuracy.
    f32 = lowrank_factors(keys.float(), rank)
    err32 = (keys.float() - f32.a @ f32.w_t).double().pow(2).sum()
    assert math.isclose(err32.item(), dropped.item(), rel_tol=2e-3)


def test_gram_route_matches_svd() -> None:
    keys = spectrum_keys(120, 24)
    rank = 9
    f = lowrank_factors(keys, rank)
    _, s, vh = torch.linalg.svd(keys, full_matrices=False)
    assert_close_verbose(f.eigenvalues.sqrt(), s, atol=1e-9, rtol=1e-7, what="singular values")
    proj_gram = f.w_t.T @ f.w_t
    proj_svd = vh[:rank].T @ vh[:rank]
    assert_close_verbose(proj_gram, proj_svd, atol=1e-9, rtol=0, what="top-r subspace projector")


def test_summarize_chunks_picks_worst_chunks_as_outliers() -> None:
    gen = torch.Generator().manual_seed(7)
    T, Hkv, D, C = 8 * 12 + 5, 2, 16, 8
    keys = torch.randn(T, Hkv, D, generator=gen)
    s = summarize_chunks(keys, C, local_chunks=3, outlier_chunks=2)
    assert s.num_candidates == 9
    for h in range(Hkv):
        worst = []
        for c in range(9):
            chunk = keys[c * C : (c + 1) * C, h]
            mean = chunk.mean(0)
            worst.append(min(float(torch.dot(k, mean) / (k.norm() * mean.norm())) for k in chunk))
        want_out = sorted(range(9), key=lambda c: worst[c])[:2]
        assert sorted(s.outlier_ids[:, h].tolist()) == sorted(want_out)
        rest = [c for c in range(9) if c not in want_out]
        assert s.landmark_ids[:, h].tolist() == rest
        for i, c in enumerate(rest):
            assert_close_verbose(
                s.landmarks[i, h], keys[c * C : (c + 1) * C, h].mean(0), what="landmark"
            )


# configuration and admission ---------------------------------------------------------------
def tiny_model_config(num_heads=6, num_kv_heads=2, head_dim=16, num_layers=1) -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=64,
        hidden_size=num_heads * head_dim,
        intermediate_size=64,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )


def make_shadow(
    cfg: ShadowKVConfig,
    mcfg: ModelConfig | None = None,
    max_len: int = MAX_LEN,
    memory: int = 2**24,
    seqs: int = 4,
) -> ShadowKVCache:
    cache, _ = cache_for(mcfg or tiny_model_config(), cfg, max_len, seqs, memory)
    assert isinstance(cache, ShadowKVCache)
    return cache


def test_refuses_settings_where_every_prompt_runs_dense() -> None:
    with pytest.raises(ConfigError, match="every prompt would run dense"):
        make_shadow(ShadowKVConfig(), max_len=1024)  # defaults need 2464 tokens


def test_refuses_rank_wider_than_keys() -> None:
    with pytest.raises(ConfigError, match="exceeds the key width"):
        make_shadow(ShadowKVConfig(sparse_budget=32, outlier_chunks=2, rank=40))


def test_refuses_device_budget_below_per_sequence_state() -> None:
    with pytest.raises(ConfigError, match="cache_memory_gb"):
        make_shadow(ShadowKVConfig(sparse_budget=32, outlier_chunks=2), memory=1024)


def test_admission_checks_host_store_and_frees_pages() -> None:
    cfg = ShadowKVConfig(sparse_budget=32, outlier_chunks=2, host_memory_gb=5e-5)
    cache = make_shadow(cfg)  # 53 KB of host store: three 16 KiB pages, one the null page
    assert cache.can_add(200, 8) and cache.seqs == {}
    cache.add_sequence(0, 200, 8)
    assert not cache.can_add(200, 8)
    with pytest.raises(CacheCapacityError, match="host_memory_gb"):
        cache.add_sequence(1, 200, 8)
    assert cache.can_add(60, 8), "a prompt short enough to run dense needs no host store"
    host, factor = cache.allocators[VALUE_POOLS[HOST]], cache.allocators[FACTOR]
    free = (factor.num_free, host.num_free)
    cache.free_sequence(0)
    assert cache.can_add(200, 8)
    assert host.num_free == free[1] + 2 and factor.num_free == free[0] + 2


def test_fits_empty_judges_the_empty_pools_not_the_busy_ones() -> None:
    cfg = ShadowKVConfig(sparse_budget=32, outlier_chunks=2, host_memory_gb=5e-5)
    cache = make_shadow(cfg)  # two usable store pages of 16 chunks (256 tokens)
    cache.add_sequence(0, 200, 8)
    assert not cache.can_add(200, 8) and cache.fits_empty(200, 8), "busy now, fits once empty"
    assert not cache.fits_empty(400, 8), "needs more store pages than the store has"
    assert cache.fits_empty(60, 8), "dense fallback needs no store pages"
    assert not cache.fits_empty(MAX_LEN + 1, 8)


def test_request_options_plan_the_sequence() -> None:
    cache = make_shadow(ShadowKVConfig(sparse_budget=32, outlier_chunks=2))
    cache.add_sequence(0, 200, 8, CacheOptions(exact=True))
    cache.add_sequence(1, 200, 8, CacheOptions(sparse_budget=16))
    cache.add_sequence(2, 200, 8, CacheOptions(sparse_budget=400))  # capped at the engine's
    lays = [cache.record(s).lay for s in range(3)]
    assert lays[0].dense and lays[0].buffer_rows == 208 and cache.memory(0).host_bytes == 0
    assert (lays[1].num_select, lays[2].num_select) == (2, 4)
    assert cache.seqs[0].options.exact and cache.seqs[1].options.sparse_budget == 16
    cache.free_sequence(0)
    assert 0 not in cache.seqs


def test_store_allocation_failure_refuses_admission_not_startup() -> None:
    cfg = ShadowKVConfig(sparse_budget=32, outlier_chunks=2, host_memory_gb=1e6)
    cache = make_shadow(cfg)  # a petabyte store: allocated lazily, so construction succeeds
    # No device tier to hand over to (CPU): the tier is turned off, with a warning, and refused.
    with pytest.warns(RuntimeWarning, match="without the host value tier"), pytest.raises(
        CacheCapacityError, match="host_memory_gb lower"
    ):
        cache.add_sequence(0, 200, 8)
    blocks = cache.allocators[BLOCKS]
    assert not cache.seqs and blocks.num_free == blocks.capacity
    assert cache.store.tiers[0].pages.capacity == 0
    cache.add_sequence(1, 60, 8)  # dense fallback needs no store


def test_memory_accounting_is_honest() -> None:
    mcfg = tiny_model_config(num_layers=2)
    cfg = ShadowKVConfig(sparse_budget=32, outlier_chunks=2, rank=8)
    cache = make_shadow(cfg, mcfg)
    T, new = 300, 20
    cache.add_sequence(7, T, new)
    cache.seqs[7].length = T
    L, Hkv, D, C, R = 2, 2, 16, 8, 8
    lay = cache.record(7).lay
    assert (lay.local_len, lay.num_select, lay.num_landmarks) == (32 + 4, 4, 37 - 4 - 2)
    rows = lay.local_len + 2 * C + 4 * C + new
    device = L * (
        math.ceil(T / 128) * (128 * R * 4 + 16 * Hkv * (D * 4 + 4))  # A rows + landmarks + ids
        + math.ceil(rows / 16) * 16 * 2 * Hkv * D * 4  # K and V buffer blocks
        + R * Hkv * D * 4
        + Hkv * cache.max_slots * 4  # Wᵀ + slot ids
    )
    host = L * math.ceil(math.ceil(T / C) / 16) * 16 * Hkv * C * D * 4
    mem = cache.memory(7)
    assert (mem.device_bytes, mem.host_bytes, mem.dense_bytes) == (
        device,
        host,
        2 * L * T * Hkv * D * 4,
    )
    assert cache.memory() == mem


# exactness against dense on tiny models ------------------------------------------------------
FAMILIES = [
    pytest.param("llama", {"num_heads": 6, "num_kv_heads": 2, "head_dim": 16}, id="llama-G3"),
    pytest.param("qwen2", {"num_heads": 4, "num_kv_heads": 4, "head_dim": 16}, id="qwen2-bias-G1"),
    pytest.param("mistral", {"num_heads": 7, "num_kv_heads": 1, "head_dim": 32}, id="mistral-G7"),
]


@pytest.mark.parametrize("family,shape", FAMILIES)
def test_full_budget_full_rank_equals_dense(tiny_checkpoint, family, shape) -> None:
    mcfg, model = load_model(tiny_checkpoint(family, **shape), CPU, torch.float32)
    dense, rope = cache_for(mcfg, DenseConfig(), MAX_LEN, 2)
    for n in (141, 50):  # 50 tokens fall back to dense for this budget
        cfg = ShadowKVConfig(sparse_budget=full_budget(141), outlier_chunks=2, rank=1.0
        )
        shadow, _ = cache_for(mcfg, cfg, MAX_LEN, 2)
        prompt = torch.randint(
            3, mcfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)
        ).tolist()
        want_tokens, want = greedy_with_logits(model, rope, dense, prompt, 10)
        shadow.add_sequence(99, n, 1)
        assert shadow.record(99).lay.dense == (n == 50)
        shadow.free_sequence(99)
        got_tokens, got = greedy_with_logits(model, rope, shadow, prompt, 10)
        assert got_tokens == want_tokens
        assert_close_verbose(got, want, atol=2e-5, rtol=1e-4, what=f"{family} logits, prompt {n}")
        if n == 141:
            assert all(r == 1.0 for r in shadow.hit_rate()), (
                "full budget: every chunk stays selected"
            )


def test_generation_has_no_fixed_cap_and_overruns_raise(tiny_checkpoint) -> None:
    mcfg, model = load_model(
        tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16), CPU, torch.float32
    )
    dense, rope = cache_for(mcfg, DenseConfig(), MAX_LEN, 1)
    cfg = ShadowKVConfig(sparse_budget=full_budget(97), outlier_chunks=2, rank=1.0)
    shadow, _ = cache_for(mcfg, cfg, MAX_LEN, 1)
    prompt = torch.randint(
        3, mcfg.vocab_size, (97,), generator=torch.Generator().manual_seed(9)
    ).tolist()
    # 150 generated tokens: past the 65-128 slots after which the reference code drops K/V.
    want_tokens, want = greedy_with_logits(model, rope, dense, prompt, 150)
    got_tokens, got = greedy_with_logits(model, rope, shadow, prompt, 150)
    assert got_tokens == want_tokens
    assert_close_verbose(got, want, atol=1e-4, rtol=1e-4, what="logits over 150 generated tokens")
    shadow.add_sequence(0, 97, 2)
    shadow.begin_prefill(0, 97)
    run_model(model, torch.tensor(prompt), torch.arange(97), rope, shadow, "prefill")
    shadow.end_prefill()
    for _ in range(2):
        shadow.begin_decode([0])
        pos = torch.tensor([shadow.length(0)])
        run_model(model, torch.tensor([5]), pos, rope, shadow, "decode")
        shadow.end_decode()
    with pytest.raises(CacheCapacityError, match="reserved at admission"):
        shadow.begin_decode([0])


def test_ragged_batch_matches_each_sequence_alone(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16)
    cfg = ShadowKVConfig(sparse_budget=32, outlier_chunks=2, rank=0.5)
    llm = LLM(
        str(path),
        cache=cfg,
        engine=EngineConfig(max_num_seqs=3, max_model_len=MAX_LEN),
        device="cpu",
    )
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (173, 61, 250)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (14, 9, 12)]
    batched = llm.generate(prompts, params)
    cache = llm.engine.cache
    assert isinstance(cache, ShadowKVCache) and not cache.seqs, (
        "finished sequences free their slots"
    )
    alone = [llm.generate(p, q)[0] for p, q in zip(prompts, params)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert (
        batched[0].cache_memory["host_bytes"] > 0 and batched[1].cache_memory["host_bytes"] == 0
    )  # 61: dense
    rates = cache.hit_rate()
    assert len(rates) == 2 and all(0 < r < 1 for r in rates), rates


# property: the slot buffer always holds exactly the selected chunks -----------------------------
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(40, 230), min_size=1, max_size=3),
    seeds=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=5),
    budget=st.sampled_from([8, 24, 40]),
)
def test_slot_buffer_holds_exactly_the_selected_chunks(lengths, seeds, budget) -> None:
    C, Hkv, D, G = 8, 2, 16, 3
    mcfg = tiny_model_config(num_heads=Hkv * G, num_kv_heads=Hkv, head_dim=D)
    cfg = ShadowKVConfig(sparse_budget=budget, outlier_chunks=2, local_chunks=2, rank=1.0)
    cache = make_shadow(cfg, mcfg)
    rope = cache.rope

    def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rope.rows(positions)
        return apply_rope(x[:, :1], x, cos, sin)[1]

    gen = torch.Generator().manual_seed(seeds[0])
    truth = {}
    for sid, n in enumerate(lengths):
        k_pre = torch.randn(n, Hkv, D, generator=gen)
        k, v = rotate(k_pre, torch.arange(n)), torch.randn(n, Hkv, D, generator=gen)
        cache.add_sequence(sid, n, len(seeds))
        cache.begin_prefill(sid, n)
        cache.prefill(0, torch.randn(n, Hkv * G, D, generator=gen), k, v, k_pre)
        cache.end_prefill()
        truth[sid] = (k, v)
    seqs = list(truth)
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        q = 3 * torch.randn(len(seqs), Hkv * G, D, generator=g)
        kv = torch.randn(len(seqs), Hkv, D, generator=g)
        cache.begin_decode(seqs)
        positions = torch.tensor([cache.length(s) for s in seqs])
        cache.decode(0, q, rotate(kv, positions), kv, kv)
        cache.end_decode()
        for b, sid in enumerate(seqs):
            lay = cache.record(sid).lay
            if lay.dense:
                continue
            k, v = truth[sid]
            row = cache.record(sid).row
            slots = cache.selection[0][row, :, : lay.num_select].long()  # [Hkv, K]
            table = cache.tables.factor[row].long()
            n = torch.arange(lay.num_landmarks)
            flat = table[n // 16] * 16 + n % 16
            lms = cache.landmarks[0].view(-1, Hkv, D)[flat].double()  # [N, Hkv, D]
            ids = cache.landmark_ids[0].view(-1, Hkv)[flat]
            # Expected selection from the stored landmarks, in float64.
            logits = torch.einsum("hgd,nhd->hgn", q[b].double().view(Hkv, G, D), lms) / math.sqrt(D)
            top = logits.softmax(-1).amax(1).topk(lay.num_select).indices  # [Hkv, K]
            for h in range(Hkv):
                assert set(slots[h].tolist()) == set(ids[top[h], h].tolist())
            end = lay.select_start + lay.num_select * C
            rows = cache.tables.buffer_rows(row, lay.select_start, end).view(-1, C)  # [K, C]
            got_k = cache.k_buf[0].view(-1, Hkv, D)[rows].permute(2, 0, 1, 3)  # [Hkv, K, C, D]
            got_v = cache.v_buf[0].view(-1, Hkv, D)[rows].permute(2, 0, 1, 3)
            tok = slots[..., None] * C + torch.arange(C)  # [Hkv, K, C]
            heads = torch.arange(Hkv)[:, None, None]
            assert_close_verbose(got_k, k[tok, heads], atol=1e-4, rtol=1e-4, what="selected keys")
            assert torch.equal(got_v, v[tok, heads]), "selected values"


# the real model ------------------------------------------------------------------------------
def test_smollm2_full_budget_matches_dense(smollm2, smollm2_dir, pg_essays) -> None:
    prompt = smollm2.encode(passkey_prompt(read_essays(pg_essays), smollm2.tokenizer, 1000))
    n = len(prompt)
    cfg = ShadowKVConfig(sparse_budget=full_budget(n, outliers=8), outlier_chunks=8, rank=1.0)
    shadow = LLM(str(smollm2_dir), cache=cfg, device="cpu")
    dense_engine, shadow_engine = smollm2.engine, shadow.engine
    want_tokens, want = greedy_with_logits(
        dense_engine.model, dense_engine.rope, dense_engine.cache, prompt, 15
    )
    got_tokens, got = greedy_with_logits(
        shadow_engine.model, shadow_engine.rope, shadow_engine.cache, prompt, 15
    )
    assert shadow_engine.cache.rank == 192
    assert got_tokens == want_tokens
    assert_close_verbose(
        got[:2], want[:2], atol=2e-3, rtol=1e-3, what="prefill and first decode logits"
    )
