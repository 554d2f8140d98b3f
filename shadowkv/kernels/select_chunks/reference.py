"""Top-k chunk selection with slot reuse, in plain PyTorch (the CPU path and the kernels' oracle).

Shapes: ``B`` sequences, ``Hkv`` KV heads, ``N`` padded landmark count, ``K`` buffer slots per
(sequence, KV head), ``Pc`` landmarks per page.
"""

from __future__ import annotations

import torch


def select_chunks(
    scores: torch.Tensor,
    landmark_ids: torch.Tensor,
    page_table: torch.Tensor,
    num_select: torch.Tensor,
    prev_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the top chunks per (sequence, KV head) and place them in buffer slots.

    A chunk selected at the previous step (a hit) stays in its slot; every newly selected chunk
    (a miss) takes a slot freed by a chunk that dropped out. Misses, in ascending chunk id, fill
    the free slots in ascending slot order, so the result is canonical whatever order a top-k
    returns (ties between equal scores may pick either chunk).

    Args:
        scores: ``[B, Hkv, N]`` float32 from ``score_landmarks`` (``-inf`` past each sequence's
            landmarks), ``N = max_pages * Pc``.
        landmark_ids: ``[num_pages, Pc, Hkv]`` int32 original chunk id of each landmark, paged
            like the landmarks (``N``-th landmark of ``b`` at ``[page_table[b, n // Pc], n % Pc]``).
        page_table: ``[B, max_pages]`` int32, the same table ``score_landmarks`` used.
        num_select: ``[B]`` int32 chunks to select, ``0 <= num_select[b] <= K`` and no more than
            the sequence's landmark count.
        prev_ids: ``[B, Hkv, K]`` int32 chunk id held by each slot after the previous step,
            ``-1`` for an empty slot; slots ``>= num_select[b]`` hold ``-1``. ``K <= N``.

    Returns:
        ``slot_ids [B, Hkv, K]`` int32: the chunk each slot holds now, ``-1`` for slots
        ``>= num_select[b]``; ``miss [B, Hkv, K]`` bool: the slot's chunk must be (re)loaded
        (``slot_ids != prev_ids`` on a used slot).
    """
    B, Hkv, N = scores.shape
    K = prev_ids.shape[-1]
    dev = scores.device
    ids = landmark_ids[page_table.long()].reshape(B, N, Hkv).permute(0, 2, 1)  # [B, Hkv, N]
    top = scores.topk(K, dim=-1).indices  # descending, so a sequence's picks are its first k
    slot = torch.arange(K, device=dev)
    used = slot[None, :] < num_select.to(dev).long()[:, None]  # [B, K]
    used = used[:, None, :].expand(B, Hkv, K)
    big = torch.iinfo(torch.int64).max
    chosen = ids.gather(-1, top).long().masked_fill(~used, big).sort(dim=-1).values
    prev = prev_ids.long().masked_fill(~used, -1)
    # [B, Hkv, K_new, K_slot]: chosen chunk equals the chunk a slot held.
    same = (
        (chosen[..., :, None] == prev[..., None, :])
        & used[..., :, None]
        & (prev >= 0)[..., None, :]
    )
    is_miss = used & ~same.any(dim=-1)
    kept = same.any(dim=-2)
    is_free = used & ~kept
    slot_ids = prev.masked_fill(~kept, -1)
    # The k-th miss goes to the k-th free slot; #misses == #free slots since hits pair with kept
    # slots one to one. Stable sorts list misses / free slots first, in order.
    miss_order = torch.sort((~is_miss).to(torch.int8), dim=-1, stable=True).indices
    free_order = torch.sort((~is_free).to(torch.int8), dim=-1, stable=True).indices
    num_miss = is_miss.sum(dim=-1, keepdim=True)
    fill = torch.where(
        slot < num_miss, chosen.gather(-1, miss_order), slot_ids.gather(-1, free_order)
    )
    slot_ids = slot_ids.scatter(-1, free_order, fill)
    miss = (slot_ids != prev_ids.long()) & (slot_ids >= 0)
    return slot_ids.to(torch.int32), miss


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
    """``select_chunks`` over a persistent selection state, updated in place, with hit counting.

    Args:
        scores, landmark_ids, page_table, num_select: as for ``select_chunks``
            (``num_select[b] <= num_slots``).
        state: ``[rows_total, Hkv, Kmax]`` int32 chunk id per slot of every sequence row
            (``-1`` = empty). Row ``rows[b]``'s first ``K`` slots are the previous selection
            (``prev_ids``) and are overwritten with this step's ``slot_ids``; the other rows and
            slots ``>= K`` are left untouched.
        rows: ``[B]`` int64 (or int32) distinct state rows of the batch's sequences.
        num_slots: ``K``, the slots used this step, ``K <= min(Kmax, N)``.
        primed: ``[B]`` bool, sequences whose selection counts toward the hit rate.
        counters: ``[2]`` int64 ``(hits, used)``; for primed sequences adds the used slots
            (``slot_ids >= 0``) that are not misses to ``counters[0]`` and the used slots to
            ``counters[1]``.

    Returns:
        ``slot_ids [B, Hkv, K]`` int32 and ``miss [B, Hkv, K]`` bool, as ``select_chunks``.
    """
    K = num_slots
    prev = state[rows, :, :K]
    slot_ids, miss = select_chunks(scores, landmark_ids, page_table, num_select, prev)
    state[rows, :, :K] = slot_ids
    used = (slot_ids >= 0) & primed[:, None, None]
    counters[0] += (used & ~miss).sum()
    counters[1] += used.sum()
    return slot_ids, miss
