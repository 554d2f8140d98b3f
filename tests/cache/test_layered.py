"""The model/cache contract: per-layer specs, caches per group of alike layers, partial and
interleaved rotary end to end, and a cache package that knows nothing of the model."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from utils import assert_close_verbose, run_model

from shadowkv.bench.harness import build_engine
from shadowkv.bench.models import random_model
from shadowkv.cache import CacheCapacityError, LayeredCache, WindowCache, build_cache, make_cache
from shadowkv.cache.dense import DenseCache
from shadowkv.cache.layout import AttentionSpec, KVLayout
from shadowkv.cache.methods import DenseConfig, ShadowKVConfig
from shadowkv.cache.shadow import ShadowKVCache
from shadowkv.config import ModelConfig, RopeConfig
from shadowkv.engine.decode_runner import DecodeRunner
from shadowkv.engine.sampling import SamplingParams

CPU = torch.device("cpu")
MAX_LEN = 512
PROMPTS = [[(k * i) % 90 + 3 for i in range(n)] for k, n in ((7, 173), (11, 141))]
# Every landmark chunk of the longer prompt selected and exact keys (the shorter one runs dense
# under this budget): ShadowKV attends like dense.
FULL = ShadowKVConfig(sparse_budget=(173 // 8 - 4 - 2) * 8, outlier_chunks=2, rank=1.0)


def tiny(**kw) -> ModelConfig:
    base = dict(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=96,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32)
    return ModelConfig(**{**base, **kw})


def test_the_cache_package_imports_nothing_from_models() -> None:
    root = Path(__file__).resolve().parents[2] / "shadowkv" / "cache"
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                assert not name.startswith("shadowkv.models"), f"{path.name} imports {name}"


def test_alike_layers_share_one_cache_and_others_get_their_own() -> None:
    spec = AttentionSpec(4, 2, 32, 32**-0.5, 32)
    other = replace(spec, num_kv_heads=1)  # e.g. a layer with fewer KV heads
    one = make_cache([spec] * 3, DenseConfig(), None, CPU, torch.float32, 2, MAX_LEN, 2**22)
    assert isinstance(one, DenseCache) and one.num_layers == 3
    two = make_cache(
        [spec, other, spec], DenseConfig(), None, CPU, torch.float32, 2, MAX_LEN, 2**22
    )
    assert isinstance(two, LayeredCache) and two.num_layers == 3
    a, b = two.parts
    assert (a.num_layers, b.num_layers) == (2, 1) and b.layout.num_kv_heads == 1
    # The budget is split by KV bytes (4/5 to the two 2-head layers), so every group holds the
    # same number of tokens.
    assert abs(a.blocks.num_pages - b.blocks.num_pages) <= 1
    # Windowed layers get a window cache whatever the method; a window as long as the context
    # is none.
    for method in (DenseConfig(), FULL):
        windowed = make_cache([replace(spec, sliding_window=64)] * 2, method, None, CPU,
                              torch.float32, 2, MAX_LEN, 2**22)
        assert isinstance(windowed, WindowCache) and windowed.window == 64
    whole = make_cache([replace(spec, sliding_window=MAX_LEN)] * 2, DenseConfig(), None, CPU,
                       torch.float32, 2, MAX_LEN, 2**22)
    assert type(whole) is DenseCache and whole.layout.spec.sliding_window is None


def layered(model, rope, cfg_by_layer) -> LayeredCache:
    spec = model.attention_specs()[0]
    parts = []
    for layer, cfg in enumerate(cfg_by_layer):
        cache = build_cache(cfg, KVLayout(spec, 1, torch.float32), rope, CPU, 2, MAX_LEN, 2**22)
        parts.append((cache, [layer]))
    return LayeredCache(parts)


def greedy(
    model, rope, cache, runner: DecodeRunner | None, steps: int = 8, logits_out: list | None = None
) -> list[list[int]]:
    """Greedy tokens of ``PROMPTS`` decoded as one batch; each step's logits go to
    ``logits_out``."""
    out = []
    for sid, ids in enumerate(PROMPTS):
        n = len(ids)
        cache.add_sequence(sid, n, steps)
        cache.begin_prefill(sid, n)
        logits = run_model(model, torch.tensor(ids), torch.arange(n), rope, cache, "prefill",
                           torch.tensor([n - 1]))
        cache.end_prefill()
        out.append([int(logits.argmax())])
    seqs = list(range(len(PROMPTS)))
    for _ in range(steps - 1):
        tokens = [o[-1] for o in out]
        positions = [cache.length(s) for s in seqs]
        if runner is None:
            cache.begin_decode(seqs)
            logits = run_model(model, torch.tensor(tokens), torch.tensor(positions), rope, cache,
                               "decode")
        else:
            logits = runner.step(seqs, tokens, positions)
        cache.end_decode()
        if logits_out is not None:
            logits_out.append(logits)
        for o, t in zip(out, logits.argmax(-1).tolist()):
            o.append(t)
    for s in seqs:
        cache.free_sequence(s)
    return out


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_a_layer_per_cache_decodes_like_one_dense_cache(mode: str) -> None:
    """Layer 0 dense, layer 1 ShadowKV at full budget and rank: the tokens of one dense cache,
    eagerly and in the fixed-shape step (each part's columns under its own prefix)."""
    cfg = tiny()
    model = random_model(cfg, CPU, torch.float32, seed=3, std=0.08)
    rope = model.rope_tables(MAX_LEN, CPU)
    dense = make_cache(model.attention_specs(), DenseConfig(), rope, CPU, torch.float32, 2,
                       MAX_LEN, 2**22)
    want = greedy(model, rope, dense, None)
    mixed = layered(model, rope, [DenseConfig(), FULL])
    assert isinstance(mixed.parts[1], ShadowKVCache)
    runner = DecodeRunner(model, rope, mixed, CPU, 2, mode)  # type: ignore[arg-type]
    assert runner.mode == mode
    assert greedy(model, rope, mixed, runner) == want
    assert all(r == 1.0 for r in mixed.parts[1].hit_rate()), "full budget keeps every chunk"


def test_layered_admission_is_all_or_nothing() -> None:
    cfg = tiny()
    model = random_model(cfg, CPU, torch.float32)
    rope = model.rope_tables(MAX_LEN, CPU)
    spec = model.attention_specs()[0]
    layout = KVLayout(spec, 1, torch.float32)
    block = 2 * 16 * spec.kv_dim * 4  # K and V of 16 tokens
    small = build_cache(DenseConfig(), layout, rope, CPU, 2, MAX_LEN, 21 * block)  # 20 blocks
    big = build_cache(DenseConfig(), layout, rope, CPU, 2, MAX_LEN, 2**22)
    both = LayeredCache([(big, [0]), (small, [1])])
    assert both.can_add(300, 8) and not both.can_add(400, 8)
    with pytest.raises(CacheCapacityError, match="cache blocks"):
        both.add_sequence(0, 400, 8)
    assert not big.seqs and big.blocks.num_used == 0, "the part that admitted gave it back"


@pytest.mark.parametrize(
    "rope_kw",
    [
        pytest.param(dict(rope=RopeConfig(partial_rotary_factor=0.5)), id="partial-neox"),
        pytest.param(dict(rope_style="interleaved"), id="interleaved"),
        pytest.param(dict(rope=RopeConfig(partial_rotary_factor=0.25), rope_style="interleaved"),
                     id="partial-interleaved"),
    ],
)
def test_shadowkv_full_rank_full_budget_equals_dense_for_other_rotaries(rope_kw: dict) -> None:
    """The low-rank keys are rebuilt with the model's own rotation (dims and pairing) at their
    original positions: exact at full rank and budget (logits), and through the engine."""
    cfg = tiny(**rope_kw)
    model = random_model(cfg, CPU, torch.float32, seed=1, std=0.08)
    spec = model.attention_specs()[0]
    assert spec.rotary_dims == int(32 * cfg.rope.partial_rotary_factor)
    assert spec.rope_style == cfg.rope_style
    rope = model.rope_tables(MAX_LEN, CPU)
    logits = {}
    for name, cache_cfg in (("dense", DenseConfig()), ("shadowkv", FULL)):
        cache = make_cache(model.attention_specs(), cache_cfg, rope, CPU, torch.float32, 2,
                           MAX_LEN, 2**22)
        logits[name] = []
        greedy(model, rope, cache, None, logits_out=logits[name])
    assert_close_verbose(torch.stack(logits["shadowkv"]), torch.stack(logits["dense"]),
                         atol=1e-4, rtol=1e-4, what="decode logits")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    tokens = {}
    for name, cache_cfg in (("dense", DenseConfig()), ("shadowkv", FULL)):
        engine = build_engine(model, cfg, cache_cfg, engine_config(), CPU, torch.float32)
        reqs = [engine.add_request(p, params) for p in PROMPTS]
        while engine.has_unfinished():
            engine.step()
        tokens[name] = [r.output_ids for r in reqs]
    assert tokens["shadowkv"] == tokens["dense"]


def test_partial_rotary_leaves_the_other_dims_unrotated() -> None:
    cfg = tiny(rope=RopeConfig(partial_rotary_factor=0.5))
    model = random_model(cfg, CPU, torch.float32)
    rope = model.rope_tables(64, CPU)
    assert rope.rotary_dims == 16
    x = torch.randn(5, 4, 32)
    cos, sin = rope.rows(torch.arange(5) + 7)
    from shadowkv.kernels.rope import apply_rope

    q, _ = apply_rope(x, x[:, :2], cos, sin, rope.style)
    assert torch.equal(q[..., 16:], x[..., 16:])
    assert_close_verbose(q[..., :16].norm(dim=-1), x[..., :16].norm(dim=-1))


def engine_config():
    from shadowkv.config import EngineConfig

    return EngineConfig(max_num_seqs=2, max_model_len=MAX_LEN, cache_memory_gb=0.02)


def test_base_configs_are_not_methods() -> None:
    from shadowkv.cache.methods import CacheConfig, SparseConfig, method_config
    from shadowkv.config import ConfigError

    for base in (CacheConfig, SparseConfig):
        with pytest.raises(ConfigError, match=f"{base.__name__} is a base"):
            base()
    assert method_config("quest", sparse_budget=64, rank=8).sparse_budget == 64  # rank ignored
