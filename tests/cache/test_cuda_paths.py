"""Invariants of the CUDA path, end to end through ``LLM`` (run by ``benchmarks/gpu_check.sh``).

CUDA is where the Triton kernels, the pinned host value tier read zero-copy, the value fetch on
its own stream and decode steps captured as CUDA graphs (the default there) come into play; on a
machine without a GPU this module is skipped.
A tiny random Llama in fp32, so CPU and GPU differ only by summation order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shadowkv import LLM, CacheOptions, DenseConfig, EngineConfig, SamplingParams, ShadowKVConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="CUDA path: needs an NVIDIA GPU (run benchmarks/gpu_check.sh)",
    ),
]

PROMPTS = [[(k * i) % 90 + 3 for i in range(n)] for k, n in ((7, 300), (11, 211), (13, 157))]
STEPS = 10
# Budget that selects every landmark chunk: (T // 8 - 4 local - 2 outlier chunks) * 8 tokens,
# per prompt through CacheOptions; the engine's own budget is the largest of them.
FULL_BUDGETS = [(len(p) // 8 - 6) * 8 for p in PROMPTS]
FULL = dict(sparse_budget=max(FULL_BUDGETS), rank=1.0, outlier_chunks=2)
SPARSE = dict(sparse_budget=32, rank=0.5, outlier_chunks=2)
SPARSE_FP8 = dict(SPARSE, value_dtype="fp8", landmark_dtype="fp8")  # fp8 values + landmarks


@pytest.fixture(scope="module")
def path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", num_heads=8, num_kv_heads=2, head_dim=64, vocab_size=96)


def tokens(
    path: Path, device: str, cache: dict | None, one_by_one: bool = False, overlap: bool = True
) -> list[list[int]]:
    llm = LLM(
        str(path), device=device,
        cache=ShadowKVConfig(**cache, overlap_fetch=overlap) if cache else DenseConfig(),
        engine=EngineConfig(cache_memory_gb=0.05, dtype="float32"),
    )
    params = SamplingParams(max_tokens=STEPS)
    opts = [CacheOptions(sparse_budget=b) for b in FULL_BUDGETS] if cache is FULL else [None] * 3
    if one_by_one:
        alone = [llm.generate(p, params, cache_options=o)[0] for p, o in zip(PROMPTS, opts)]
        return [r.token_ids for r in alone]
    return [r.token_ids for r in llm.generate(PROMPTS, params, cache_options=opts)]


@pytest.mark.parametrize("overlap", [True, False], ids=["fetch-stream", "one-stream"])
def test_full_budget_full_rank_equals_dense_on_cuda(path: Path, overlap: bool) -> None:
    dense = tokens(path, "cuda", None)
    assert tokens(path, "cuda", FULL, overlap=overlap) == dense
    assert tokens(path, "cpu", None) == dense


@pytest.mark.parametrize("cache", [SPARSE, SPARSE_FP8], ids=["auto", "fp8"])
@pytest.mark.parametrize("overlap", [True, False], ids=["fetch-stream", "one-stream"])
def test_sparse_cuda_equals_cpu_and_batch_equals_alone(
    path: Path, overlap: bool, cache: dict
) -> None:
    gpu = tokens(path, "cuda", cache, overlap=overlap)
    assert gpu == tokens(path, "cpu", cache)
    assert gpu == tokens(path, "cuda", cache, one_by_one=True, overlap=overlap)


def test_host_and_device_value_tiers_decode_alike(path: Path) -> None:
    from shadowkv.cache.store import DEVICE, HOST

    # Host pages of 16 chunks (2 layers x 16 x 2 heads x 8 x 64 fp32 = 128 KiB): room for 4 usable
    # pages (+ the null page), so the 300-token prompt (3 pages) goes to the host and the others
    # (2 pages each) to the device tier.
    mixed = dict(SPARSE, host_memory_gb=5 * 2**17 / 2**30, device_value_memory_gb=0.01)
    llm = LLM(str(path), device="cuda", cache=ShadowKVConfig(**mixed),
              engine=EngineConfig(cache_memory_gb=0.05, dtype="float32"))
    engine = llm.engine
    reqs = [engine.add_request(p, SamplingParams(max_tokens=STEPS)) for p in PROMPTS]
    tiers = set()
    while engine.has_unfinished():
        engine.step()
        tiers |= {engine.cache.record(r.request_id).value_tier for r in engine.running}
    assert tiers == {HOST, DEVICE}
    assert [r.output_ids for r in reqs] == tokens(path, "cuda", SPARSE, one_by_one=True)


@pytest.mark.parametrize("cache", [None, SPARSE, SPARSE_FP8], ids=["dense", "shadowkv", "fp8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_steps_equal_the_uncaptured_step(path: Path, cache: dict | None, dtype: str) -> None:
    """Replayed graphs compute what the same fixed-shape step computes uncaptured (bit for bit:
    the same kernels on the same shapes), and in fp32 what eager steps compute; the batch
    shrinks 3 -> 2 -> 1, so several padded sizes are captured."""
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (12, 8, 4)]

    def run(mode: str):
        llm = LLM(
            str(path), device="cuda", cache=ShadowKVConfig(**cache) if cache else DenseConfig(),
            engine=EngineConfig(cache_memory_gb=0.05, dtype=dtype, decode_mode=mode),
        )
        return [r.token_ids for r in llm.generate(PROMPTS, params)], llm.engine.runner

    graph, runner = run("graph")
    assert runner.mode == "graph" and runner.captures >= 3
    assert [len(t) for t in graph] == [12, 8, 4]
    assert graph == run("static")[0]
    if dtype == "float32":
        assert graph == run("eager")[0]


def test_auto_mode_captures_on_cuda(path: Path) -> None:
    llm = LLM(str(path), device="cuda", cache=ShadowKVConfig(**SPARSE),
              engine=EngineConfig(cache_memory_gb=0.05, dtype="float32"))
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, ignore_eos=True))
    assert llm.engine.runner.mode == "graph" and llm.engine.runner.captures == 1


@pytest.mark.parametrize("cache", [None, SPARSE], ids=["dense", "shadowkv"])
def test_mixed_steps_between_graph_steps(path: Path, cache: dict | None) -> None:
    """Prompts arrive while others decode, in 64-token chunks: mixed steps (the decode rows
    planned eagerly, the prompt chunks through the Triton varlen kernel) between decode steps
    replayed as CUDA graphs. fp32: the tokens of separate forwards and of the CPU."""

    def run(device: str, mixed: bool) -> tuple[list[list[int]], list[str | None], object]:
        llm = LLM(
            str(path), device=device, cache=ShadowKVConfig(**cache) if cache else DenseConfig(),
            engine=EngineConfig(cache_memory_gb=0.05, dtype="float32", mixed_step=mixed,
                                max_num_batched_tokens=64),
        )
        engine = llm.engine
        params = SamplingParams(max_tokens=STEPS, ignore_eos=True)
        reqs, steps = [], []
        for prompt in PROMPTS:
            reqs.append(engine.add_request(prompt, params))
            for _ in range(3):
                engine.step()
                steps.append(engine.last_step)
        while engine.has_unfinished():
            engine.step()
            steps.append(engine.last_step)
        return [r.output_ids for r in reqs], steps, engine.runner

    gpu, steps, runner = run("cuda", True)
    assert "mixed" in steps and "decode" in steps
    assert runner.mode == "graph" and runner.captures >= 1  # type: ignore[attr-defined]
    assert gpu == run("cuda", False)[0]
    assert gpu == run("cpu", True)[0]
