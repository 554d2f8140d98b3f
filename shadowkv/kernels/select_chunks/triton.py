"""Chunk selection: top-k in PyTorch, hit/miss slot assignment in Triton.

Same contract as ``reference.py``. A top-k inside a Triton kernel would need a sort network, so
``torch.topk`` picks the ``K`` best landmarks and ``torch.sort`` orders their chunk ids (unused
picks last); both are fixed-shape and sync-free. The kernel, one program per (sequence, KV head),
then does the bookkeeping the reference spends a ``[K, K]`` tensor and four sorts on:

- a pick is a hit when its chunk id sits in a used slot of ``prev_ids``; such a slot is kept;
- misses, in ascending chunk id, take the free (used but not kept) slots in ascending order: the
  ``r``-th miss goes where the exclusive prefix count of free slots equals ``r``.

The ``[K, K]`` comparisons run in ``BLOCK_I``-row tiles so registers stay bounded at large ``K``.
Chunk ids of one (sequence, head) are assumed distinct, as landmark ids are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shadowkv.kernels._launch import check

UNUSED = torch.iinfo(torch.int32).max  # sorts after every real chunk id


@triton.jit
def _select_chunks_kernel(
    slot_ids_ptr,
    miss_ptr,
    chosen_ptr,
    prev_ids_ptr,
    num_select_ptr,
    stride_cb,
    stride_ch,
    stride_pb,
    stride_ph,
    stride_ob,
    stride_oh,
    K,
    Hkv,
    BLOCK_K: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hkv
    h = pid % Hkv
    num_sel = tl.load(num_select_ptr + b).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_K)  # slots
    offs_i = tl.arange(0, BLOCK_I)  # picks, a tile at a time
    used_j = offs_j < num_sel
    prev = tl.load(prev_ids_ptr + b * stride_pb + h * stride_ph + offs_j, mask=used_j, other=-1)
    live_j = used_j & (prev >= 0)  # [BLOCK_K] slot held a chunk we may keep
    chosen_base = chosen_ptr + b * stride_cb + h * stride_ch

    kept = tl.zeros([BLOCK_K], tl.int32)
    for i0 in range(0, K, BLOCK_I):
        i = i0 + offs_i
        used_i = i < num_sel
        picks = tl.load(chosen_base + i, mask=used_i, other=-2)  # [BLOCK_I], ascending
        same = (picks[:, None] == prev[None, :]) & used_i[:, None] & live_j[None, :]
        kept = tl.maximum(kept, tl.max(same.to(tl.int32), axis=0))

    free_j = used_j & (kept == 0)
    free_rank = tl.cumsum(free_j.to(tl.int32), axis=0) - free_j.to(tl.int32)  # [BLOCK_K]
    fill = tl.zeros([BLOCK_K], tl.int32)  # the one matching miss's chunk id, else 0
    miss_seen = 0
    for i0 in range(0, K, BLOCK_I):
        i = i0 + offs_i
        used_i = i < num_sel
        picks = tl.load(chosen_base + i, mask=used_i, other=-2)
        same = (picks[:, None] == prev[None, :]) & used_i[:, None] & live_j[None, :]
        is_miss = (used_i & (tl.max(same.to(tl.int32), axis=1) == 0)).to(tl.int32)
        rank = miss_seen + tl.cumsum(is_miss, axis=0) - is_miss  # [BLOCK_I]
        match = (is_miss[:, None] > 0) & free_j[None, :] & (rank[:, None] == free_rank[None, :])
        fill += tl.sum(tl.where(match, picks[:, None], 0), axis=0)
        miss_seen += tl.sum(is_miss, axis=0)

    slot = tl.where(kept > 0, prev, tl.where(free_j, fill, -1))
    out = b * stride_ob + h * stride_oh + offs_j
    mask_j = offs_j < K
    tl.store(slot_ids_ptr + out, slot, mask=mask_j)
    tl.store(miss_ptr + out, free_j.to(tl.int8), mask=mask_j)


def select_chunks(
    scores: torch.Tensor,
    landmark_ids: torch.Tensor,
    page_table: torch.Tensor,
    num_select: torch.Tensor,
    prev_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slot_ids [B, Hkv, K] int32, miss [B, Hkv, K] bool)``; see ``reference.select_chunks``."""
    B, Hkv, _ = scores.shape
    K = prev_ids.shape[-1]
    Pc = landmark_ids.shape[1]
    check(
        prev_ids.dtype == torch.int32 and num_select.dtype == torch.int32,
        "prev_ids and num_select must be int32",
    )
    check(num_select.is_contiguous(), "num_select must be contiguous")
    slot_ids = torch.empty(B, Hkv, K, dtype=torch.int32, device=scores.device)
    miss = torch.empty(B, Hkv, K, dtype=torch.bool, device=scores.device)
    if B * Hkv * K == 0:
        return slot_ids, miss
    top = scores.topk(K, dim=-1).indices  # [B, Hkv, K], best first
    page = page_table.long().gather(1, (top // Pc).reshape(B, -1)).view(B, Hkv, K)
    heads = torch.arange(Hkv, device=scores.device).view(1, Hkv, 1)
    chosen = landmark_ids[page, top % Pc, heads]  # [B, Hkv, K] chunk ids
    used = torch.arange(K, device=scores.device) < num_select[:, None, None]
    chosen = chosen.masked_fill(~used, UNUSED).sort(dim=-1).values.to(torch.int32).contiguous()
    prev = prev_ids if prev_ids.stride(-1) == 1 else prev_ids.contiguous()
    BLOCK_K = max(16, triton.next_power_of_2(K))
    _select_chunks_kernel[(B * Hkv,)](
        slot_ids,
        miss.view(torch.int8),
        chosen,
        prev,
        num_select,
        chosen.stride(0),
        chosen.stride(1),
        prev.stride(0),
        prev.stride(1),
        slot_ids.stride(0),
        slot_ids.stride(1),
        K,
        Hkv,
        BLOCK_K=BLOCK_K,
        BLOCK_I=max(2, min(32, 4096 // BLOCK_K)),
        num_warps=4,
    )
    return slot_ids, miss
