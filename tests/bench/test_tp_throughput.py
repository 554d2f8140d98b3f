"""``shadowkv bench --tensor-parallel 2`` on gloo: two ranks of the tiny random-weight model.

Each rank builds the same random model (same seed), keeps its shard and its own cache of its
KV heads; rank 0 drives every timed step through a ``TPEngine``. The report says
``tensor_parallel=2``, has a largest batch per method and tokens/s > 0, and a dense timed run
gives TP=1's greedy tokens. ShadowKV's tokens are not compared: at the bench's sparse settings
each rank factorises its own heads' keys (a per-rank basis, docs/design.md), so its selection
may differ from one basis over all heads; tests/distributed checks it equals dense at full rank
and budget.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from shadowkv.bench import arch_config, run_throughput
from shadowkv.bench import throughput as bench_throughput
from shadowkv.bench.harness import RunResult
from shadowkv.cli import main as cli_main
from shadowkv.config import ConfigError, EngineConfig
from shadowkv.distributed import TPShapeError
from shadowkv.distributed import engine as tp_engine
from tests.bench.test_throughput import CONTEXT, DEVICE_GB, HOST_GB, tiny_config

BATCH = 3  # timed at both world sizes, so their tokens compare
STEPS = 2


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A collective (or the group's start) that waits 60 s fails the test instead of hanging."""
    monkeypatch.setattr(tp_engine, "TIMEOUT_S", 60.0)


def recorded_runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[RunResult]]:
    """Every ``timed_run`` result of the next benchmark, by the timed cache's method."""
    runs: dict[str, list[RunResult]] = {}
    real = bench_throughput.timed_run

    def record(engine, *args, **kwargs) -> RunResult:  # noqa: ANN001 - Engine or TPEngine
        result = real(engine, *args, **kwargs)
        runs.setdefault(engine.cache.cfg.method, []).append(result)
        return result

    monkeypatch.setattr(bench_throughput, "timed_run", record)
    return runs


def test_tiny_heads_split_over_two_ranks() -> None:
    cfg = arch_config("tiny")
    assert cfg.num_heads % 2 == 0 and cfg.num_kv_heads % 2 == 0 and cfg.intermediate_size % 2 == 0


def test_bench_tensor_parallel_2_matches_tp1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tp2_runs = recorded_runs(monkeypatch)
    start = time.monotonic()
    rc = cli_main([
        "bench", "--arch", "tiny", "--device", "cpu", "--contexts", str(CONTEXT),
        "--methods", "dense,shadowkv", "--batch", str(BATCH), "--decode-steps", str(STEPS),
        "--max-batch", "16", "--cache-memory-gb", str(DEVICE_GB),
        "--sparse-budget", "32", "--outlier-chunks", "2", "--local-chunks", "2",
        "--host-memory-gb", str(HOST_GB), "--tensor-parallel", "2", "--out", str(tmp_path),
    ])
    assert rc == 0
    assert time.monotonic() - start < 120
    printed = capsys.readouterr().out
    assert "Tensor parallel 2 ranks" in printed and "per GPU" in printed
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert report["meta"]["tensor_parallel"] == 2
    assert "Hkv/N KV heads" in report["meta"]["per_rank"]
    assert report["meta"]["bench_config"]["engine"]["tensor_parallel"] == 2
    runs = {r["method"]: r for r in report["runs"]}
    assert set(runs) == {"dense", "shadowkv"}
    for method, row in runs.items():
        assert "error" not in row, row
        assert row["batch"] == BATCH and row["decode_tokens_per_s"] > 0
        assert report["max_batch"][method][str(CONTEXT)] >= BATCH
    assert not multiprocessing.active_children(), "the worker rank outlived the benchmark"

    tp1_runs = recorded_runs(monkeypatch)
    tp1 = run_throughput(tiny_config(batches=(BATCH,), decode_steps=STEPS), None)
    assert tp1["meta"]["tensor_parallel"] == 1 and tp1["meta"]["per_rank"] is None
    dense1, dense2 = tp1_runs["dense"][0].output_ids, tp2_runs["dense"][0].output_ids
    assert len(dense2) == BATCH and all(len(ids) > STEPS for ids in dense2)
    assert dense2 == dense1
    # Each rank's cache holds half the KV heads in the same per-rank budget: more fits.
    for method in ("dense", "shadowkv"):
        assert (report["max_batch"][method][str(CONTEXT)]
                > tp1["max_batch"][method][str(CONTEXT)])


def test_bad_world_size_fails_before_spawning() -> None:
    start = time.monotonic()
    with pytest.raises(TPShapeError, match=r"tensor_parallel=3 does not divide.*use one of"):
        run_throughput(tiny_config(engine=EngineConfig(cache_memory_gb=DEVICE_GB,
                                                       tensor_parallel=3)), None)
    assert time.monotonic() - start < 5 and not multiprocessing.active_children()


@pytest.mark.parametrize(
    "kw, option",
    [
        pytest.param({"hit_rates": (None, 0.5)}, "--hit-rates", id="driven-hit-rate"),
        pytest.param({"prefill": "synthetic"}, "--prefill synthetic", id="synthetic"),
        pytest.param({"shared_document": 16}, "--shared-document", id="shared-document"),
    ],
)
def test_what_drives_one_rank_is_refused_under_tensor_parallel(kw: dict, option: str) -> None:
    tp2 = EngineConfig(cache_memory_gb=DEVICE_GB, tensor_parallel=2)
    with pytest.raises(ConfigError, match=f"--tensor-parallel 2 cannot run {option}"):
        tiny_config(engine=tp2, **kw)
    tiny_config(**kw)  # fine on one rank


def test_a_checkpoint_runs_tensor_parallel(
    tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model`` under TP: every rank loads the checkpoint and keeps its shard; the dense
    greedy tokens equal one rank's."""
    path = tiny_checkpoint("qwen2", num_heads=4, num_kv_heads=2)
    runs = recorded_runs(monkeypatch)
    tokens = {}
    for n in (1, 2):
        cfg = tiny_config(arch=None, model_path=str(path), methods=("dense",), contexts=(64,),
                          batches=(2,), decode_steps=STEPS,
                          engine=EngineConfig(cache_memory_gb=0.01, tensor_parallel=n))
        data = run_throughput(cfg, None)
        assert data["meta"]["weights"] == f"checkpoint {path}"
        assert data["meta"]["tensor_parallel"] == n
        assert data["runs"][0]["decode_tokens_per_s"] > 0
        tokens[n] = runs["dense"][-1].output_ids
    assert len(tokens[2]) == 2 and tokens[2] == tokens[1]
    assert not multiprocessing.active_children()
