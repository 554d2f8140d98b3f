"""``select_chunks``: top-k chunks per (sequence, KV head), hits keep their buffer slots."""

from __future__ import annotations

import torch

from shadowkv.kernels._dispatch import use_triton
from shadowkv.kernels.select_chunks.reference import select_chunks as select_chunks_ref

__all__ = ["select_chunks", "select_chunks_ref"]


def select_chunks(
    scores: torch.Tensor,
    landmark_ids: torch.Tensor,
    page_table: torch.Tensor,
    num_select: torch.Tensor,
    prev_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slot_ids [B, Hkv, K] int32, miss [B, Hkv, K] bool)``; see ``reference.select_chunks``."""
    if scores.dim() != 3 or landmark_ids.dim() != 3 or prev_ids.dim() != 3:
        raise ValueError(
            "select_chunks wants scores [B, Hkv, N], landmark_ids [pages, Pc, Hkv] and prev_ids "
            f"[B, Hkv, K], got {tuple(scores.shape)}, {tuple(landmark_ids.shape)}, "
            f"{tuple(prev_ids.shape)}"
        )
    B, Hkv, N = scores.shape
    if prev_ids.shape[:2] != (B, Hkv) or landmark_ids.shape[2] != Hkv:
        raise ValueError(f"prev_ids and landmark_ids must have B={B} / Hkv={Hkv} like the scores")
    if page_table.shape[1] * landmark_ids.shape[1] != N:
        raise ValueError(
            f"scores cover N={N} landmarks but page_table {tuple(page_table.shape)} x "
            f"{landmark_ids.shape[1]} per page does not"
        )
    if prev_ids.shape[2] > N:
        raise ValueError(f"K={prev_ids.shape[2]} slots exceed the N={N} landmark columns")
    if use_triton(scores, "select_chunks"):
        from shadowkv.kernels.select_chunks.triton import select_chunks as impl

        return impl(scores, landmark_ids, page_table, num_select, prev_ids)
    return select_chunks_ref(scores, landmark_ids, page_table, num_select, prev_ids)
