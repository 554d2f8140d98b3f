"""``silu_mul``: SwiGLU's ``silu(gate) * up`` of the fused gate/up projection, in one launch on
the Triton path (instead of ``silu`` and ``mul``)."""

from __future__ import annotations

import torch

from shadowkv.kernels._dispatch import use_triton
from shadowkv.kernels.silu_mul.reference import silu_mul as silu_mul_ref

__all__ = ["silu_mul", "silu_mul_ref"]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` with ``gate, up = gate_up.chunk(2, dim=-1)``.

    Args:
        gate_up: ``[..., 2 * I]`` (e.g. ``[T, 2 * I]``), floating point, gate first.

    Returns:
        ``[..., I]`` in ``gate_up``'s dtype.
    """
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul wants gate_up [..., 2 * I], got {tuple(gate_up.shape)}")
    if not gate_up.is_floating_point():
        raise ValueError(f"gate_up must be floating point, got {gate_up.dtype}")
    if use_triton(gate_up, "silu_mul"):
        from shadowkv.kernels.silu_mul.triton import silu_mul as impl

        return impl(gate_up)
    return silu_mul_ref(gate_up)
