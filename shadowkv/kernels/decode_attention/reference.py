"""Decode attention over a paged cache, in plain PyTorch (the CPU path and the kernels' oracle).

``q [B, H, D]``; ``k_cache, v_cache [num_blocks, S, Hkv, D]`` (``S`` rows per block);
``block_table [B, max_blocks]`` (int) names each sequence's blocks in order; ``seq_lens [B]`` the
number of valid rows per sequence. Rows past ``seq_lens`` are never read, whatever they hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Softmax attention of each ``q[b]`` over its sequence's first ``seq_lens[b]`` cached rows.

    Query head ``h`` reads KV head ``h // (H // Hkv)``. Returns ``[B, H, D]`` in ``q``'s dtype.
    """
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    # fp32 math for low-precision inputs; float64 inputs (the oracle's) stay float64.
    compute = torch.promote_types(q.dtype, torch.float32)
    k_rows = k_cache.view(-1, Hkv, D)  # [num_blocks * S, Hkv, D]
    v_rows = v_cache.view(-1, Hkv, D)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        rows = _rows(block_table[b], n, S)
        k, v = k_rows[rows], v_rows[rows]  # [n, Hkv, D]
        # SDPA's fused kernel reads the [Hkv, n, D] views in place.
        out[b] = F.scaled_dot_product_attention(
            q[b, None, :, None].to(compute),
            k.transpose(0, 1)[None].to(compute),
            v.transpose(0, 1)[None].to(compute),
            scale=scale,
            enable_gqa=H != Hkv,
        )[0, :, 0]
    return out


def _rows(blocks: torch.Tensor, n: int, S: int) -> slice | torch.Tensor:
    """Flat cache rows of one sequence's first ``n`` tokens: a slice when its blocks are
    consecutive (the pools hand blocks out in order), so the K/V are read in place rather than
    gathered; an index tensor otherwise."""
    num_blocks = -(-n // S)
    ids = blocks[:num_blocks].long()
    if num_blocks <= 1 or bool((ids[1:] - ids[:-1] == 1).all()):
        start = int(ids[0]) * S if num_blocks else 0
        return slice(start, start + n)
    return (ids[:, None] * S + torch.arange(S, device=ids.device)).flatten()[:n]
