"""Rebuild selected chunks' keys from low-rank factors, in plain PyTorch (CPU path and oracle).

Shapes: ``B`` sequences, ``Hkv`` KV heads, ``K`` slots, ``C`` chunk size, ``R`` rank, ``D`` head
dim (``Dr <= D`` of them rotary), ``P`` tokens per factor page, ``S`` rows per cache block.
"""

from __future__ import annotations

import torch

from shadowkv.kernels.rope.reference import rotate


def reconstruct_keys(
    k_cache: torch.Tensor,
    a_pages: torch.Tensor,
    page_table: torch.Tensor,
    w_t: torch.Tensor,
    basis_rows: torch.Tensor,
    slot_ids: torch.Tensor,
    miss: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dst_rows: torch.Tensor,
    chunk_size: int,
    style: str = "neox",
) -> None:
    """Write ``RoPE(A[t] @ Wt[:, head], t)`` into the cache rows of missed slots.

    For every ``(b, h, s)`` with ``miss[b, h, s]`` and every ``j < C``, with chunk
    ``c = slot_ids[b, h, s]`` and token ``t = c * C + j``::

        a   = a_pages[page_table[b, t // P], t % P]                       # [R]
        k   = a @ w_t[basis_rows[b], :, h*D:(h+1)*D]                       # [D], fp32 accumulate
        k   = rope.reference.rotate(k, cos[t], sin[t], style)              # dims >= Dr unchanged
        k_cache.view(-1, Hkv, D)[dst_rows[b, s*C + j], h] = k              # cast to cache dtype

    Nothing else is written: hit slots keep the keys rebuilt at an earlier step. The reference
    finds the misses with ``nonzero`` (a host sync on CUDA); kernels skip hit tiles without one.

    Args:
        k_cache: ``[num_blocks, S, Hkv, D]`` paged key buffer, written in place.
        a_pages: ``[num_pages, P, R]`` left factors ``A = K_pre W`` of every prompt token, paged.
        page_table: ``[B, max_pages]`` int32 factor pages of each sequence, in token order.
        w_t: ``[num_rows, R, Hkv * D]`` right factors ``W^T``, one row per sequence slot.
        basis_rows: ``[B]`` int, the row of ``w_t`` holding this sequence's basis.
        slot_ids: ``[B, Hkv, K]`` int32 chunk id per slot (``-1`` = unused) from ``select_chunks``.
        miss: ``[B, Hkv, K]`` bool, the slots to write.
        cos, sin: ``[max_position, Dr/2]`` RoPE tables, one column per frequency, indexed by
            position; ``Dr <= D`` rotary dims (``Dr < D``: dims ``[Dr, D)`` pass through).
        dst_rows: ``[B, K * C]`` int64 flat row (``block * S + offset``) of slot ``s``'s ``j``-th
            token at index ``s * C + j``; ``-1`` for unused slots.
        chunk_size: ``C``.
        style: RoPE pairing, ``"neox"`` or ``"interleaved"`` (see ``kernels/rope``).
    """
    Hkv, C, D = slot_ids.shape[1], chunk_size, k_cache.shape[-1]
    P, R = a_pages.shape[1], a_pages.shape[2]
    dev = k_cache.device
    # Only the missed slots: M = number of misses (a data-dependent size, fine for the reference).
    b, h, s = miss.nonzero(as_tuple=True)
    j = torch.arange(C, device=dev)
    tok = slot_ids[b, h, s].long()[:, None] * C + j  # [M, C]
    page = page_table.long()[b[:, None], tok // P]
    a = a_pages.reshape(-1, R)[page * P + tok % P]  # [M, C, R]
    w = w_t.view(-1, R, Hkv, D)[basis_rows.long()[b], :, h]  # [M, R, D]
    acc = torch.promote_types(a_pages.dtype, torch.float32)
    k = torch.bmm(a.to(acc), w.to(acc))  # [M, C, D]
    k = rotate(k, cos[tok], sin[tok], style)
    rows = dst_rows[b[:, None], s[:, None] * C + j]  # [M, C]
    k_cache.view(-1, Hkv, D)[rows, h[:, None].expand(-1, C)] = k.to(k_cache.dtype)
