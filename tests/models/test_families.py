"""The families added to the Llama decoder: Phi-3 (fused projections, LongRoPE), GLM and GLM-4
(partial interleaved RoPE, q/k/v bias, GLM-4's sandwich norms), Qwen3 (q/k norms before RoPE) and
Gemma-3 text (sliding and global layers with their own RoPE bases, q/k and sandwich norms,
Gemma's ``1 + weight`` norms, scaled embeddings, tanh GELU, final soft-capping).

Each tiny random checkpoint is saved by transformers and compared with transformers' logits
(prefill, then decode steps one token at a time, as in ``test_parity``); then ShadowKV at full
rank and full budget must give dense's logits (on Gemma-3 it serves the global layers, next to
the sliding layers' window cache).
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_close_verbose, run_model

from shadowkv.cache import LayeredCache, WindowCache, make_cache
from shadowkv.cache.methods import CacheConfig, DenseConfig, ShadowKVConfig
from shadowkv.cache.shadow import ShadowKVCache
from shadowkv.models.llama import LlamaModel
from shadowkv.models.loader import load_model

from .test_parity import ATOL, RTOL, hf_logits, random_ids

CPU = torch.device("cpu")
D = 16  # head dim of the tiny checkpoints
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0 + 0.1 * i for i in range(D // 2)],
    "long_factor": [1.0 + 0.7 * i for i in range(D // 2)],
    "original_max_position_embeddings": 16,
}
GEMMA = dict(
    num_layers=3, sliding_window=8, layer_types=["sliding_attention"] * 2 + ["full_attention"],
    query_pre_attn_scalar=24,
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
    },
)

FAMILIES = [
    pytest.param("phi3", dict(num_heads=6, num_kv_heads=2), id="phi3-G3-fused"),
    pytest.param("phi3", dict(rope_scaling=LONGROPE, max_position=64), id="phi3-longrope-long"),
    # Within the original context the short factors: the engine's table is no longer than it
    # (transformers picks the set per forward; we once, by the engine's length).
    pytest.param("phi3", dict(rope_scaling=LONGROPE, max_position=64, length=16, table=16),
                 id="phi3-longrope-short"),
    pytest.param("phi3", dict(tie=True, partial_rotary_factor=0.75), id="phi3-tied-partial"),
    pytest.param("glm", dict(num_heads=6, num_kv_heads=2), id="glm-G3-partial-interleaved"),
    pytest.param("glm", dict(num_heads=4, num_kv_heads=1, tie=True, attention_bias=False),
                 id="glm-G4-tied-nobias"),
    pytest.param("glm4", dict(num_heads=6, num_kv_heads=2), id="glm4-G3-sandwich"),
    pytest.param("qwen3", dict(num_heads=6, num_kv_heads=2), id="qwen3-G3-qk-norm"),
    pytest.param("qwen3", dict(num_heads=7, num_kv_heads=1, tie=True, attention_bias=True),
                 id="qwen3-G7-tied-bias"),
    pytest.param("gemma3", dict(num_heads=4, num_kv_heads=2, **GEMMA), id="gemma3-G2-window8"),
    pytest.param("gemma3", dict(num_heads=4, num_kv_heads=1, final_logit_softcapping=3.0,
                                **GEMMA), id="gemma3-MQA-softcap"),
]


def hf_config_kwargs(kw: dict) -> tuple[dict, int, int]:
    """The checkpoint's arguments, the test sequence length and the RoPE table length."""
    kw = dict(kw)
    length = kw.pop("length", 37)
    table = kw.pop("table", 40)
    if kw.get("rope_scaling", {}).get("rope_type") == "longrope":
        kw["original_max_position_embeddings"] = 16  # Phi-3 keeps it at the top level
    return kw, length, table


@pytest.mark.parametrize(("family", "kw"), FAMILIES)
def test_family_matches_hf(tiny_checkpoint, family: str, kw: dict) -> None:
    kw, length, table = hf_config_kwargs(kw)
    path = tiny_checkpoint(family, **kw)
    ids = random_ids(length, seed=3)
    expected = hf_logits(path, ids)
    cfg, model = load_model(path, CPU, torch.float32)
    assert cfg.architecture == family
    rope = model.rope_tables(table, CPU)
    got = dense_logits(model, rope, ids, length - 6)
    assert_close_verbose(got, expected, ATOL, RTOL, what=f"{family} logits")


def dense_logits(model: LlamaModel, rope, ids: torch.Tensor, prompt_len: int,
                 cache_cfg: CacheConfig | None = None, caches: list | None = None,
                 memory: int = 2**23) -> torch.Tensor:
    """Logits ``[T, V]``: prefill of ``prompt_len`` tokens, then one decode step per token
    (teacher forcing), through the caches ``make_cache`` builds for the model (appended to
    ``caches``)."""
    cache = make_cache(model.attention_specs(), cache_cfg or DenseConfig(), rope, CPU,
                       torch.float32, 1, rope.max_position, memory)
    if caches is not None:
        caches.append(cache)
    cache.add_sequence(0, prompt_len, len(ids) - prompt_len)
    cache.begin_prefill(0, prompt_len)
    out = [run_model(model, ids[:prompt_len], torch.arange(prompt_len), rope, cache, "prefill")]
    cache.end_prefill()
    for p in range(prompt_len, len(ids)):
        cache.begin_decode([0])
        out.append(run_model(model, ids[p : p + 1], torch.tensor([p]), rope, cache, "decode"))
        cache.end_decode()
    return torch.cat(out)


def test_gemma3_layers_get_window_and_global_caches(tiny_checkpoint) -> None:
    path = tiny_checkpoint("gemma3", num_heads=4, num_kv_heads=2, **GEMMA)
    cfg, model = load_model(path, CPU, torch.float32)
    specs = model.attention_specs()
    assert [s.sliding_window for s in specs] == [8, 8, None]
    assert [s.rope_key for s in specs] == ["local", "local", ""]
    assert specs[0].scale == 24**-0.5
    rope = model.rope_tables(512, CPU)
    assert not torch.equal(rope.cos, rope.table("local").cos), "two RoPE bases"
    cache = make_cache(specs, FULL, rope, CPU, torch.float32, 2, 512, 2**23)
    assert isinstance(cache, LayeredCache)
    window, shadow = cache.parts
    assert isinstance(window, WindowCache) and window.num_layers == 2
    assert isinstance(shadow, ShadowKVCache) and shadow.rope is rope  # the global tables
    # Memory: the window layers hold at most the window per sequence, the global ones it all.
    cache.add_sequence(0, 173, 8)
    cache.begin_prefill(0, 173)
    run_model(model, random_ids(173, seed=5), torch.arange(173), rope, cache, "prefill")
    cache.end_prefill()
    kv = 2 * 2 * D * 4  # K and V of one token of one layer, fp32
    assert window.memory(0).dense_bytes == 2 * 8 * kv
    assert window.memory(0).device_bytes == 2 * 16 * kv  # one 16-row block per layer
    assert cache.memory(0).dense_bytes == 2 * 8 * kv + 173 * kv


PROMPT = 173
# Every landmark chunk selected at full rank: ShadowKV attends like dense.
FULL = ShadowKVConfig(sparse_budget=(PROMPT // 8 - 4 - 2) * 8, outlier_chunks=2, rank=1.0)


@pytest.mark.parametrize(
    ("family", "kw"),
    [
        pytest.param("phi3", dict(rope_scaling=LONGROPE, max_position=64), id="phi3-longrope"),
        pytest.param("glm", dict(num_heads=6, num_kv_heads=2), id="glm-partial-interleaved"),
        pytest.param("qwen3", dict(num_heads=6, num_kv_heads=2), id="qwen3-qk-norm"),
        pytest.param("gemma3", dict(num_heads=4, num_kv_heads=2, **GEMMA), id="gemma3"),
    ],
)
def test_shadowkv_full_rank_full_budget_equals_dense(tiny_checkpoint, family: str, kw: dict):
    kw, _, _ = hf_config_kwargs(kw)
    _, model = load_model(tiny_checkpoint(family, **kw), CPU, torch.float32)
    rope = model.rope_tables(512, CPU)
    ids = random_ids(PROMPT + 6, seed=4)
    dense = dense_logits(model, rope, ids, PROMPT)
    caches: list = []
    shadow = dense_logits(model, rope, ids, PROMPT, FULL, caches)
    rates = caches[0].hit_rate()  # per ShadowKV layer: every chunk selected stays selected
    assert len(rates) == (1 if family == "gemma3" else 2) and all(r == 1.0 for r in rates)
    assert_close_verbose(shadow, dense, atol=1e-4, rtol=1e-4, what=f"{family} shadowkv logits")
