"""How ShadowKV scores chunks at a decode step: by landmarks (the method), or driven to a chosen
hit rate (a benchmark control).

A decode step's cost hangs on its hit rate (the share of selected chunks already in the buffer
from the previous step): every miss rebuilds a chunk's keys and fetches its values over PCIe.
Real models keep 60-80 % of their chunks from one step to the next (measured here on SmolLM2 and
Qwen2.5: 0.58-0.77; the paper: over 60 %), but a model with random weights, the only kind the
GPU benchmarks can run, asks for nearly unrelated chunks at every step. ``DrivenSelection``
replaces the landmark scores with ones that keep a ``hit_rate`` share of each sequence's previous
chunks and pick the rest at random, so the selection, rebuild, fetch and attention kernels do
the work of that hit rate. Attention then runs over chunks the query did not choose: decode
outputs are meaningless (as they are with random weights); speed is what it measures.

The policy is an object the cache holds (``ShadowKVCache.set_selection``), not a branch of the
step: swapping it bumps the cache's ``step_epoch``, so captured CUDA graphs of the old policy are
dropped (``engine/decode_runner.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from shadowkv.cache.shadow_tables import SparsePlan
from shadowkv.kernels.score_landmarks import score_landmarks

if TYPE_CHECKING:
    from shadowkv.cache.shadow import ShadowKVCache


class SelectionPolicy(Protocol):
    def scores(
        self, cache: ShadowKVCache, layer: int, q: torch.Tensor, sp: SparsePlan,
        rows: torch.Tensor, num_slots: int,
    ) -> torch.Tensor:
        """``[B, Hkv, N]`` scores of this step's landmarks (``rows``: the sequences' slots,
        ``num_slots``: the step's selection width); the top ``num_select`` are selected."""
        ...


class LandmarkSelection:
    """The method: ``softmax(q . landmarks * scale)`` per query head, max over the GQA group."""

    def scores(
        self, cache: ShadowKVCache, layer: int, q: torch.Tensor, sp: SparsePlan,
        rows: torch.Tensor, num_slots: int,
    ) -> torch.Tensor:
        lm_scales = cache.landmark_scales
        return score_landmarks(
            q, cache.landmarks[layer], sp.landmark_tables, sp.num_landmarks, cache.scale,
            None if lm_scales is None else lm_scales[layer],
        )


@dataclass(frozen=True)
class DrivenSelection:
    """Benchmarks only: keep ``hit_rate`` of each sequence's previous chunks, the rest random."""

    hit_rate: float

    def __post_init__(self) -> None:
        if not 0 <= self.hit_rate <= 1:
            raise ValueError(f"hit_rate={self.hit_rate} must be in [0, 1]")

    def scores(
        self, cache: ShadowKVCache, layer: int, q: torch.Tensor, sp: SparsePlan,
        rows: torch.Tensor, num_slots: int,
    ) -> torch.Tensor:
        prev = cache.selection[layer][rows, :, :num_slots]
        return driven_scores(cache.landmark_ids[layer], sp, prev, self.hit_rate)

KEPT, DROPPED = 2.0, -1.0  # fresh candidates score in [0, 1): kept chunks above, dropped below


def driven_scores(
    landmark_ids: torch.Tensor, sp: SparsePlan, prev: torch.Tensor, hit_rate: float
) -> torch.Tensor:
    """Scores ``[B, Hkv, N]`` whose top ``num_select[b]`` keep ``round(hit_rate * num_select[b])``
    of the chunks in ``prev [B, Hkv, K]`` (chunk ids, -1 empty) and add random new ones.

    ``landmark_ids [pages, Pc, Hkv]`` maps each sequence's landmarks (through
    ``sp.landmark_tables``) to chunk ids, ascending per KV head.
    """
    B, Hkv, K = prev.shape
    dev = prev.device
    Pc = landmark_ids.shape[1]
    N = sp.landmark_tables.shape[1] * Pc
    ids = landmark_ids[sp.landmark_tables.long()].reshape(B, N, Hkv).permute(0, 2, 1)  # [B,Hkv,N]
    valid = torch.arange(N, device=dev) < sp.num_landmarks[:, None, None]
    big = torch.iinfo(torch.int32).max
    ids = ids.masked_fill(~valid, big).contiguous()  # ascending, so chunk id -> index by search
    held = prev >= 0
    pos = torch.searchsorted(ids, prev.clamp_min(0).to(ids.dtype).contiguous()).clamp_max(N - 1)
    # Keep a random round(hit_rate * k) of the held chunks, drop the others.
    keep = (hit_rate * sp.num_select.float()).round()[:, None, None]  # [B, 1, 1]
    rank = torch.rand(B, Hkv, K, device=dev).masked_fill(~held, 2.0).argsort(-1).argsort(-1)
    kept = held & (rank < keep)
    scores = torch.rand(B, Hkv, N + 1, device=dev)  # column N: where empty slots scatter to
    scores[..., :N].masked_fill_(~valid, float("-inf"))
    mark = torch.where(kept, KEPT, DROPPED).to(scores.dtype)
    scores = scores.scatter(-1, torch.where(held, pos, N), mark)
    return scores[..., :N]
