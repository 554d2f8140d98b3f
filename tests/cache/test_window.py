"""Sliding-window layers' ring cache (``cache/window.py``): exact windowed attention in prefill
and decode, batched with unequal lengths, in the fixed-shape step, and through prompt replay."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from utils import assert_close_verbose, run_model

from shadowkv.bench.harness import build_engine
from shadowkv.bench.models import arch_config, random_model
from shadowkv.cache import LayeredCache, WindowCache, make_cache
from shadowkv.cache.base import CacheOptions
from shadowkv.cache.methods import DenseConfig, ShadowKVConfig
from shadowkv.cache.window import sliding_window_attention
from shadowkv.config import EngineConfig
from shadowkv.engine.sampling import SamplingParams

CPU = torch.device("cpu")
WINDOW = 12


def masked_reference(q, k, v, scale: float, window: int) -> torch.Tensor:
    """fp64 attention with the full ``[T, T]`` sliding mask, as transformers builds it."""
    T, H, _ = q.shape
    G = H // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    scores = torch.einsum("thd,shd->hts", q.double(), k) * scale
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = scores.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


@pytest.mark.parametrize("T", [5, 12, 13, 50], ids=lambda t: f"T{t}")
def test_sliding_window_attention_matches_the_masked_reference(T: int) -> None:
    q, k, v = torch.randn(T, 6, 8), torch.randn(T, 2, 8), torch.randn(T, 2, 8)
    got = sliding_window_attention(q, k, v, 0.3, WINDOW)
    assert_close_verbose(got.double(), masked_reference(q, k, v, 0.3, WINDOW), atol=1e-5,
                         rtol=1e-5, what="windowed attention")


def gemma_like(num_layers: int = 3):
    tiny = arch_config("tiny")
    return replace(
        tiny, architecture="gemma3", num_layers=num_layers, sliding_window=WINDOW,
        layer_types=("sliding_attention",) * (num_layers - 1) + ("full_attention",),
        local_rope=replace(tiny.rope, theta=100.0), qk_norm=True, sandwich_norms=True,
        hidden_act="gelu_tanh", embed_scale=8.0,
    )


PROMPTS = [[(7 * i) % 90 + 3 for i in range(173)], [(11 * i) % 90 + 3 for i in range(9)]]
FULL = ShadowKVConfig(sparse_budget=(173 // 8 - 4 - 2) * 8, outlier_chunks=2, rank=1.0)


def generate(model, cfg, cache_cfg, mode: str, replay: bool = False) -> list[list[int]]:
    engine = build_engine(model, cfg, cache_cfg,
                          EngineConfig(max_num_seqs=2, max_model_len=512, cache_memory_gb=0.02,
                                       decode_mode=mode),
                          CPU, torch.float32)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    kv = None
    if replay:  # record each prompt's K/V once, then store them without running the model
        rec = [engine.add_request(p, SamplingParams(max_tokens=1), record_prompt_kv=True)
               for p in PROMPTS]
        while engine.has_unfinished():
            engine.step()
        kv = [r.prompt_kv for r in rec]
    reqs = [engine.add_request(p, params, prompt_kv=None if kv is None else kv[i])
            for i, p in enumerate(PROMPTS)]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs]


def test_window_layers_decode_alike_in_every_mode_and_method() -> None:
    """A 173-token and a 9-token prompt (past and within the 12-token window) decoded as one
    batch: the fixed-shape step, a recorded prefill replayed, and ShadowKV at full budget on the
    global layer all give the eager dense tokens."""
    cfg = gemma_like()
    model = random_model(cfg, CPU, torch.float32, seed=2, std=0.08)
    want = generate(model, cfg, DenseConfig(), "eager")
    assert generate(model, cfg, DenseConfig(), "static") == want
    assert generate(model, cfg, DenseConfig(), "eager", replay=True) == want
    assert generate(model, cfg, FULL, "static") == want
    # The window matters to these prompts: without it (every layer global) the logits change.
    plain = replace(cfg, sliding_window=None, layer_types=(), local_rope=None)
    ids = torch.tensor(PROMPTS[0])
    windowed = last_logits(model, cfg, ids)
    assert (last_logits(random_model(plain, CPU, torch.float32, seed=2, std=0.08), plain, ids)
            - windowed).abs().max() > 1e-3


def last_logits(model, cfg, ids: torch.Tensor) -> torch.Tensor:
    rope = model.rope_tables(512, CPU)
    cache = make_cache(model.attention_specs(), DenseConfig(), rope, CPU, torch.float32, 1, 512,
                       2**22)
    cache.add_sequence(0, len(ids), 1)
    cache.begin_prefill(0, len(ids))
    return run_model(model, ids, torch.arange(len(ids)), rope, cache, "prefill")[-1]


def test_ring_holds_the_window_and_takes_any_request_option() -> None:
    cfg = gemma_like()
    model = random_model(cfg, CPU, torch.float32)
    rope = model.rope_tables(512, CPU)
    cache = make_cache(model.attention_specs(), FULL, rope, CPU, torch.float32, 2, 512, 2**22)
    assert isinstance(cache, LayeredCache)
    ring = cache.parts[0]
    assert isinstance(ring, WindowCache) and ring.num_layers == 2
    cache.check_options(CacheOptions(sparse_budget=64))  # the window part accepts it
    cache.add_sequence(0, 400, 50)
    assert len(ring.seqs[0].pages["blocks"]) == 1  # 12 rows fit one 16-row block
    cache.free_sequence(0)
    assert ring.blocks.num_used == 0


@pytest.mark.parametrize(
    "method",
    [DenseConfig(), ShadowKVConfig(sparse_budget=64, outlier_chunks=2, local_chunks=2)],
    ids=["dense", "shadowkv"],
)
def test_budget_split_lets_window_and_global_layers_hold_alike_batches(method) -> None:
    """5 sliding layers and 1 global one: the budget is split by what a full-context sequence
    costs each group under the method, so neither group caps the batch far below the other
    (ShadowKV's global layer costs far less per sequence than dense's)."""
    from shadowkv.bench.harness import max_batch

    # Keys of 256 columns at rank 64: ShadowKV's global layer costs ~1/6 of dense's.
    cfg = replace(gemma_like(num_layers=6), num_kv_heads=4, head_dim=64)
    model = random_model(cfg, CPU, torch.float32)
    rope = model.rope_tables(2048, CPU)
    cache = make_cache(model.attention_specs(), method, rope, CPU, torch.float32, 128, 2048,
                       2**26)
    window, glob = cache.parts
    assert isinstance(window, WindowCache) and window.num_layers == 5
    # The sequence the split plans for: a full context less a 512-token answer.
    a, b = (max_batch(part, 1536, 500, 128) for part in (window, glob))
    assert 4 <= min(a, b) and max(a, b) <= 1.25 * min(a, b), (a, b)
    assert max_batch(cache, 1536, 500, 128) == min(a, b)
