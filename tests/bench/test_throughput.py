"""The throughput benchmark end to end on the tiny random-weight config, on CPU."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from shadowkv.bench import ARCHITECTURES, BenchConfig, arch_config, random_model, run_throughput
from shadowkv.bench.harness import build_engine, fits, max_batch, new_tokens, timed_run
from shadowkv.bench.models import weight_bytes
from shadowkv.bench.report import write_plot
from shadowkv.cache.methods import DenseConfig, ShadowKVConfig
from shadowkv.cli import main as cli_main
from shadowkv.config import ConfigError, EngineConfig
from shadowkv.models.llama import LlamaModel

CONTEXT = 256
STEPS = 3
SHADOW_KNOBS = ShadowKVConfig(sparse_budget=32, outlier_chunks=2, local_chunks=2)  # sparse at 256
DEVICE_GB = 0.001  # ~1 MiB of cache: the batch search, not max_batch, sets the batch
HOST_GB = 0.001


def tiny_config(methods: tuple[str, ...] = ("dense", "shadowkv"), **kw) -> BenchConfig:
    caches = {"dense": DenseConfig(), "shadowkv": replace(SHADOW_KNOBS, host_memory_gb=HOST_GB)}
    base = {
        "arch": "tiny",
        "device": "cpu",
        "contexts": (CONTEXT,),
        "caches": tuple(caches[m] for m in methods),
        "decode_steps": STEPS,
        "max_batch": 16,
        "engine": EngineConfig(cache_memory_gb=DEVICE_GB),
    }
    return BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("throughput")
    return run_throughput(tiny_config(), out), out


def expected_dense_batch(budget_gb: float, context: int, steps: int, limit: int) -> int:
    """Largest B whose requests fit the pool (request i asks new_tokens(steps, B, i) tokens)."""
    cfg, model = DenseConfig(), arch_config("tiny")
    per_block = 2 * model.num_layers * cfg.page_size * model.kv_dim * 4  # K and V, fp32
    num_blocks = int(budget_gb * 2**30) // per_block - 1  # less the padding scratch block
    S, best = cfg.page_size, 0
    for B in range(1, limit + 1):
        need = sum(-(-(context + new_tokens(steps, B, i)) // S) for i in range(B))
        if need <= num_blocks:
            best = B
    return best


def test_report_fields_and_files(report: tuple[dict, Path]) -> None:
    data, out = report
    on_disk = json.loads((out / "throughput.json").read_text())
    assert on_disk["runs"] == data["runs"]
    assert (out / "throughput.md").read_text().strip() == data["table"].strip()
    assert data["meta"]["weights"] == "random weights"
    assert "random weights" in data["table"].lower()
    assert data["meta"]["model"] == "tiny" and data["meta"]["device"] == "cpu"
    assert data["meta"]["weight_bytes"] > 0
    methods = {r["method"] for r in data["runs"]}
    assert methods == {"dense", "shadowkv"}
    for r in data["runs"]:
        assert "error" not in r, r["error"]
        assert r["context"] == CONTEXT and r["decode_steps"] == STEPS
        assert 1 <= r["batch"] <= r["max_batch"]
        for key in (
            "prefill_s",
            "ttft_s",
            "ttft_mean_s",
            "decode_tokens_per_s",
            "decode_ms_per_step",
        ):
            assert r[key] > 0, key
        assert r["ttft_mean_s"] >= r["ttft_s"] * 0.5
        assert r["peak_device_bytes"] > 0
        assert r["cache_device_bytes"] > 0
        assert r["dense_bytes"] > 0
    shadow = [r for r in data["runs"] if r["method"] == "shadowkv"]
    assert all(0.0 <= r["hit_rate"] <= 1.0 for r in shadow)
    assert all(r["cache_host_bytes"] > 0 for r in shadow), "ShadowKV offloads values to the host"
    assert all(r["hit_rate"] is None for r in data["runs"] if r["method"] == "dense")
    assert all(0.0 < r["svd_share_of_prefill"] < 1.0 for r in shadow), "SVD time is part of prefill"
    assert all(r["svd_share_of_prefill"] is None for r in data["runs"] if r["method"] == "dense")
    assert "SVD % of prefill" in data["table"]
    assert data["meta"]["copy_bandwidth_gbps"] > 0
    dense = [r for r in data["runs"] if r["method"] == "dense"]
    assert all(r["roofline_share"] > 0 for r in dense) and "of roofline" in data["table"]
    assert all("roofline_share" not in r for r in shadow)


def test_each_method_runs_at_its_max_and_at_the_others_where_it_fits(
    report: tuple[dict, Path],
) -> None:
    data, _ = report
    limits = {m: per[str(CONTEXT)] for m, per in data["max_batch"].items()}
    timed = {(r["method"], r["batch"]) for r in data["runs"]}
    assert limits["shadowkv"] != limits["dense"], "equal limits would test no cross run"
    for method, own in limits.items():
        assert (method, own) in timed
        for other, b in limits.items():
            assert ((method, b) in timed) == (b <= own), (method, other)
    assert len(data["runs"]) == 3  # both at their own max; the larger one also at the smaller


def test_batch_search_respects_device_memory(report: tuple[dict, Path]) -> None:
    data, _ = report
    dense_max = data["max_batch"]["dense"][str(CONTEXT)]
    assert dense_max == expected_dense_batch(DEVICE_GB, CONTEXT, STEPS, 16)
    assert 1 < dense_max < 16, "the budget, not the limit, must decide the batch"
    for r in data["runs"]:
        assert r["cache_device_bytes"] <= DEVICE_GB * 2**30
        assert r["cache_host_bytes"] <= HOST_GB * 2**30


def test_batch_search_respects_host_memory() -> None:
    """A smaller host value store admits fewer ShadowKV sequences; the cache is left empty."""
    cfg = arch_config("tiny")
    model = random_model(cfg, torch.device("cpu"), torch.float32)
    batches = []
    for host_gb in (0.0005, 0.002):
        cache_cfg = replace(SHADOW_KNOBS, host_memory_gb=host_gb)
        engine = build_engine(
            model,
            cfg,
            cache_cfg,
            EngineConfig(max_num_seqs=64, max_model_len=512, cache_memory_gb=0.05),
            torch.device("cpu"),
            torch.float32,
        )
        cache = engine.cache
        b = max_batch(cache, CONTEXT, STEPS, 64)
        assert fits(cache, CONTEXT, STEPS, b) and not fits(cache, CONTEXT, STEPS, b + 1)
        assert cache.memory().host_bytes == 0 and cache.memory().device_bytes == 0  # all freed
        cache.add_sequence(-99, CONTEXT, STEPS + 1)
        per_seq = cache.memory(-99).host_bytes
        cache.free_sequence(-99)
        limit = host_gb * 2**30
        assert b * per_seq <= limit < (b + 2) * per_seq  # the host store, not the device, decided
        batches.append(b)
    assert 0 < batches[0] < batches[1]


def test_max_batch_respects_the_limit() -> None:
    cfg = arch_config("tiny")
    model = random_model(cfg, torch.device("cpu"), torch.float32)
    engine = build_engine(
        model,
        cfg,
        DenseConfig(),
        EngineConfig(max_num_seqs=5, max_model_len=512, cache_memory_gb=0.05),
        torch.device("cpu"),
        torch.float32,
    )
    assert max_batch(engine.cache, CONTEXT, STEPS, 5) == 5
    assert max_batch(engine.cache, CONTEXT, STEPS, 3) == 3
    assert max_batch(engine.cache, 10**6, STEPS, 5) == 0  # larger than the pool: nothing fits


def test_requested_batches_skip_what_does_not_fit(tmp_path: Path) -> None:
    big = 1000
    data = run_throughput(tiny_config(methods=("dense",), batches=(2, big), decode_steps=2), None)
    assert [r["batch"] for r in data["runs"]] == [2]
    assert data["runs"][0]["batch_kind"] == "requested"


def test_a_failing_run_is_recorded_and_the_rest_still_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shadowkv.bench import throughput

    real = throughput.timed_run

    def flaky(engine, *args, **kwargs):
        if engine.cache.cfg.method == "shadowkv":
            raise RuntimeError("kernel exploded")
        return real(engine, *args, **kwargs)

    monkeypatch.setattr(throughput, "timed_run", flaky)
    data = run_throughput(tiny_config(batches=(2,), decode_steps=2), tmp_path)
    by_method = {r["method"]: r for r in data["runs"]}
    assert by_method["shadowkv"]["error"] == "RuntimeError: kernel exploded"
    assert by_method["dense"]["decode_tokens_per_s"] > 0
    assert "failed: RuntimeError: kernel exploded" in (tmp_path / "throughput.md").read_text()
    assert json.loads((tmp_path / "throughput.json").read_text())["runs"] == data["runs"]


def test_cli_writes_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(
        [
            "bench",
            "--arch",
            "tiny",
            "--device",
            "cpu",
            "--contexts",
            "96",
            "--methods",
            "dense",
            "--batch",
            "2",
            "--decode-steps",
            "2",
            "--cache-memory-gb",
            "0.01",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| dense | 96 | 2 | requested |" in printed
    assert {p.name for p in tmp_path.iterdir()} >= {"throughput.json", "throughput.md"}


def test_cli_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "--arch", "tiny", "--methods", "dense,magic", "--device", "cpu"]) == 2
    assert "unknown cache method 'magic'; choose one of dense, shadowkv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "--arch", "tiny", "--model", "x"])  # mutually exclusive


@pytest.mark.parametrize(
    "kw, message",
    [
        pytest.param({"arch": None}, "exactly one of", id="no-model"),
        pytest.param({"model_path": "x"}, "exactly one of", id="arch-and-model"),
        pytest.param({"arch": "gpt-5"}, "unknown architecture", id="unknown-arch"),
        pytest.param({"contexts": ()}, "contexts", id="no-contexts"),
        pytest.param({"methods": ("dense", "dense")}, "each method once", id="twice-a-method"),
        pytest.param({"caches": ()}, "at least one method", id="no-method"),
        pytest.param({"decode_steps": 0}, "decode_steps", id="zero-steps"),
        pytest.param({"batches": (0,)}, "batch sizes", id="zero-batch"),
    ],
)
def test_config_rejects(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(**kw)


def test_plot_is_optional(
    report: tuple[dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, out = report
    pytest.importorskip("matplotlib", reason="matplotlib is optional (shadowkv[plot])")
    assert (out / "throughput.png").stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    assert write_plot(data, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()


def test_named_architectures_match_their_checkpoints() -> None:
    with torch.device("meta"):
        counts = {
            name: sum(p.numel() for p in LlamaModel(cfg).parameters())
            for name, cfg in ARCHITECTURES.items()
        }
    assert counts["llama-3.1-8b"] == 8_030_261_248  # Meta's published parameter count
    assert counts["llama-3-8b"] == 8_030_261_248
    assert counts["llama-3.1-70b"] == 70_553_706_496  # Meta's published parameter count
    assert counts["qwen2.5-7b"] == 7_615_616_512  # Qwen2.5-7B's published count
    assert counts["phi-3-mini-128k"] == 3_821_079_552  # Phi-3-mini's published count
    assert counts["glm-4-9b"] == 9_399_951_360  # GLM-4-9B-chat's
    assert counts["qwen3-8b"] == 8_190_735_360  # Qwen3-8B's
    gemma = arch_config("gemma-3-12b")  # text weights only (the checkpoint adds a vision tower)
    assert sum(not gemma.is_sliding(i) for i in range(48)) == 8 and gemma.is_sliding(0)
    cfg = arch_config("llama-3.1-8b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        32,
        4096,
        32,
        8,
        128,
    )
    assert (cfg.rope.kind, cfg.rope.factor, cfg.rope.theta, cfg.max_position_embeddings) == (
        "llama3",
        8.0,
        500000.0,
        131072,
    )


def test_random_model_is_materialised_on_device_and_dtype() -> None:
    cfg = arch_config("tiny")
    model = random_model(cfg, torch.device("cpu"), torch.bfloat16, seed=1)
    params = list(model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params)
    assert all(torch.isfinite(p.float()).all() for p in params)
    assert weight_bytes(model) == 2 * sum(p.numel() for p in params)
    again = random_model(cfg, torch.device("cpu"), torch.bfloat16, seed=1)
    assert torch.equal(model.layers[0].mlp.down_proj.weight, again.layers[0].mlp.down_proj.weight)
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_timed_run_says_when_the_cache_admits_fewer_than_the_batch() -> None:
    cfg = arch_config("tiny")
    model = random_model(cfg, torch.device("cpu"), torch.float32)
    engine = build_engine(
        model,
        cfg,
        DenseConfig(),
        EngineConfig(max_num_seqs=8, max_model_len=512, cache_memory_gb=0.0002),
        torch.device("cpu"),
        torch.float32,
    )
    fit = max_batch(engine.cache, 96, 2, 8)
    assert 0 < fit < 8
    with pytest.raises(RuntimeError, match=f"at most {fit} of them ran at once"):
        timed_run(engine, 96, fit + 1, 2)


def test_a_checkpoint_runs_with_its_own_weights(tiny_checkpoint, tmp_path: Path) -> None:
    path = tiny_checkpoint("qwen2")
    cfg = BenchConfig(
        arch=None,
        model_path=str(path),
        device="cpu",
        contexts=(64,),
        caches=(DenseConfig(),),
        batches=(2,),
        decode_steps=2,
        engine=EngineConfig(cache_memory_gb=0.01),
    )
    data = run_throughput(cfg, tmp_path)
    assert data["meta"]["weights"] == f"checkpoint {path}"
    assert "random weights" not in data["table"].lower()
    assert data["runs"][0]["decode_tokens_per_s"] > 0


def test_timed_run_prefills_whole_prompts_even_on_a_chunking_engine() -> None:
    cfg = arch_config("tiny")
    model = random_model(cfg, torch.device("cpu"), torch.float32)
    chunking = EngineConfig(
        max_num_seqs=2, max_model_len=512, cache_memory_gb=0.01, max_num_batched_tokens=64
    )
    engine = build_engine(model, cfg, DenseConfig(), chunking, torch.device("cpu"), torch.float32)
    assert timed_run(engine, 96, 2, 2).decode_steps == 2
    assert engine.counters["prefill_chunks"] == 2  # one per prompt: each prefilled whole
    assert engine.cfg.chunked_prefill  # the engine's own setting is back


def test_dense_step_bytes_counts_weights_once_and_every_cached_row() -> None:
    from shadowkv.bench.models import weight_bytes
    from shadowkv.bench.roofline import dense_step_bytes

    cfg = arch_config("tiny")
    model = random_model(cfg, torch.device("cpu"), torch.float32)
    one = dense_step_bytes(model, cfg, torch.float32, context=1000, batch=1, decode_steps=2)
    two = dense_step_bytes(model, cfg, torch.float32, context=1000, batch=2, decode_steps=2)
    row = 2 * cfg.num_layers * cfg.kv_dim * 4  # K and V of one token, all layers, fp32
    assert one - row * 1001 == two - row * 2 * 1001.5  # weights counted once per step
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * 4
    assert one == weight_bytes(model) - embed + row * 1001


def test_a_sliding_window_model_runs_through_the_harness() -> None:
    """A Gemma-3-style model (sliding layers in window caches, a global one in ShadowKV) in the
    timed run: the batch search admits across both, ShadowKV's hooks (hit rate, SVD timer,
    selection policy) reach its part, and the dense roofline counts the window only."""
    from shadowkv.bench.roofline import dense_step_bytes
    from shadowkv.cache import LayeredCache
    from shadowkv.cache.shadow_drive import DrivenSelection

    tiny = arch_config("tiny")
    cfg = replace(tiny, architecture="gemma3", num_layers=3, sliding_window=16,
                  layer_types=("sliding_attention",) * 2 + ("full_attention",),
                  local_rope=tiny.rope, qk_norm=True, sandwich_norms=True,
                  hidden_act="gelu_tanh", embed_scale=8.0)
    model = random_model(cfg, torch.device("cpu"), torch.float32)
    # The harness prefills whole prompts: no staging pool (a 16K-token one would not fit 1 MiB).
    shadow = replace(SHADOW_KNOBS, host_memory_gb=HOST_GB, staging_tokens=0)
    engine = build_engine(model, cfg, shadow,
                          EngineConfig(cache_memory_gb=DEVICE_GB, max_num_seqs=8),
                          torch.device("cpu"), torch.float32)
    assert isinstance(engine.cache, LayeredCache)
    batch = max_batch(engine.cache, CONTEXT, STEPS, 8)
    assert batch >= 1
    engine.cache.set_selection(DrivenSelection(0.5))  # type: ignore[attr-defined]
    result = timed_run(engine, CONTEXT, batch, STEPS, seed=0)
    assert result.hit_rate is not None and result.svd_s is not None and result.svd_s > 0
    window_rows = 2 * 16 * batch  # the two sliding layers keep 16 rows per sequence
    assert result.dense_bytes < (window_rows + (CONTEXT + STEPS) * batch) * 2 * cfg.kv_dim * 4
    full = dense_step_bytes(model, tiny, torch.float32, CONTEXT, batch, STEPS)
    assert dense_step_bytes(model, cfg, torch.float32, CONTEXT, batch, STEPS) < full


def test_the_benchmark_gives_shadowkv_no_staging_pool_unless_sized() -> None:
    """It prefills whole prompts: a default staging pool would only shrink the batch measured."""
    from shadowkv.bench.throughput import without_staging
    from shadowkv.cache.methods import DenseConfig, ShadowKVConfig

    assert without_staging(ShadowKVConfig()).staging_tokens == 0
    assert without_staging(ShadowKVConfig(staging_tokens=4096)).staging_tokens == 4096
    assert without_staging(DenseConfig()) == DenseConfig()


@pytest.mark.parametrize("method", ["dense", "shadowkv"])
def test_shared_document_mode_counts_the_shared_pages_once(method: str) -> None:
    """``shared_document=Q``: every method is also timed with prompts that share one document
    and end with their own Q-token question. The cache shares the document's pages (dense: its
    16-token blocks; ShadowKV: its 128-token factor and value pages), so the largest batch is at
    least the unshared one's in the same small cache (dense: larger), and every run decodes."""
    cfg = tiny_config(methods=(method,), shared_document=16, max_batch=32)
    data = run_throughput(cfg, None)
    own = next(r for r in data["runs"] if r["method"] == method)
    shared = next(r for r in data["runs"] if r["method"] == f"{method}+shared")
    assert "error" not in own and "error" not in shared, shared
    unit = 16 if method == "dense" else 128  # whole blocks / factor pages of the document
    assert shared["shared_tokens"] > 0 and shared["shared_tokens"] % unit == 0
    assert shared["max_batch"] >= own["max_batch"]
    if method == "dense":
        assert shared["shared_tokens"] == (CONTEXT - 16) // 16 * 16
        assert shared["max_batch"] > own["max_batch"]
    assert shared["batch"] == shared["max_batch"] and shared["decode_steps"] == STEPS
    assert shared["document_prefill_s"] > 0
    assert data["max_batch"][f"{method}+shared"][str(CONTEXT)] == shared["max_batch"]
    # The shared blocks: one copy, held by the store (and the batch) while the run lasts.
    assert shared["shared_prefix_bytes"]["device_bytes"] > 0


@pytest.mark.parametrize("q", [-1, CONTEXT])
def test_shared_document_needs_a_question_shorter_than_the_context(q: int) -> None:
    with pytest.raises(ConfigError, match="shared_document"):
        tiny_config(shared_document=q)
