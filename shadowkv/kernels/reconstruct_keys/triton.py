"""Rebuild missed chunks' keys from low-rank factors in Triton, RoPE fused in the epilogue.

Same contract as ``reference.py``. One program per (sequence, KV head, ``BLOCK_SLOTS`` slots)
handles ``BLOCK_T = BLOCK_SLOTS * C_PAD`` token rows (row ``r`` is token ``r % C_PAD`` of slot
``r // C_PAD``; rows with ``j >= C``, unused or hit slots are masked). It gathers those rows of
``A`` and multiplies them by the head's ``[R, D]`` slice of ``W^T`` in ``BLOCK_R`` steps. The
first and second members of the RoPE pairs are accumulated separately (``acc1 = A @ W[:, first]``,
``acc2 = A @ W[:, second]``, the columns given by the style's pair map in ``kernels/rope``), so the
rotation ``(acc1, acc2) -> (acc1 * cos - acc2 * sin, acc2 * cos + acc1 * sin)`` needs no register
shuffle; with partial rotary a third accumulator holds the pass-through columns ``[Dr, D)``,
stored unrotated (compiled out when ``Dr == D``). A program whose slots are all hits returns
before loading anything.

Each prompt segment has its own basis: the product runs once per segment (``NUM_SEGS``, unrolled)
over the program's rows in that segment (the ``A`` loads mask the others to zero) with that
segment's ``W^T``, into the same accumulators. A segment holding none of the program's rows is
skipped before it loads anything, so one segment (or a program inside one segment) costs one
product, as it did with a single basis per sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shadowkv.kernels._launch import check, dot_dtype, dot_precision
from shadowkv.kernels.rope.triton import rope_pair_cols, rope_rotate

BLOCK_T = 64  # token rows per program


@triton.jit
def _reconstruct_keys_kernel(
    k_cache_ptr,
    a_ptr,
    page_table_ptr,
    w_ptr,
    seg_basis_ptr,
    seg_starts_ptr,
    slot_ids_ptr,
    miss_ptr,
    cos_ptr,
    sin_ptr,
    dst_rows_ptr,
    stride_kr,
    stride_kh,
    stride_ap,
    stride_at,
    stride_tb,
    stride_wn,
    stride_wr,
    stride_gb,
    stride_gs,
    stride_sb,
    stride_sh,
    stride_cos,
    stride_sin,
    stride_db,
    K,
    R,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    P: tl.constexpr,
    D: tl.constexpr,
    NUM_SEGS: tl.constexpr,
    HALF: tl.constexpr,
    PASS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    slot = pid_s * (BLOCK_T // C_PAD) + offs_t // C_PAD  # [BLOCK_T]
    j = offs_t % C_PAD
    in_range = (slot < K) & (j < C)
    sel = pid_b * stride_sb + pid_h * stride_sh + slot
    chunk = tl.load(slot_ids_ptr + sel, mask=in_range, other=-1).to(tl.int64)
    miss = tl.load(miss_ptr + sel, mask=in_range, other=0)
    rows = in_range & (miss != 0) & (chunk >= 0)
    if tl.max(rows.to(tl.int32), axis=0) == 0:
        return

    tok = chunk * C + j  # [BLOCK_T] absolute position
    page = tl.load(page_table_ptr + pid_b * stride_tb + tok // P, mask=rows, other=0).to(tl.int64)
    a_row = a_ptr + page * stride_ap + (tok % P) * stride_at  # [BLOCK_T] row pointers
    offs_r = tl.arange(0, BLOCK_R)
    offs_x = tl.arange(0, BLOCK_HALF)  # pair index
    mask_x = offs_x < HALF
    first, second = rope_pair_cols(offs_x, HALF, INTERLEAVED)
    if PASS > 0:
        cols_p = 2 * HALF + tl.arange(0, BLOCK_PASS)  # pass-through columns [Dr, D)
        mask_p = cols_p < D
        acc3 = tl.zeros([BLOCK_T, BLOCK_PASS], tl.float32)

    acc1 = tl.zeros([BLOCK_T, BLOCK_HALF], tl.float32)
    acc2 = tl.zeros([BLOCK_T, BLOCK_HALF], tl.float32)
    for g in tl.static_range(NUM_SEGS):
        # Segment g owns tokens [start_g, start_{g+1}); segment 0 everything below start_1.
        in_seg = rows
        if g > 0:
            start = tl.load(seg_starts_ptr + pid_b * stride_gs + g).to(tl.int64)
            in_seg = in_seg & (tok >= start)
        if g + 1 < NUM_SEGS:
            end = tl.load(seg_starts_ptr + pid_b * stride_gs + (g + 1)).to(tl.int64)
            in_seg = in_seg & (tok < end)
        if NUM_SEGS > 1:
            live = tl.max(in_seg.to(tl.int32), axis=0) > 0
        else:
            live = True  # the one segment holds every row (all-hit programs returned above)
        if live:
            basis_row = tl.load(seg_basis_ptr + pid_b * stride_gb + g).to(tl.int64)
            w_head = w_ptr + basis_row * stride_wn + pid_h * D  # this head's D columns of W^T
            for r0 in range(0, R, BLOCK_R):
                r = r0 + offs_r
                mask_r = r < R
                a_mask = in_seg[:, None] & mask_r[None, :]  # other segments' rows read as 0
                a = tl.load(a_row[:, None] + r[None, :], mask=a_mask, other=0.0).to(DOT_DTYPE)
                w_mask = mask_r[:, None] & mask_x[None, :]
                w_rows = w_head + r[:, None] * stride_wr  # [BLOCK_R, 1]
                w1 = tl.load(w_rows + first[None, :], mask=w_mask, other=0.0).to(DOT_DTYPE)
                w2 = tl.load(w_rows + second[None, :], mask=w_mask, other=0.0).to(DOT_DTYPE)
                acc1 = tl.dot(a, w1, acc1, input_precision=PRECISION)
                acc2 = tl.dot(a, w2, acc2, input_precision=PRECISION)
                if PASS > 0:
                    w_mask3 = mask_r[:, None] & mask_p[None, :]
                    w3 = tl.load(w_rows + cols_p[None, :], mask=w_mask3, other=0.0)
                    acc3 = tl.dot(a, w3.to(DOT_DTYPE), acc3, input_precision=PRECISION)

    out_mask = rows[:, None] & mask_x[None, :]
    cos = tl.load(cos_ptr + tok[:, None] * stride_cos + offs_x[None, :], mask=out_mask, other=0.0)
    sin = tl.load(sin_ptr + tok[:, None] * stride_sin + offs_x[None, :], mask=out_mask, other=0.0)
    out1, out2 = rope_rotate(acc1, acc2, cos.to(tl.float32), sin.to(tl.float32))

    dst = tl.load(dst_rows_ptr + pid_b * stride_db + slot * C + j, mask=rows, other=0)
    dst_row = k_cache_ptr + dst.to(tl.int64)[:, None] * stride_kr + pid_h * stride_kh  # [T, 1]
    out_ty = k_cache_ptr.dtype.element_ty
    tl.store(dst_row + first[None, :], out1.to(out_ty), mask=out_mask)
    tl.store(dst_row + second[None, :], out2.to(out_ty), mask=out_mask)
    if PASS > 0:
        tl.store(dst_row + cols_p[None, :], acc3.to(out_ty), mask=rows[:, None] & mask_p[None, :])


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
    """Rebuild missed slots' keys in place; see ``reference.reconstruct_keys``."""
    B, Hkv, K = slot_ids.shape
    _, S, _, D = k_cache.shape
    P, R = a_pages.shape[1], a_pages.shape[2]
    C = chunk_size
    half = cos.shape[1]
    check(0 < 2 * half <= D, f"RoPE tables [rows, Dr/2] need 0 < Dr <= D={D}, got Dr={2 * half}")
    check(
        k_cache.stride(3) == 1 and k_cache.stride(0) == S * k_cache.stride(1),
        "k_cache blocks must be contiguous rows ([num_blocks * S] flat rows, contiguous D)",
    )
    check(
        a_pages.stride(2) == 1 and w_t.stride(2) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1,
        "a_pages, w_t, cos and sin need a contiguous last dim",
    )
    check(
        slot_ids.dtype == torch.int32 and page_table.dtype == torch.int32,
        "slot_ids and page_table must be int32",
    )
    check(
        dst_rows.dtype == torch.int64 and dst_rows.stride(1) == 1,
        "dst_rows must be contiguous int64",
    )
    check(
        seg_basis.dim() == 2 and seg_basis.shape[0] == B and seg_basis.shape[1] >= 1,
        f"seg_basis must be [B={B}, segments >= 1], got {tuple(seg_basis.shape)}",
    )
    check(
        seg_starts.shape == seg_basis.shape,
        f"seg_starts {tuple(seg_starts.shape)} must match seg_basis {tuple(seg_basis.shape)}",
    )
    check(
        seg_basis.dtype in (torch.int32, torch.int64) and seg_starts.dtype == torch.int32,
        f"seg_basis must be int32/int64 and seg_starts int32, got {seg_basis.dtype} and "
        f"{seg_starts.dtype}",
    )
    if B * Hkv * K == 0:
        return
    slot_ids = slot_ids.contiguous()
    seg_basis, seg_starts = seg_basis.contiguous(), seg_starts.contiguous()
    miss = miss.contiguous().view(torch.int8)
    same = a_pages.dtype == w_t.dtype
    compute = a_pages.dtype if same else torch.float32
    C_PAD = triton.next_power_of_2(C)
    block_t = max(BLOCK_T, C_PAD)
    grid = (B, Hkv, triton.cdiv(K, block_t // C_PAD))
    _reconstruct_keys_kernel[grid](
        k_cache,
        a_pages,
        page_table,
        w_t,
        seg_basis,
        seg_starts,
        slot_ids,
        miss,
        cos,
        sin,
        dst_rows,
        k_cache.stride(1),
        k_cache.stride(2),
        a_pages.stride(0),
        a_pages.stride(1),
        page_table.stride(0),
        w_t.stride(0),
        w_t.stride(1),
        seg_basis.stride(0),
        seg_starts.stride(0),
        slot_ids.stride(0),
        slot_ids.stride(1),
        cos.stride(0),
        sin.stride(0),
        dst_rows.stride(0),
        K,
        R,
        C=C,
        C_PAD=C_PAD,
        P=P,
        D=D,
        NUM_SEGS=seg_basis.shape[1],
        HALF=half,
        PASS=D - 2 * half,
        INTERLEAVED=style == "interleaved",
        BLOCK_T=block_t,
        BLOCK_HALF=max(16, triton.next_power_of_2(half)),
        BLOCK_PASS=max(16, triton.next_power_of_2(max(1, D - 2 * half))),
        BLOCK_R=max(16, min(64, triton.next_power_of_2(R))),
        PRECISION=dot_precision(compute),
        DOT_DTYPE=dot_dtype(compute),
        num_warps=8,  # 4 warps need ~226 registers a thread at R=160, D=128 (sm_90 cubin)
    )
