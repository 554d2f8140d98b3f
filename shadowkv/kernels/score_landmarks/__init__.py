"""``score_landmarks``: per-query softmax over its landmarks, max over each GQA group."""

from __future__ import annotations

import torch

from shadowkv.kernels._dispatch import use_triton
from shadowkv.kernels.score_landmarks.reference import score_landmarks as score_landmarks_ref

__all__ = ["score_landmarks", "score_landmarks_ref"]


def score_landmarks(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    page_table: torch.Tensor,
    num_landmarks: torch.Tensor,
    scale: float,
    landmark_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, Hkv, max_pages * Pc]`` float32 scores; see ``reference.score_landmarks``.
    fp8 landmarks are ``uint8`` e4m3 codes with ``landmark_scales [pages, Pc, Hkv]`` float32."""
    if q.dim() != 3 or landmarks.dim() != 4:
        raise ValueError(
            f"score_landmarks wants q [B, H, D] and landmarks [pages, Pc, Hkv, D], got "
            f"{tuple(q.shape)} and {tuple(landmarks.shape)}"
        )
    B, H, D = q.shape
    if landmarks.shape[3] != D or H % landmarks.shape[2]:
        raise ValueError(
            f"landmarks {tuple(landmarks.shape)} do not match q {tuple(q.shape)}: head dims must "
            "agree and query heads must be a multiple of KV heads"
        )
    s = landmark_scales
    if (s is not None) != (landmarks.dtype == torch.uint8) or (
        s is not None and (s.shape != landmarks.shape[:3] or s.dtype != torch.float32)
    ):
        got = None if s is None else (s.dtype, tuple(s.shape))
        raise ValueError(
            "fp8 landmarks are uint8 codes with float32 scales [pages, Pc, Hkv] beside them; got "
            f"{landmarks.dtype} landmarks {tuple(landmarks.shape)} and scales {got}"
        )
    if page_table.shape[0] != B or num_landmarks.shape != (B,):
        raise ValueError(f"page_table and num_landmarks must have {B} rows, one per sequence")
    if use_triton(q, "score_landmarks"):
        from shadowkv.kernels.score_landmarks.triton import score_landmarks as impl

        return impl(q, landmarks, page_table, num_landmarks, scale, landmark_scales)
    return score_landmarks_ref(q, landmarks, page_table, num_landmarks, scale, landmark_scales)
