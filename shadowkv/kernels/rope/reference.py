"""Rotary position embeddings in plain PyTorch (CPU path and oracle); any head dim, both styles.

Tables hold one column per frequency: ``cos, sin`` are ``[..., Dr/2]`` for ``Dr`` rotary dims
(even, ``Dr <= D``); dims ``[Dr, D)`` pass through unchanged ("partial rotary"). The style names
which two dims of ``x [..., D]`` form pair ``i`` (``i < Dr/2``):

* ``"neox"`` (rotate-half; Llama, Qwen, Mistral): ``(x[i], x[i + Dr/2])``;
* ``"interleaved"`` (GPT-J, GLM): ``(x[2i], x[2i + 1])``.

Each pair ``(x1, x2)`` turns by its angle: ``(x1 * c - x2 * s, x2 * c + x1 * s)``.
"""

from __future__ import annotations

import torch

ROPE_STYLES = ("neox", "interleaved")


def check_style(style: str) -> None:
    if style not in ROPE_STYLES:
        raise ValueError(f"RoPE style must be one of {ROPE_STYLES}, got {style!r}")


def rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "neox"
) -> torch.Tensor:
    """Rotate the first ``Dr = 2 * cos.shape[-1]`` dims of ``x [..., D]`` pairwise; copy the rest.

    ``cos, sin`` broadcast to ``[..., Dr/2]``. Computed in ``promote_types(x.dtype, cos.dtype)``
    and returned in ``x``'s dtype. For neox and ``Dr == D`` this equals the duplicated-table form
    ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`` bit for bit (``a + (-b) == a - b``).
    """
    check_style(style)
    half, D = cos.shape[-1], x.shape[-1]
    if 2 * half > D:
        raise ValueError(f"the tables rotate {2 * half} dims, more than the head dim {D}")
    compute = torch.promote_types(x.dtype, cos.dtype)
    xf, c, s = x.to(compute), cos.to(compute), sin.to(compute)
    if style == "neox":
        x1, x2 = xf[..., :half], xf[..., half : 2 * half]
    else:
        x1, x2 = xf[..., 0 : 2 * half : 2], xf[..., 1 : 2 * half : 2]
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    if style == "neox":
        out = torch.cat([o1, o2], dim=-1)
    else:
        out = torch.stack([o1, o2], dim=-1).flatten(-2)
    if 2 * half < D:
        out = torch.cat([out, xf[..., 2 * half :]], dim=-1)
    return out.to(x.dtype)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "neox"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of ``q [T, H, D]`` and ``k [T, Hkv, D]``; ``cos, sin [T, Dr/2]`` are the
    table rows at each token's position. The inputs are left untouched."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return rotate(q, cos, sin, style), rotate(k, cos, sin, style)
