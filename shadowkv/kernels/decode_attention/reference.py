"""Decode attention over a paged cache, in plain PyTorch (the CPU path and the kernels' oracle).

``q [B, H, D]``; ``k_cache, v_cache [num_blocks, S, Hkv, D]`` (``S`` rows per block);
``block_table [B, max_blocks]`` (int) names each sequence's blocks in order; ``seq_lens [B]`` the
number of valid rows per sequence. Rows past ``seq_lens`` are ignored, whatever they hold.
"""

from __future__ import annotations

import torch


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    max_len = int(seq_lens.max()) if B else 0
    num_blocks = (max_len + S - 1) // S
    blocks = block_table[:, :num_blocks].long()
    k = k_cache[blocks].reshape(B, num_blocks * S, Hkv, D)[:, :max_len]  # [B, L, Hkv, D]
    v = v_cache[blocks].reshape(B, num_blocks * S, Hkv, D)[:, :max_len]
    qf = q.float().view(B, Hkv, G, D)
    scores = torch.einsum("bhgd,blhd->bhgl", qf, k.float()) * scale  # [B, Hkv, G, L]
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None].to(q.device)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Rows past seq_lens may hold NaN/inf (pools are torch.empty): a zero weight would not cancel them.
    v = v.float().masked_fill(~valid[:, :, None, None], 0.0)
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return out.reshape(B, H, D).to(q.dtype)
