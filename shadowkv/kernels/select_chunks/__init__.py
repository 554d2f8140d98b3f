"""``select_chunks``: top-k chunks per (sequence, KV head), hits keep their buffer slots.

``select_chunks_inplace`` is the decode step's form: it reads and updates a persistent selection
state and counts hits (``torch.topk`` plus one Triton launch); ``select_chunks`` is the
out-of-place form.
"""

from __future__ import annotations

import torch

from shadowkv.kernels._dispatch import use_triton
from shadowkv.kernels.select_chunks.reference import select_chunks as select_chunks_ref
from shadowkv.kernels.select_chunks.reference import (
    select_chunks_inplace as select_chunks_inplace_ref,
)

__all__ = [
    "select_chunks",
    "select_chunks_inplace",
    "select_chunks_inplace_ref",
    "select_chunks_ref",
]


def _check_common(
    scores: torch.Tensor,
    landmark_ids: torch.Tensor,
    page_table: torch.Tensor,
    num_select: torch.Tensor,
    K: int,
) -> None:
    if scores.dim() != 3 or landmark_ids.dim() != 3 or page_table.dim() != 2:
        raise ValueError(
            "select_chunks wants scores [B, Hkv, N], landmark_ids [pages, Pc, Hkv] and "
            f"page_table [B, max_pages], got {tuple(scores.shape)}, "
            f"{tuple(landmark_ids.shape)}, {tuple(page_table.shape)}"
        )
    B, Hkv, N = scores.shape
    if landmark_ids.shape[2] != Hkv:
        raise ValueError(f"landmark_ids must have Hkv={Hkv} like the scores")
    if page_table.shape[0] != B or tuple(num_select.shape) != (B,):
        raise ValueError(f"page_table and num_select must have B={B} rows like the scores")
    if page_table.shape[1] * landmark_ids.shape[1] != N:
        raise ValueError(
            f"scores cover N={N} landmarks but page_table {tuple(page_table.shape)} x "
            f"{landmark_ids.shape[1]} per page does not"
        )
    if K > N:
        raise ValueError(f"K={K} slots exceed the N={N} landmark columns")


def select_chunks(
    scores: torch.Tensor,
    landmark_ids: torch.Tensor,
    page_table: torch.Tensor,
    num_select: torch.Tensor,
    prev_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slot_ids [B, Hkv, K] int32, miss [B, Hkv, K] bool)``; see ``reference.select_chunks``."""
    if prev_ids.dim() != 3:
        raise ValueError(f"select_chunks wants prev_ids [B, Hkv, K], got {tuple(prev_ids.shape)}")
    _check_common(scores, landmark_ids, page_table, num_select, prev_ids.shape[2])
    if prev_ids.shape[:2] != scores.shape[:2]:
        raise ValueError("prev_ids must have B / Hkv like the scores")
    if use_triton(scores, "select_chunks"):
        from shadowkv.kernels.select_chunks.triton import select_chunks as impl

        return impl(scores, landmark_ids, page_table, num_select, prev_ids)
    return select_chunks_ref(scores, landmark_ids, page_table, num_select, prev_ids)


def select_chunks_inplace(
    scores: torch.Tensor,
    landmark_ids: torch.Tensor,
    page_table: torch.Tensor,
    num_select: torch.Tensor,
    state: torch.Tensor,
    rows: torch.Tensor,
    num_slots: int,
    primed: torch.Tensor,
    counters: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slot_ids [B, Hkv, K] int32, miss [B, Hkv, K] bool)`` with ``K = num_slots``; updates
    ``state[rows, :, :K]`` and ``counters`` in place. See ``reference.select_chunks_inplace``."""
    K = int(num_slots)
    _check_common(scores, landmark_ids, page_table, num_select, K)
    B, Hkv, _ = scores.shape
    if state.dim() != 3 or state.shape[1] != Hkv or state.shape[2] < K:
        raise ValueError(
            f"state must be [rows_total, Hkv={Hkv}, Kmax >= K={K}], got {tuple(state.shape)}"
        )
    if tuple(rows.shape) != (B,) or tuple(primed.shape) != (B,):
        raise ValueError(
            f"rows and primed must be [B={B}], got {tuple(rows.shape)}, {tuple(primed.shape)}"
        )
    if tuple(counters.shape) != (2,):
        raise ValueError(f"counters must be [2] (hits, used), got {tuple(counters.shape)}")
    if K < 0:
        raise ValueError(f"K={K} must not be negative")
    args = (scores, landmark_ids, page_table, num_select, state, rows, K, primed, counters)
    if use_triton(scores, "select_chunks"):
        from shadowkv.kernels.select_chunks.triton import select_chunks_inplace as impl

        return impl(*args)
    return select_chunks_inplace_ref(*args)
