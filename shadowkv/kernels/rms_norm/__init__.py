"""``rms_norm``: RMSNorm with the residual add fused in front (one launch on the Triton path).

A decoder layer calls it as ``normed, h = rms_norm(x, w, eps, residual=h)``: ``h`` is the
residual stream (``x + residual``) and ``normed`` feeds the next sublayer.
"""

from __future__ import annotations

import torch

from shadowkv.kernels._dispatch import use_triton
from shadowkv.kernels.rms_norm.reference import rms_norm as rms_norm_ref

__all__ = ["MAX_TRITON_HIDDEN", "rms_norm", "rms_norm_ref"]

MAX_TRITON_HIDDEN = 16384  # wider rows take the reference (kept equal to triton.MAX_HIDDEN)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, h)`` with ``h = x + residual`` (``x`` itself without one) and
    ``out = weight * rmsnorm(h)``; see ``reference.rms_norm``.

    Args:
        x: ``[..., hidden]`` (e.g. ``[T, hidden]``), floating point.
        weight: ``[hidden]``, fp32 or ``x``'s dtype.
        eps: added to the mean square before the ``rsqrt``.
        residual: ``[..., hidden]``, same shape and dtype as ``x``, or ``None``.

    Returns:
        ``out`` and ``h``, both ``[..., hidden]`` in ``x``'s dtype.
    """
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm wants x [..., hidden] and weight [hidden], got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"x and weight must be floating point, got {x.dtype}, {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} must have x's shape and dtype "
            f"{tuple(x.shape)} {x.dtype}"
        )
    if use_triton(x, "rms_norm") and x.shape[-1] <= MAX_TRITON_HIDDEN:
        from shadowkv.kernels.rms_norm.triton import rms_norm as impl

        return impl(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
