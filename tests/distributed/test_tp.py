"""Tensor parallelism of the model on gloo: 2 spawned ranks give TP=1's greedy tokens and logits,
with a dense cache and with ShadowKV at full rank and full budget (each rank's own basis).

The rank functions are module-level so the spawned processes can import them by name. Each rank
loads the full checkpoint, keeps its shard (``shard_model``) and builds its own dense cache for
its own KV heads (``make_cache`` over the sharded model's specs).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from utils import full_budget, greedy_with_logits

from shadowkv.cache import make_cache
from shadowkv.cache.methods import DenseConfig, ShadowKVConfig
from shadowkv.distributed import (
    TPGroup,
    TPRankError,
    TPShapeError,
    check_divisible,
    run_ranks,
    shard_model,
)
from shadowkv.models.loader import load_model

CPU = torch.device("cpu")
PROMPT = torch.randint(3, 512, (173,), generator=torch.Generator().manual_seed(7)).tolist()
STEPS = 6
MAX_LEN = 256
# Every landmark chunk selected, at full rank (of this rank's heads): ShadowKV attends as dense.
FULL = ShadowKVConfig(sparse_budget=full_budget(len(PROMPT)), outlier_chunks=2, rank=1.0)
METHODS = {"dense": DenseConfig(), "shadowkv-full": FULL}
CASES = {  # name -> (family, checkpoint arguments): GQA groups of 3 and 2; Qwen2's q/k/v bias;
    # Llama with o_proj and MLP biases (added once, after the all-reduce)
    "llama": ("llama", dict(num_heads=6, num_kv_heads=2)),
    "llama-bias": ("llama", dict(num_heads=6, num_kv_heads=2, attention_bias=True,
                                 mlp_bias=True)),
    "qwen2": ("qwen2", dict(num_heads=4, num_kv_heads=2)),
}
TIMEOUT_S = 120.0  # a hang fails the test instead of blocking CI


def greedy(tp: TPGroup, path: str, method: str = "dense") -> dict:
    """Greedy prefill + ``STEPS`` decode steps on this rank with ``METHODS[method]``: tokens,
    logits and what this rank's shard and cache hold."""
    torch.set_num_threads(1)
    _, model = load_model(Path(path), CPU, torch.float32)
    model = shard_model(model, tp)
    rope = model.rope_tables(MAX_LEN, CPU)
    cache = make_cache(model.attention_specs(), METHODS[method], rope, CPU, torch.float32, 1,
                       MAX_LEN, 2**23)
    tokens, logits = greedy_with_logits(model, rope, cache, PROMPT, STEPS)
    attn = model.layers[0].self_attn
    return {
        "tokens": tokens, "logits": logits, "cache_kv_heads": cache.layout.num_kv_heads,
        "cache": type(cache).__name__,
        # ShadowKV: per layer, decode steps that reselected every chunk (1.0: it ran sparse)
        "hit_rates": cache.hit_rate() if hasattr(cache, "hit_rate") else None,
        "qkv_rows": attn.qkv_proj.weight.shape[0],
        "mlp_rows": model.layers[0].mlp.gate_up_proj.weight.shape[0],
    }


def greedy_cases(tp: TPGroup, paths: dict[str, str]) -> dict[tuple[str, str], dict]:
    return {(name, m): greedy(tp, path, m) for name, path in paths.items() for m in METHODS}


def test_tp2_matches_tp1(tiny_checkpoint) -> None:
    paths = {name: str(tiny_checkpoint(f, **kw)) for name, (f, kw) in CASES.items()}
    start = time.monotonic()
    ranks = run_ranks(greedy_cases, 2, paths, timeout_s=TIMEOUT_S)
    print(f"2 gloo ranks, {len(paths)} models: {time.monotonic() - start:.1f} s")
    for name, path in paths.items():
        ref = greedy(TPGroup(), path)  # TP=1: the model untouched
        cfg, _ = load_model(Path(path), CPU, torch.float32)
        assert ref["cache_kv_heads"] == cfg.num_kv_heads
        assert (cfg.output_bias, cfg.mlp_bias) == ((True, True) if name == "llama-bias"
                                                   else (False, False))
        for rank, method in ((r, m) for r in range(2) for m in METHODS):
            got, what = ranks[rank][name, method], f"{name} {method} rank {rank}"
            assert got["cache"] == ("DenseCache" if method == "dense" else "ShadowKVCache")
            assert got["hit_rates"] == (None if method == "dense" else [1.0] * cfg.num_layers)
            assert got["tokens"] == ref["tokens"], what
            torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-4, rtol=1e-4,
                                       msg=what)
            # Each rank holds its half of the heads and MLP columns, and caches its own KV heads.
            assert got["cache_kv_heads"] == cfg.num_kv_heads // 2, what
            assert got["qkv_rows"] == (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim // 2
            assert got["mlp_rows"] == cfg.intermediate_size  # half of gate + half of up


def fail_on_rank_1(tp: TPGroup, how: str) -> None:
    """Rank 1 fails before the all-reduce rank 0 waits in."""
    if tp.rank == 1:
        if how == "raise":
            raise ValueError("boom on rank 1")
        os._exit(3)  # a killed process: no traceback, no clean-up
    dist.all_reduce(torch.ones(1))


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_failing_rank_ends_every_rank(how: str) -> None:
    start = time.monotonic()
    with pytest.raises(TPRankError, match="rank 1 of 2 failed") as err:
        run_ranks(fail_on_rank_1, 2, how, timeout_s=TIMEOUT_S)
    assert time.monotonic() - start < TIMEOUT_S / 2, "ended by the failure, not the timeout"
    assert ("boom on rank 1" if how == "raise" else "rank 1 exited with code 3") in str(err.value)


def hang(tp: TPGroup) -> None:
    """Rank 1 never joins the all-reduce rank 0 waits in (a stuck rank)."""
    if tp.rank == 1:
        time.sleep(3600)
    dist.all_reduce(torch.ones(1))


def test_hanging_ranks_are_killed_at_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(TPRankError, match="did not finish within 12 s"):
        run_ranks(hang, 2, timeout_s=12)
    assert time.monotonic() - start < 30


def test_heads_must_divide(tiny_checkpoint) -> None:
    cfg, model = load_model(tiny_checkpoint("llama", num_heads=6, num_kv_heads=2), CPU,
                            torch.float32)
    with pytest.raises(TPShapeError, match=r"tensor_parallel=4 .*num_heads.*=6.*num_kv_heads.*=2"
                       r".*use one of \[1, 2\]"):
        shard_model(model, TPGroup(0, 4))
    with pytest.raises(TPShapeError, match=r"intermediate_size.*=201"):
        check_divisible(replace(cfg, intermediate_size=201), 2)
    check_divisible(cfg, 2)
    assert shard_model(model, TPGroup()) is model  # TP=1: nothing changes
    shard_model(model, TPGroup(1, 2))  # no collective until a forward: no process group needed
    assert model.attention_specs()[0].num_kv_heads == 1
    with pytest.raises(ValueError, match="already sharded"):
        shard_model(model, TPGroup(1, 2))
