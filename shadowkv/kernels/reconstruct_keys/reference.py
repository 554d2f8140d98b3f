"""Rebuild selected chunks' keys from low-rank factors, in plain PyTorch (CPU path and oracle).

Shapes: ``B`` sequences, ``Hkv`` KV heads, ``K`` slots, ``C`` chunk size, ``R`` rank, ``D`` head
dim (``Dr <= D`` of them rotary), ``P`` tokens per factor page, ``S`` rows per cache block, ``G``
prompt segments (each with its own key basis) per sequence at most.
"""

from __future__ import annotations

import torch

from shadowkv.kernels.rope.reference import rotate


def reconstruct_keys(
    k_cache: torch.Tensor,
    a_pages: torch.Tensor,
    page_table: torch.Tensor,
    w_t: torch.Tensor,
    seg_basis: torch.Tensor,
    seg_starts: torch.Tensor,
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

        g   = (seg_starts[b] <= t).sum() - 1                               # t's segment
        a   = a_pages[page_table[b, t // P], t % P]                       # [R]
        k   = a @ w_t[seg_basis[b, g], :, h*D:(h+1)*D]                     # [D], fp32 accumulate
        k   = rope.reference.rotate(k, cos[t], sin[t], style)              # dims >= Dr unchanged
        k_cache.view(-1, Hkv, D)[dst_rows[b, s*C + j], h] = k              # cast to cache dtype

    Nothing else is written: hit slots keep the keys rebuilt at an earlier step. The reference
    finds the misses with ``nonzero`` (a host sync on CUDA); kernels skip hit tiles without one.

    Args:
        k_cache: ``[num_blocks, S, Hkv, D]`` paged key buffer, written in place.
        a_pages: ``[num_pages, P, R]`` left factors ``A = K_pre W`` of every prompt token, paged.
        page_table: ``[B, max_pages]`` int32 factor pages of each sequence, in token order.
        w_t: ``[num_rows, R, Hkv * D]`` right factors ``W^T``, one row per key basis.
        seg_basis: ``[B, G]`` int32 or int64, the row of ``w_t`` holding the basis of each of the
            sequence's (at most ``G``) prompt segments; the ``A`` rows of a segment are factors
            in that segment's basis. Entries of segments that own no token are never read.
        seg_starts: ``[B, G]`` int32 first token of each segment, ascending per sequence, with
            ``seg_starts[b, 0] == 0`` (segment 0 owns every token before ``seg_starts[b, 1]``
            whatever it holds); unused trailing segments start past every token (e.g. int32
            max). Token ``t`` is in segment ``(seg_starts[b] <= t).sum() - 1``.
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
    # Segment of every row (segment 0 also owns anything before its nominal start 0).
    seg = ((seg_starts[b][:, None, :] <= tok[:, :, None]).sum(-1) - 1).clamp_(min=0)  # [M, C]
    acc = torch.promote_types(a_pages.dtype, torch.float32)
    w_heads = w_t.view(-1, R, Hkv, D)
    k = torch.zeros(tok.shape[0], C, D, dtype=acc, device=dev)
    for g in range(seg_basis.shape[1]):
        # One bmm per segment over the slots holding any of its rows, other rows' A zeroed.
        own = seg == g
        idx = own.any(1).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        w = w_heads[seg_basis[b[idx], g].long(), :, h[idx]]  # [m, R, D]
        a_g = torch.where(own[idx, :, None], a[idx], 0).to(acc)
        k.index_add_(0, idx, torch.bmm(a_g, w.to(acc)))
    k = rotate(k, cos[tok], sin[tok], style)
    rows = dst_rows[b[:, None], s[:, None] * C + j]  # [M, C]
    k_cache.view(-1, Hkv, D)[rows, h[:, None].expand(-1, C)] = k.to(k_cache.dtype)
