"""``varlen_attention``: lower-right causal attention over packed prefill segments."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shadowkv.kernels._dispatch import use_triton
from shadowkv.kernels.varlen_attention.reference import varlen_attention as varlen_attention_ref

# The Triton kernel is sized for head dims up to 128 (a [64, D] fp32 accumulator per program);
# wider heads (Gemma-3's 256) take the reference, SDPA's own kernels on CUDA.
MAX_TRITON_HEAD_DIM = 128


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Sequence[int],
    cu_seqlens_k: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """``q [sum Tq, H, D]`` over ``k, v [sum Tk, Hkv, D]``, segment ``i`` being query rows
    ``[cu_seqlens_q[i], cu_seqlens_q[i + 1])`` and key rows ``[cu_seqlens_k[i], cu_seqlens_k[i +
    1])``, its queries the last of its keys' tokens -> ``[sum Tq, H, D]``. The bounds are host
    integers (``(0, T_0, T_0 + T_1, ...)``), which the caller knows without a device read."""
    check_bounds(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if q.shape[2] <= MAX_TRITON_HEAD_DIM and use_triton(q, "varlen_attention"):
        from shadowkv.kernels.varlen_attention.triton import varlen_attention as impl

        cu_q, cu_k = _device_bounds(cu_seqlens_q, cu_seqlens_k, q.device)
        lengths = [b - a for a, b in zip(cu_seqlens_q, cu_seqlens_q[1:])]
        return impl(q, k, v, cu_q, cu_k, max(lengths, default=0), scale)
    return varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)


def check_bounds(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Sequence[int],
    cu_seqlens_k: Sequence[int],
) -> None:
    """Refuse bounds that do not describe ``q`` and ``k, v`` (host integers only: no sync)."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"q must be [sum Tq, H, D] and k, v [sum Tk, Hkv, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads "
                         f"({k.shape[1]})")
    if len(cu_seqlens_q) != len(cu_seqlens_k) or len(cu_seqlens_q) < 2:
        raise ValueError("cu_seqlens_q and cu_seqlens_k need one bound per segment plus one "
                         f"(got {len(cu_seqlens_q)} and {len(cu_seqlens_k)})")
    if cu_seqlens_q[0] or cu_seqlens_k[0] or cu_seqlens_q[-1] != q.shape[0] or (
        cu_seqlens_k[-1] != k.shape[0]
    ):
        raise ValueError(
            f"the bounds must run from 0 to the packed rows: q has {q.shape[0]} rows and k "
            f"{k.shape[0]}, the bounds end at {cu_seqlens_q[-1]} and {cu_seqlens_k[-1]}"
        )
    spans = zip(cu_seqlens_q, cu_seqlens_q[1:], cu_seqlens_k, cu_seqlens_k[1:])
    for i, (a, b, c, d) in enumerate(spans):
        if not 1 <= b - a <= d - c:
            raise ValueError(
                f"segment {i} has {b - a} queries and {d - c} keys; each needs 1 <= queries <= "
                "keys (its queries are the last of its keys' tokens)"
            )


def _device_bounds(
    cu_q: Sequence[int], cu_k: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both bounds as int32 tensors on ``device`` in one copy (pinned, so it does not block)."""
    host = torch.tensor([list(cu_q), list(cu_k)], dtype=torch.int32)
    if device.type == "cuda":
        host = host.pin_memory()
    both = host.to(device, non_blocking=True)
    return both[0], both[1]
