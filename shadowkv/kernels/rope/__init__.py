"""``apply_rope``: rotary position embeddings for queries and keys, both pairing styles.

Tables are ``[rows, Dr/2]`` (one column per frequency); see ``reference.py`` for the conventions.
"""

from __future__ import annotations

import torch

from shadowkv.kernels._dispatch import use_triton
from shadowkv.kernels.rope.reference import ROPE_STYLES, check_style, rotate
from shadowkv.kernels.rope.reference import apply_rope as apply_rope_ref
from shadowkv.kernels.rope.tables import RopeTables

__all__ = ["ROPE_STYLES", "RopeTables", "apply_rope", "apply_rope_ref", "rotate"]


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "neox"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_rot, k_rot)``, new tensors in the inputs' dtypes; see ``reference.apply_rope``.

    Args:
        q: ``[T, H, D]`` queries.
        k: ``[T, Hkv, D]`` keys (kept pre-RoPE by the caller: the result is a copy).
        cos, sin: ``[T, Dr/2]`` table rows at each token's position; ``Dr`` even, ``<= D``.
        style: ``"neox"`` or ``"interleaved"``.
    """
    check_style(style)
    if q.dim() != 3 or k.dim() != 3 or cos.dim() != 2:
        raise ValueError(
            f"apply_rope wants q [T, H, D], k [T, Hkv, D] and cos/sin [T, Dr/2], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos.shape)}"
        )
    T, _, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k {tuple(k.shape)} must be [T={T}, Hkv, D={D}] like q")
    if sin.shape != cos.shape or cos.shape[0] != T:
        raise ValueError(
            f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be [T={T}, Dr/2]"
        )
    Dr = 2 * cos.shape[1]
    if not 0 < Dr <= D:
        raise ValueError(f"rotary dims Dr = 2 * {cos.shape[1]} = {Dr} must be in (0, D={D}]")
    if not (cos.is_floating_point() and sin.is_floating_point()):
        raise ValueError(f"RoPE tables must be floating point, got {cos.dtype}, {sin.dtype}")
    if use_triton(q, "rope"):
        from shadowkv.kernels.rope.triton import apply_rope as impl

        return impl(q, k, cos, sin, style)
    return apply_rope_ref(q, k, cos, sin, style)
