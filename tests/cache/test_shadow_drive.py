"""``DrivenSelection`` (benchmark control): the selection keeps the asked share of chunks."""

from __future__ import annotations

import pytest
import torch

from shadowkv import LLM, EngineConfig, SamplingParams, ShadowKVConfig
from shadowkv.cache.shadow_drive import DrivenSelection, LandmarkSelection

PROMPTS = [[(k * i) % 90 + 3 for i in range(n)] for k, n in ((7, 900), (11, 700))]


@pytest.fixture(scope="module")
def path(tiny_checkpoint):
    return tiny_checkpoint("llama", num_heads=4, num_kv_heads=2, head_dim=32, vocab_size=96)


def hit_rate(path, drive: float | None, mode: str = "eager") -> float:
    cfg = ShadowKVConfig(sparse_budget=160, rank=0.5, outlier_chunks=2)
    llm = LLM(str(path), device="cpu", cache=cfg,
              engine=EngineConfig(cache_memory_gb=0.05, decode_mode=mode))
    llm.engine.cache.set_selection(LandmarkSelection() if drive is None else DrivenSelection(drive))
    llm.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    rates = llm.engine.cache.hit_rate()
    return sum(rates) / len(rates)


@pytest.mark.parametrize("target", [0.0, 0.5, 0.8])
def test_the_measured_hit_rate_is_the_driven_one(path, target: float) -> None:
    # 20 slots per head: round(target * 20) kept exactly, every step after the first.
    assert hit_rate(path, target) == pytest.approx(round(target * 20) / 20, abs=0.02)


def test_driving_works_in_the_fixed_shape_step_and_off_means_the_query_selects(path) -> None:
    assert hit_rate(path, 0.5, mode="static") == pytest.approx(0.5, abs=0.02)
    natural = hit_rate(path, None)
    assert 0 < natural < 1 and natural != pytest.approx(0.5, abs=0.02)


def test_driven_scores_keep_exactly_the_share_and_only_landmarks() -> None:
    from shadowkv.cache.shadow_drive import driven_scores
    from shadowkv.cache.shadow_tables import SparsePlan

    B, Hkv, Pc, pages = 2, 3, 16, 4
    N = pages * Pc
    # Landmark pages 1..4 of sequence 0 and 5..8 of sequence 1; chunk ids ascending, gaps where
    # outliers were taken out.
    landmark_ids = torch.zeros(9, Pc, Hkv, dtype=torch.int32)
    ids = torch.arange(N) * 2 + 1
    landmark_ids[1:5] = ids.view(pages, Pc, 1).expand(-1, -1, Hkv).to(torch.int32)
    landmark_ids[5:9] = landmark_ids[1:5]
    tables = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=torch.int32)
    num_landmarks = torch.tensor([N, 40], dtype=torch.int32)
    num_select = torch.tensor([10, 8], dtype=torch.int32)
    sp = SparsePlan(
        tables, tables, tables, num_landmarks, num_select,
        torch.zeros(B, 10 * 8, dtype=torch.int64), torch.ones(B, dtype=torch.bool), ((0, None),),
    )
    prev = torch.full((B, Hkv, 10), -1, dtype=torch.int32)
    prev[0] = ids[torch.arange(10) * 3].to(torch.int32)  # 10 held chunks
    prev[1, :, :8] = ids[torch.arange(8) * 4 + 1].to(torch.int32)  # 8 held, 2 empty slots
    scores = driven_scores(landmark_ids, sp, prev, 0.7)
    assert scores.shape == (B, Hkv, N)
    assert torch.isinf(scores[1, :, 40:]).all() and not torch.isinf(scores[0]).any()
    for b, k in ((0, 10), (1, 8)):
        top = scores[b].topk(k).indices  # [Hkv, k] landmark indices
        chosen = ids[top]
        for h in range(Hkv):
            held = set(prev[b, h][prev[b, h] >= 0].tolist())
            assert len(held & set(chosen[h].tolist())) == round(0.7 * k)


def test_a_new_selection_policy_drops_the_captured_steps(path) -> None:
    """A captured step bakes the policy in: changing it must not replay the old graph."""
    cfg = ShadowKVConfig(sparse_budget=160, rank=0.5, outlier_chunks=2)
    llm = LLM(str(path), device="cpu", cache=cfg,
              engine=EngineConfig(cache_memory_gb=0.05, decode_mode="static"))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    llm.generate(PROMPTS, params)
    before = dict(llm.engine.runner._steps)
    assert before
    llm.engine.cache.set_selection(DrivenSelection(0.5))
    llm.engine.cache.reset_hit_rate()
    llm.generate(PROMPTS, params)
    after = llm.engine.runner._steps
    assert after and all(step is not before.get(key) for key, step in after.items())
    assert sum(llm.engine.cache.hit_rate()) / 2 == pytest.approx(0.5, abs=0.02)
