"""Rebuild selected chunks' keys from low-rank factors, in plain PyTorch (CPU path and oracle).

Shapes: ``B`` sequences, ``Hkv`` KV heads, ``K`` slots, ``C`` chunk size, ``R`` rank, ``D`` head
dim, ``P`` tokens per factor page, ``S`` rows per cache block.
"""

from __future__ import annotations

import torch


def reconstruct_keys(
    k_cache: torch.Tensor,
    a_pages: torch.Tensor,
    page_table: torch.Tensor,
    w_t: torch.Tensor,
    seq_rows: torch.Tensor,
    slot_ids: torch.Tensor,
    miss: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dst_rows: torch.Tensor,
    chunk_size: int,
) -> None:
    """Write ``RoPE(A[t] @ Wt[:, head], t)`` into the cache rows of missed slots.

    For every ``(b, h, s)`` with ``miss[b, h, s]`` and every ``j < C``, with chunk
    ``c = slot_ids[b, h, s]`` and token ``t = c * C + j``::

        a   = a_pages[page_table[b, t // P], t % P]                       # [R]
        k   = a @ w_t[seq_rows[b], :, h*D:(h+1)*D]                         # [D], fp32 accumulate
        k   = k * cos[t] + rotate_half(k) * sin[t]                         # neox layout
        k_cache.view(-1, Hkv, D)[dst_rows[b, s*C + j], h] = k              # cast to cache dtype

    Nothing else is written: hit slots keep the keys rebuilt at an earlier step.

    Args:
        k_cache: ``[num_blocks, S, Hkv, D]`` paged key buffer, written in place.
        a_pages: ``[num_pages, P, R]`` left factors ``A = K_pre W`` of every prompt token, paged.
        page_table: ``[B, max_pages]`` int32 factor pages of each sequence, in token order.
        w_t: ``[num_rows, R, Hkv * D]`` right factors ``W^T``, one row per sequence slot.
        seq_rows: ``[B]`` int row of ``w_t`` for each sequence.
        slot_ids: ``[B, Hkv, K]`` int32 chunk id per slot (``-1`` = unused) from ``select_chunks``.
        miss: ``[B, Hkv, K]`` bool, the slots to write.
        cos, sin: ``[max_position, D]`` RoPE tables (``RotaryEmbedding.cos`` / ``.sin``).
        dst_rows: ``[B, K * C]`` int64 flat row (``block * S + offset``) of slot ``s``'s ``j``-th
            token at index ``s * C + j``; ``-1`` for unused slots.
        chunk_size: ``C``.
    """
    B, Hkv, K = slot_ids.shape
    C, D = chunk_size, k_cache.shape[-1]
    P, R = a_pages.shape[1], a_pages.shape[2]
    dev = k_cache.device
    tok = slot_ids.clamp_min(0).long()[..., None] * C + torch.arange(C, device=dev)  # [B, Hkv, K, C]
    page = page_table.long().gather(1, (tok // P).reshape(B, -1)).view_as(tok)
    a = a_pages.reshape(-1, R)[page * P + tok % P]  # [B, Hkv, K, C, R]
    w = w_t[seq_rows.long()].view(B, R, Hkv, D)
    acc = torch.promote_types(a_pages.dtype, torch.float32)
    k = torch.einsum("bhkcr,brhd->bhkcd", a.to(acc), w.to(acc))
    c, s = cos[tok].to(acc), sin[tok].to(acc)
    half = D // 2
    k = k * c + torch.cat([-k[..., half:], k[..., :half]], dim=-1) * s
    write = miss[..., None].expand(B, Hkv, K, C)
    rows = dst_rows.view(B, 1, K, C).expand(B, Hkv, K, C)
    heads = torch.arange(Hkv, device=dev).view(1, Hkv, 1, 1).expand(B, Hkv, K, C)
    k_cache.view(-1, Hkv, D)[rows[write], heads[write]] = k[write].to(k_cache.dtype)
