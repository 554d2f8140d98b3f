"""Per-request cache settings (``CacheOptions``): exact attention for one request, or its own
sparse budget, inside an engine that runs a sparse method for everyone else.

A tiny random 2-layer Llama and 200-token prompts, long enough that a 16-token budget is sparse.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowkv import LLM, CacheOptions, EngineConfig, SamplingParams, method_config
from shadowkv.cache.base import CacheOptionsError

PROMPTS = [[(k * i) % 90 + 3 for i in range(200)] for k in (7, 11)]
SPARSE = ["shadowkv", "quest", "loki", "streaming", "oracle"]
STEPS = 8


def make_llm(path: Path, method: str = "dense", budget: float = 16) -> LLM:
    extra = {"outlier_chunks": 2, "rank": 16} if method == "shadowkv" else {}
    cache = method_config(method, sparse_budget=budget, **extra)
    return LLM(str(path), cache=cache, engine=EngineConfig(cache_memory_gb=0.02), device="cpu")


def greedy(llm: LLM, opts=None) -> list[list[int]]:
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=STEPS), cache_options=opts)
    return [r.token_ids for r in out]


@pytest.fixture(scope="module")
def path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", vocab_size=96)


@pytest.fixture(scope="module")
def dense(path: Path) -> list[list[int]]:
    tokens = greedy(make_llm(path))
    assert all(len(set(t)) > 1 for t in tokens), "constant outputs would make comparisons vacuous"
    return tokens


@pytest.mark.parametrize("method", SPARSE)
def test_exact_request_equals_dense_beside_a_sparse_one(path: Path, dense, method: str) -> None:
    llm = make_llm(path, method)
    sparse = greedy(llm)
    assert sparse != dense, "budget 16 of 200 tokens should change some token"
    mixed = greedy(llm, [CacheOptions(exact=True), None])  # one exact, one sparse, same batch
    assert mixed == [dense[0], sparse[1]]


@pytest.mark.parametrize("method", SPARSE)
def test_request_budget_equals_an_engine_with_that_budget(path: Path, method: str) -> None:
    small = greedy(make_llm(path, method, budget=16))
    big = make_llm(path, method, budget=64)
    assert greedy(big, CacheOptions(sparse_budget=16)) == small
    assert greedy(big, [CacheOptions(sparse_budget=16), None]) == [small[0], greedy(big)[1]]


def test_options_are_checked(path: Path) -> None:
    with pytest.raises(CacheOptionsError, match="sparse_budget=0"):
        CacheOptions(sparse_budget=0)
    with pytest.raises(CacheOptionsError, match="exact or sparse_budget"):
        CacheOptions(exact=True, sparse_budget=64)
    llm = make_llm(path)
    with pytest.raises(CacheOptionsError, match="dense attention"):
        llm.generate(PROMPTS[0], cache_options=CacheOptions(sparse_budget=64))
    assert greedy(llm, CacheOptions(exact=True)) == greedy(llm)  # exact is what dense does
    with pytest.raises(ValueError, match="2 prompts but 1 cache option sets"):
        llm.generate(PROMPTS, cache_options=[CacheOptions()])
