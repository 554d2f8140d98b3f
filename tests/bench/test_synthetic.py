"""Synthetic prompt K/V (``bench/synthetic.py``): decode timed without prefills, labelled so."""

from __future__ import annotations

import pytest
import torch

from shadowkv.bench import arch_config, random_model
from shadowkv.bench.harness import build_engine, timed_run
from shadowkv.bench.synthetic import SIGNAL_RANK, synthetic_prompt
from shadowkv.cache.methods import DenseConfig, ShadowKVConfig, method_config
from shadowkv.config import ConfigError, EngineConfig
from shadowkv.engine.sampling import SamplingParams

CPU = torch.device("cpu")
T = 384


def engine_for(method: str, **knobs):
    cfg = arch_config("tiny")
    model = random_model(cfg, CPU, torch.float32, seed=0)
    engine_cfg = EngineConfig(max_num_seqs=4, max_model_len=1024, cache_memory_gb=0.02,
                              chunked_prefill=False)
    return build_engine(model, cfg, method_config(method, **knobs), engine_cfg, CPU,
                        torch.float32)


def test_synthetic_runs_time_decode_and_report_no_prefill() -> None:
    engine = engine_for("shadowkv", sparse_budget=32, outlier_chunks=2)
    row = timed_run(engine, T, 2, 3, prefill="synthetic").as_dict()
    assert row["prefill"] == "synthetic" and row["decode_steps"] == 3
    assert row["prefill_s"] is None and row["ttft_s"] is None
    assert row["svd_share_of_prefill"] is None
    assert row["decode_tokens_per_s"] > 0 and row["hit_rate"] is not None
    assert row["cache_host_bytes"] > 0, "the values went to the host tier as in a real prefill"


def test_full_budget_full_rank_shadowkv_equals_dense_on_synthetic_kv() -> None:
    """The synthetic K/V go through each cache's real prefill path: with every chunk selected
    and exact keys, ShadowKV decodes as dense over them."""
    full = dict(sparse_budget=(T // 8 - 4 - 2) * 8, outlier_chunks=2, rank=1.0)
    out = {}
    for method, knobs in (("dense", {}), ("shadowkv", full)):
        engine = engine_for(method, **knobs)
        prompt = list(range(3, 3 + T))
        kv = synthetic_prompt(prompt, engine, 7)
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        req = engine.add_request(prompt, params, prompt_kv=kv)
        while engine.has_unfinished():
            engine.step()
        out[method] = req.output_ids
    assert len(set(out["dense"])) > 1 and out["shadowkv"] == out["dense"]


def test_synthetic_keys_have_low_effective_rank() -> None:
    engine = engine_for("dense")
    stored = []

    class Probe:
        device, dtype = CPU, torch.float32

        def store_prompt(self, layer, k, v, k_pre):
            stored.append((k, v, k_pre))

    kv = synthetic_prompt(list(range(T)), engine, seed=1)
    kv.replay(Probe())  # type: ignore[arg-type]
    assert len(stored) == 2
    k, v, k_pre = stored[0]
    assert k.shape == v.shape == k_pre.shape == (T, 2, 16)
    s = torch.linalg.svdvals(k_pre.reshape(T, -1))
    rank = min(SIGNAL_RANK, s.numel())
    assert (s[:rank] ** 2).sum() / (s**2).sum() > 0.95
    assert not torch.equal(stored[0][2], stored[1][2]), "each layer gets its own keys"


def test_bench_times_shadowkv_once_per_hit_rate(tmp_path) -> None:
    import argparse

    from shadowkv.bench import BenchConfig, run_throughput
    from shadowkv.commands import bench as bench_cmd
    from shadowkv.config import EngineConfig

    cfg = BenchConfig(
        arch="tiny", device="cpu", contexts=(T,), batches=(2,), decode_steps=3,
        caches=(DenseConfig(), ShadowKVConfig(sparse_budget=64, outlier_chunks=2)),
        engine=EngineConfig(cache_memory_gb=0.02), prefill="synthetic", hit_rates=(None, 0.5),
    )
    report = run_throughput(cfg, tmp_path)
    rows = [(r["method"], r["hit_rate_driven"]) for r in report["runs"]]
    assert rows == [("dense", None), ("shadowkv", None), ("shadowkv", 0.5)]
    driven = report["runs"][2]
    assert "error" not in driven and driven["hit_rate"] == 0.5  # 8 slots, 4 kept
    assert report["table"].count("(driven)") == 2  # the row and the footnote
    p = argparse.ArgumentParser()
    bench_cmd.add_arguments(p)
    args = p.parse_args(["--arch", "tiny", "--hit-rates", "query,0.7"])
    assert bench_cmd.config_from_args(args).hit_rates == (None, 0.7)
    with pytest.raises(ConfigError, match="hit_rates"):
        BenchConfig(arch="tiny", hit_rates=(1.5,))
