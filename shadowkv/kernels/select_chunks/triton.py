"""Chunk selection: ``torch.topk`` plus one Triton launch that does everything else.

Same contract as ``reference.py``. A top-k inside a Triton kernel would need a sort network, so
``torch.topk`` picks the ``K`` best landmarks (descending, so a sequence's picks are its first
``num_select[b]``). The kernel, one program per (sequence, KV head), then:

- maps each pick to its chunk id through ``page_table`` and ``landmark_ids`` (pointer math);
- reads the previous selection from ``state[rows[b], h, :K]``; a pick is a hit when its chunk id
  sits in a used slot there, and such a slot is kept;
- places misses without sorting: a miss's rank is the number of misses with a smaller chunk id,
  and the ``r``-th miss goes to the free (used but not kept) slot whose exclusive prefix count of
  free slots is ``r``;
- writes the new slots back into ``state`` in place and into ``slot_ids``, the miss mask, and
  adds its hits and used slots to ``counters`` (one atomic add each, primed sequences only).

The ``[K, K]`` comparisons run in ``BLOCK_I``-row tiles so registers stay bounded at large ``K``.
Chunk ids are ``>= 0`` and distinct within one (sequence, head), as landmark ids are; ``-1`` (any
negative value) in the state is an empty slot. ``rows`` must be distinct (programs of different
sequences write their rows concurrently). ``num_select`` is clamped to ``[0, K]`` (no host check).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shadowkv.kernels._launch import check


@triton.jit
def _chunk_ids(
    top_base, i, used, table_base, stride_tp, lm_base, stride_lp, stride_lc, PC: tl.constexpr
):
    """Chunk ids of the picks ``i`` (landmark columns from the top-k), ``-2`` where unused."""
    n = tl.load(top_base + i, mask=used, other=0).to(tl.int64)
    page = tl.load(table_base + (n // PC) * stride_tp, mask=used, other=0).to(tl.int64)
    cid = tl.load(lm_base + page * stride_lp + (n % PC) * stride_lc, mask=used, other=-2)
    return tl.where(used, cid, -2)


@triton.jit
def _take(values, offs, i):
    """``values[i]`` for a tile ``i`` of positions within ``offs`` (a register gather; ``0`` for
    positions outside), so the tiled passes re-read the picks without dependent loads."""
    return tl.sum(tl.where(offs[None, :] == i[:, None], values[None, :], 0), axis=1)


@triton.jit
def _select_chunks_kernel(
    slot_ids_ptr,  # [B, Hkv, K] int32 out
    miss_ptr,  # [B, Hkv, K] int8 out
    state_ptr,  # [rows_total, Hkv, Kmax] int32, read and written in place
    top_ptr,  # [B, Hkv, K] int64 landmark columns from torch.topk, contiguous
    landmark_ids_ptr,  # [pages, Pc, Hkv] int32
    page_table_ptr,  # [B, max_pages] int32
    num_select_ptr,  # [B] int32
    rows_ptr,  # [B] int32/int64
    primed_ptr,  # [B] int8
    counters_ptr,  # [2] int64: hits, used
    stride_sr,
    stride_sh,
    stride_lp,
    stride_lc,
    stride_lh,
    stride_tb,
    stride_tp,
    stride_c,
    K,
    Hkv,
    PC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hkv
    h = pid % Hkv
    num_sel = tl.maximum(tl.minimum(tl.load(num_select_ptr + b), K), 0)  # int32
    row = tl.load(rows_ptr + b).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)  # slots, or picks by rank
    offs_i = tl.arange(0, BLOCK_I)  # a tile of slots or picks
    used_k = offs_k < num_sel
    state_base = state_ptr + row * stride_sr + h * stride_sh
    top_base = top_ptr + pid * K
    table_base = page_table_ptr + b * stride_tb
    lm_base = landmark_ids_ptr + h * stride_lh

    # Chunk ids are >= 0; -1 marks an empty or unused slot and -2 an unused pick, so the
    # comparisons below need no masks (a tile never reaches past BLOCK_K: BLOCK_I divides it).
    prev = tl.load(state_base + offs_k, mask=used_k, other=-1)  # [BLOCK_K]
    prev = tl.where(prev >= 0, prev, -1)
    picks = _chunk_ids(
        top_base, offs_k, used_k, table_base, stride_tp, lm_base, stride_lp, stride_lc, PC
    )

    # Pass 1: kept[j] = slot j's chunk is picked again; hit[j] = pick j sits in a live slot.
    kept = tl.zeros([BLOCK_K], tl.int32)
    hit = tl.zeros([BLOCK_K], tl.int32)
    for i0 in range(0, num_sel, BLOCK_I):
        i = i0 + offs_i
        used_i = i < num_sel
        picks_i = _take(picks, offs_k, i)
        prev_i = tl.load(state_base + i, mask=used_i, other=-1)
        prev_i = tl.where(prev_i >= 0, prev_i, -1)
        same = picks_i[:, None] == prev[None, :]
        kept = tl.maximum(kept, tl.max(same.to(tl.int32), axis=0))
        same = prev_i[:, None] == picks[None, :]
        hit = tl.maximum(hit, tl.max(same.to(tl.int32), axis=0))

    is_miss = used_k & (hit == 0)
    free = used_k & (kept == 0)  # as many free slots as misses: hits pair with kept slots
    free_rank = tl.cumsum(free.to(tl.int32), axis=0) - free.to(tl.int32)  # [BLOCK_K]

    # Pass 2: the r-th miss in ascending chunk id fills the free slot of free_rank r.
    fill = tl.zeros([BLOCK_K], tl.int32)  # the one matching miss's chunk id, else 0
    for i0 in range(0, num_sel, BLOCK_I):
        i = i0 + offs_i
        used_i = i < num_sel
        picks_i = _take(picks, offs_k, i)
        # One reduction yields both: 2 per miss with a smaller chunk id, 1 if pick i is a miss.
        lt = picks[None, :] < picks_i[:, None]
        eq = picks[None, :] == picks_i[:, None]
        code = tl.where(lt, 2, tl.where(eq, 1, 0))
        code = tl.sum(tl.where(is_miss[None, :], code, 0), axis=1)  # [BLOCK_I]
        rank = code // 2
        miss_i = used_i & ((code % 2) == 1)
        match = miss_i[:, None] & free[None, :] & (rank[:, None] == free_rank[None, :])
        fill += tl.sum(tl.where(match, picks_i[:, None], 0), axis=0)

    slot = tl.where(kept > 0, prev, tl.where(free, fill, -1))
    mask_k = offs_k < K
    tl.store(state_base + offs_k, slot, mask=mask_k)
    out = pid * K + offs_k
    tl.store(slot_ids_ptr + out, slot, mask=mask_k)
    tl.store(miss_ptr + out, free.to(tl.int8), mask=mask_k)

    primed = tl.load(primed_ptr + b) != 0
    num_used = num_sel.to(tl.int64)
    num_hits = num_used - tl.sum(free.to(tl.int32), axis=0).to(tl.int64)
    tl.atomic_add(counters_ptr, num_hits, mask=primed)
    tl.atomic_add(counters_ptr + stride_c, num_used, mask=primed)


def select_chunks_inplace(
    scores: torch.Tensor,
    landmark_ids: torch.Tensor,
    page_table: torch.Tensor,
    num_select: torch.Tensor,
    state: torch.Tensor,
    rows: torch.Tensor,
    num_slots: int,
    primed: torch.Tensor,
    counters: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slot_ids [B, Hkv, K] int32, miss [B, Hkv, K] bool)``, updating ``state`` and ``counters``
    in place; see ``reference.select_chunks_inplace``. ``torch.topk`` and one kernel launch."""
    B, Hkv, N = scores.shape
    K = num_slots
    Pc = landmark_ids.shape[1]
    check(scores.dtype == torch.float32, f"scores must be float32, got {scores.dtype}")
    check(
        landmark_ids.dtype == torch.int32 and page_table.dtype == torch.int32,
        "landmark_ids and page_table must be int32",
    )
    check(
        state.dtype == torch.int32 and num_select.dtype == torch.int32,
        "state and num_select must be int32",
    )
    check(rows.dtype in (torch.int32, torch.int64), f"rows must be int32/int64, got {rows.dtype}")
    check(primed.dtype == torch.bool, f"primed must be bool, got {primed.dtype}")
    check(counters.dtype == torch.int64, f"counters must be int64, got {counters.dtype}")
    check(
        num_select.is_contiguous() and rows.is_contiguous() and primed.is_contiguous(),
        "num_select, rows and primed must be contiguous",
    )
    check(state.stride(-1) == 1, "state must be contiguous along its slot axis")
    devices = {t.device for t in (landmark_ids, page_table, num_select, state, rows, primed)}
    check(devices == {scores.device, counters.device}, "all tensors must share one device")
    slot_ids = torch.empty(B, Hkv, K, dtype=torch.int32, device=scores.device)
    miss = torch.empty(B, Hkv, K, dtype=torch.bool, device=scores.device)
    if B * Hkv * K == 0:
        return slot_ids, miss
    top = scores.topk(K, dim=-1).indices.contiguous()  # [B, Hkv, K] int64, best first
    BLOCK_K = max(16, triton.next_power_of_2(K))
    _select_chunks_kernel[(B * Hkv,)](
        slot_ids,
        miss.view(torch.int8),
        state,
        top,
        landmark_ids,
        page_table,
        num_select,
        rows,
        primed.view(torch.int8),
        counters,
        state.stride(0),
        state.stride(1),
        landmark_ids.stride(0),
        landmark_ids.stride(1),
        landmark_ids.stride(2),
        page_table.stride(0),
        page_table.stride(1),
        counters.stride(0),
        K,
        Hkv,
        PC=Pc,
        BLOCK_K=BLOCK_K,
        BLOCK_I=max(2, min(32, BLOCK_K, 2048 // BLOCK_K)),
        num_warps=4 if BLOCK_K <= 512 else 8,
    )
    return slot_ids, miss


def select_chunks(
    scores: torch.Tensor,
    landmark_ids: torch.Tensor,
    page_table: torch.Tensor,
    num_select: torch.Tensor,
    prev_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slot_ids [B, Hkv, K] int32, miss [B, Hkv, K] bool)``; see ``reference.select_chunks``.

    The out-of-place form over ``select_chunks_inplace``: a scratch copy of ``prev_ids`` is the
    state (rows ``0..B-1``) and nothing is counted.
    """
    B, Hkv, K = prev_ids.shape
    check(prev_ids.dtype == torch.int32, f"prev_ids must be int32, got {prev_ids.dtype}")
    dev = scores.device
    return select_chunks_inplace(
        scores,
        landmark_ids,
        page_table,
        num_select,
        prev_ids.clone(memory_format=torch.contiguous_format),
        torch.arange(B, device=dev),
        K,
        torch.zeros(B, dtype=torch.bool, device=dev),
        torch.zeros(2, dtype=torch.int64, device=dev),
    )
