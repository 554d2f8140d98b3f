"""Causal prefill attention over packed segments, in plain PyTorch (the CPU path and the oracle).

``q [sum Tq, H, D]``; ``k, v [sum Tk, Hkv, D]``; segment ``i`` owns query rows
``cu_seqlens_q[i] .. cu_seqlens_q[i + 1]`` and key rows ``cu_seqlens_k[i] .. cu_seqlens_k[i + 1]``
with ``Tk_i >= Tq_i``: its queries are the last ``Tq_i`` of its keys' tokens, so query ``j`` sees
keys ``[0, Tk_i - Tq_i + j]`` (causal aligned to the lower right, as a prefill chunk attends over
the prompt's earlier tokens and itself). Query head ``h`` reads KV head ``h // (H // Hkv)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

# Off CUDA a lower-right causal bias is materialised as a float ``[T, S]`` mask: queries go in
# blocks of rows so it holds at most this many elements (64 MiB).
MASK_ELEMENTS = 1 << 24


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Sequence[int],
    cu_seqlens_k: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """Each segment's ``causal_attention``, concatenated: ``[sum Tq, H, D]`` in ``q``'s dtype.

    The bounds are host integers (a loop over segments needs them on the host anyway)."""
    bounds = zip(cu_seqlens_q, cu_seqlens_q[1:], cu_seqlens_k, cu_seqlens_k[1:])
    outs = [causal_attention(q[a:b], k[c:d], v[c:d], scale) for a, b, c, d in bounds]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Exact causal attention of a prompt chunk: ``q [T, H, D]``, ``k, v [S, Hkv, D]`` with
    ``S >= T`` (the last ``T`` keys are the queries' own tokens) -> ``[T, H, D]``.

    Query ``i`` sees keys ``[0, S - T + i]`` (causal aligned to the lower right). With ``S == T``
    SDPA's causal path runs without an explicit mask, so the CPU and CUDA flash kernels tile the
    score matrix instead of materialising ``[H, T, T]``; with ``S > T`` a lower-right causal
    bias, which CUDA's flash and memory-efficient kernels take without a mask tensor (elsewhere
    it becomes a mask, bounded by blocks of query rows).
    """
    T, S = q.shape[0], k.shape[0]
    if S < T:
        raise ValueError(f"{T} queries need at least as many keys, got {S}")
    if S == T:
        return _sdpa(q, k, v, scale, is_causal=True)
    rows = T if q.device.type == "cuda" else max(1, MASK_ELEMENTS // S)
    if rows >= T:
        return _sdpa(q, k, v, scale, attn_mask=causal_lower_right(T, S))
    out = torch.empty_like(q)
    off = S - T  # query row i is key i + off
    for s in range(0, T, rows):
        e = min(T, s + rows)  # rows [s, e) see keys [0, off + e), lower-right aligned
        out[s:e] = _sdpa(q[s:e], k[: off + e], v[: off + e], scale,
                         attn_mask=causal_lower_right(e - s, off + e))
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **mask: Any
          ) -> torch.Tensor:
    # 4-D inputs: SDPA's flash kernels refuse 3-D ones and fall back to the math path, which
    # materialises the [H, T, T] scores (128 GiB for Llama-3.1-8B at 32K).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        **mask,
    )
    return out[0].transpose(0, 1)
