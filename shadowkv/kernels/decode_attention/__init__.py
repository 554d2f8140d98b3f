"""``decode_attention``: one query token per sequence over a paged KV cache."""

from __future__ import annotations

import torch

from shadowkv.kernels._dispatch import use_triton
from shadowkv.kernels.decode_attention.reference import decode_attention as decode_attention_ref


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of ``q [B, H, D]`` over each sequence's first ``seq_lens[b]`` cached rows."""
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
    assert q.shape[1] % k_cache.shape[2] == 0, "query heads must be a multiple of KV heads"
    if use_triton(q):
        from shadowkv.kernels.decode_attention.triton import decode_attention as impl

        return impl(q, k_cache, v_cache, block_table, seq_lens, scale)
    return decode_attention_ref(q, k_cache, v_cache, block_table, seq_lens, scale)
