"""Landmark scores for chunk selection, in plain PyTorch (the CPU path and the kernels' oracle).

Shapes: ``B`` sequences, ``H`` query heads, ``Hkv`` KV heads, ``G = H // Hkv``, ``D`` head dim,
``Pc`` landmarks per page, ``N = max_pages * Pc`` padded landmark count.
"""

from __future__ import annotations

import torch

from shadowkv.kernels.fp8 import fp8_to_float


def score_landmarks(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    page_table: torch.Tensor,
    num_landmarks: torch.Tensor,
    scale: float,
    landmark_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-KV-head importance of every landmark for one query token per sequence.

    Args:
        q: ``[B, H, D]`` post-RoPE queries (any float dtype).
        landmarks: ``[num_pages, Pc, Hkv, D]`` paged chunk means (post-RoPE keys), any float dtype.
            Landmark ``n`` of sequence ``b`` is ``landmarks[page_table[b, n // Pc], n % Pc]``.
        page_table: ``[B, max_pages]`` int32 page ids; every entry must be a valid page index
            (entries past a sequence's pages are read but masked).
        num_landmarks: ``[B]`` int32, landmarks per sequence, ``<= max_pages * Pc`` (0 allowed).
        scale: softmax scale, ``1 / sqrt(D)``.
        landmark_scales: for fp8 landmarks (``uint8`` e4m3 codes), ``[num_pages, Pc, Hkv]``
            float32, one per landmark: ``L = code * scale``.

    Returns:
        ``[B, Hkv, N]`` float32, ``N = max_pages * Pc``: for ``n < num_landmarks[b]``,
        ``max_g softmax_n(scale * q[b, h*G + g] . L[b, n, h])`` with the softmax over that
        sequence's landmarks only; ``-inf`` for ``n >= num_landmarks[b]``.
    """
    B, H, D = q.shape
    Pc, Hkv = landmarks.shape[1], landmarks.shape[2]
    G = H // Hkv
    N = page_table.shape[1] * Pc
    lm = landmarks[page_table.long()].reshape(B, N, Hkv, D)
    if landmark_scales is not None:
        s = landmark_scales[page_table.long()].reshape(B, N, Hkv, 1)
        lm = fp8_to_float(lm) * s
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("bhgd,bnhd->bhgn", q.to(acc).view(B, Hkv, G, D), lm.to(acc)) * scale
    valid = torch.arange(N, device=q.device)[None, :] < num_landmarks.to(q.device).long()[:, None]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    # A sequence without landmarks softmaxes over nothing (NaN); the final mask overwrites it.
    scores = torch.softmax(logits, dim=-1).amax(dim=2)  # [B, Hkv, N]
    return scores.masked_fill(~valid[:, None, :], float("-inf")).float()
