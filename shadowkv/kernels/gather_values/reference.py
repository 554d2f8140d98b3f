"""Fetch selected chunks' values from the value store, in plain PyTorch (CPU path and oracle).

Shapes: ``B`` sequences, ``Hkv`` KV heads, ``K`` slots, ``C`` chunk size, ``D`` head dim, ``Pc``
chunks per store page, ``S`` rows per cache block.
"""

from __future__ import annotations

import torch

from shadowkv.kernels.fp8 import fp8_to_float


def gather_values(
    v_cache: torch.Tensor,
    store: torch.Tensor,
    store_table: torch.Tensor,
    slot_ids: torch.Tensor,
    miss: torch.Tensor,
    dst_rows: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> None:
    """Copy each missed slot's chunk of values from the store into the cache rows.

    For every ``(b, h, s)`` with ``miss[b, h, s]``, chunk ``c = slot_ids[b, h, s]`` and ``j < C``::

        row = store[store_table[b, c // Pc], c % Pc, h]                    # [C * D], contiguous
        v_cache.view(-1, Hkv, D)[dst_rows[b, s*C + j], h] = row.view(C, D)[j]

    Args:
        v_cache: ``[num_blocks, S, Hkv, D]`` paged value buffer on the compute device, written in
            place.
        store: ``[num_pages, Pc, Hkv, C * D]`` one layer of one value-store tier (host memory,
            pinned on CUDA; or the compute device's memory), in its own float dtype (converted
            to ``v_cache``'s as the rows land).
        store_table: ``[B, max_pages]`` int32 store pages of each sequence, in chunk order.
        slot_ids: ``[B, Hkv, K]`` int32 chunk id per slot (``-1`` = unused).
        miss: ``[B, Hkv, K]`` bool, the slots to fill.
        dst_rows: ``[B, K * C]`` int64 flat destination rows, as in ``reconstruct_keys``.
        scales: for an fp8 store (``uint8`` e4m3 codes), ``[num_pages, Pc, Hkv, C]`` float32,
            one per token and KV head, beside the codes (same tier): token ``j`` of a row is
            ``code * scales[page, c % Pc, h, j]``, computed in float32.

    The reference indexes with boolean masks (a host sync on CUDA); kernels read only the missed
    rows without one.
    """
    B, Hkv, K = slot_ids.shape
    Pc, CD = store.shape[1], store.shape[3]
    D = v_cache.shape[-1]
    C = CD // D
    dev = v_cache.device
    chunk = slot_ids.long().to(dev)
    page = (
        store_table.long()
        .to(dev)
        .gather(1, (chunk.clamp_min(0) // Pc).reshape(B, -1))
        .view_as(chunk)
    )
    src = page * Pc + chunk % Pc  # [B, Hkv, K] store row
    heads = torch.arange(Hkv, device=dev).view(1, Hkv, 1).expand(B, Hkv, K)
    sel = miss.to(dev)
    at = (src[sel].to(store.device), heads[sel].to(store.device))
    vals = store.reshape(-1, Hkv, CD)[at].to(dev, non_blocking=True).view(-1, C, D)  # [M, C, D]
    if scales is not None:  # fp8 codes: decode and scale on the compute device
        s = scales.reshape(-1, Hkv, C)[at].to(dev, non_blocking=True)  # [M, C]
        vals = fp8_to_float(vals) * s[..., None]
    dst = dst_rows.view(B, 1, K, C).expand(B, Hkv, K, C)[sel]  # [M, C]
    v_cache.view(-1, Hkv, D)[dst, heads[sel][:, None].expand(-1, C)] = vals.to(v_cache.dtype)
