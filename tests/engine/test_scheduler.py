"""The step scheduler: a step decodes every running request, then prefills waiting ones first
come, first served under ``EngineConfig.max_num_batched_tokens``.

A tiny random 4-layer Llama; prompts are token ids of different lengths (ragged), so ShadowKV
runs sparse for the long ones and falls back to dense for the short ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from utils import small_cache_cfg as cache_cfg

from shadowkv import LLM, CacheConfig, DenseConfig, EngineConfig, SamplingParams, method_config
from shadowkv.config import ConfigError
from shadowkv.engine.engine import Engine

METHODS = ["dense", "shadowkv", "quest", "loki", "streaming", "oracle"]
# 20 (ShadowKV's dense fallback), 200, 97, 150, 33 and 180 tokens.
PROMPTS = [[(k * i) % 90 + 3 for i in range(n)] for k, n in (
    (1, 20), (7, 200), (11, 97), (13, 150), (17, 33), (19, 180)
)]
MAX_TOKENS = [9, 6, 11, 4, 7, 8]


@pytest.fixture(scope="module")
def path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", num_layers=4, vocab_size=96)


def make_llm(path: Path, cache: CacheConfig, **engine) -> LLM:
    engine.setdefault("cache_memory_gb", 0.01)
    return LLM(str(path), cache=cache, engine=EngineConfig(**engine), device="cpu")


def alone(llm: LLM) -> list[list[int]]:
    return [
        llm.generate(p, SamplingParams(max_tokens=n))[0].token_ids
        for p, n in zip(PROMPTS, MAX_TOKENS)
    ]


def staggered(engine: Engine, late: int = 2) -> tuple[list[list[int]], list[tuple[str, int]]]:
    """All prompts but the last ``late`` at once, the rest after two steps (mixed steps: their
    prefills follow the others' decodes). Returns the tokens and, per step, (kind, prefills)."""
    params = [SamplingParams(max_tokens=n) for n in MAX_TOKENS]
    first = len(PROMPTS) - late
    reqs = [engine.add_request(p, s) for p, s in zip(PROMPTS[:first], params)]
    trace = []
    while engine.has_unfinished():
        if len(trace) == 2:
            reqs += [engine.add_request(p, s) for p, s in zip(PROMPTS[first:], params[first:])]
        outs = engine.step()
        trace.append((engine.last_step, sum(len(o.request.output_ids) == 1 for o in outs)))
    return [r.output_ids for r in reqs], trace


@pytest.mark.parametrize("method", METHODS)
def test_packed_prefills_and_mixed_steps_equal_one_by_one(path: Path, method: str) -> None:
    llm = make_llm(path, cache_cfg(method))
    want = alone(llm)
    got, trace = staggered(llm.engine)
    assert got == want
    assert trace[0] == ("prefill", 4), "the first step prefills all four waiting prompts"
    assert trace[2] == ("mixed", 2), "late arrivals prefill after the running ones decode"
    assert any(len(set(t)) > 1 for t in want), "constant outputs would make this vacuous"


def test_shadowkv_full_rank_full_budget_packed_equals_dense_alone(path: Path) -> None:
    dense = alone(make_llm(path, DenseConfig()))
    full = method_config("shadowkv", sparse_budget=(200 // 8 - 4 - 2) * 8, outlier_chunks=2,
                         rank=1.0)
    got, _ = staggered(make_llm(path, full).engine)
    assert got == dense


def test_the_budget_bounds_what_a_step_prefills_whole(path: Path) -> None:
    # Chunking off, 240 tokens: the first prompt always goes (20), then 200 fits (220), 97 not.
    engine = make_llm(
        path, DenseConfig(), max_num_batched_tokens=240, chunked_prefill=False
    ).engine
    for p in PROMPTS:
        engine.add_request(p, SamplingParams(max_tokens=20))
    assert len(engine.step()) == 2 and len(engine.waiting) == 4
    outs = engine.step()  # 2 decode rows, then 97 + 150 > 238: only the first waiting goes
    assert engine.last_step == "mixed" and len(outs) == 3 and len(engine.waiting) == 3
    # A budget below every prompt still prefills one per step: the queue always moves.
    engine = make_llm(
        path, DenseConfig(), max_num_batched_tokens=1, chunked_prefill=False
    ).engine
    for p in PROMPTS[:3]:
        engine.add_request(p, SamplingParams(max_tokens=5))
    assert [len(engine.step()) for _ in range(3)] == [1, 2, 3]


def test_the_budget_bounds_what_a_step_prefills_chunked(path: Path) -> None:
    engine = make_llm(path, DenseConfig(), max_num_batched_tokens=240).engine
    reqs = [engine.add_request(p, SamplingParams(max_tokens=20)) for p in PROMPTS]
    # 20 + 200 whole, then the 97-token prompt starts with the 20 tokens left.
    assert len(engine.step()) == 2 and len(engine.waiting) == 3 and engine.prefilling is reqs[2]
    # 2 decode rows; the 150-token prompt would not fit half of 238, so the partial prompt takes
    # what it needs (77), 150 fits whole, and the 33-token one starts with the 11 left.
    outs = engine.step()
    assert [o.request for o in outs] == reqs[:4] and engine.prefilling is reqs[4]
    assert engine.counters["prefill_chunks"] == 6
    # A budget below every prompt still moves the queue: chunks of the 8-token minimum.
    engine = make_llm(path, DenseConfig(), max_num_batched_tokens=1).engine
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=5))
    assert [len(engine.step()) for _ in range(3)] == [0, 0, 1]  # 8 + 8 + 4 tokens


def test_max_num_seqs_caps_the_packed_admissions(path: Path) -> None:
    llm = make_llm(path, DenseConfig(), max_num_seqs=3)
    want = alone(llm)
    got, trace = staggered(llm.engine)
    assert got == want and trace[0] == ("prefill", 3)


def test_max_num_batched_tokens_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_num_batched_tokens must be >= 1"):
        EngineConfig(max_num_batched_tokens=0)


def test_each_part_of_a_step_is_handed_out_as_soon_as_it_is_final(path: Path) -> None:
    """``on_outputs`` gets the decode's tokens, then each packed prefill's first token, in the
    order ``step`` returns them: a server streams them without waiting for the whole step."""
    engine = make_llm(path, DenseConfig()).engine
    parts: list[list[int]] = []
    engine.on_outputs = lambda outs: parts.append([o.request.request_id for o in outs])
    a = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=4))
    engine.step()
    b, c = (engine.add_request(p, SamplingParams(max_tokens=4)) for p in PROMPTS[1:3])
    parts.clear()
    outs = engine.step()
    assert parts == [[a.request_id], [b.request_id], [c.request_id]]
    assert [o.request.request_id for o in outs] == [r for p in parts for r in p]
