"""Copy missed chunks' values from the value store into the cache rows, in Triton.

Same contract as ``reference.py``. On CUDA a host-tier store lives in pinned host memory and the
kernel reads it in place (zero-copy over PCIe through unified addressing): no host gather, no
staging copy, no host sync, and only missed chunks cross the bus. A pageable host store cannot be
read this way and is refused; the reference (host gather + copy) serves that case. A device-tier
store is an ordinary device tensor, read by the same kernel from device memory. An fp8 store is
read as bytes (half of bf16's traffic) plus one float32 scale per token row, decoded in registers.

One program per (sequence, KV head, ``BLOCK_T // C_PAD`` slots) moves ``BLOCK_T`` token rows of
``D`` values; row ``r`` is token ``r % C_PAD`` of slot ``r // C_PAD``. A store row
``[C * D]`` is contiguous, so each slot reads ``C * D`` consecutive elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shadowkv.kernels._jit import fp8e4m3_to_f32
from shadowkv.kernels._launch import check

BLOCK_T = 64  # token rows per program


@triton.jit
def _gather_values_kernel(
    v_cache_ptr,
    store_ptr,
    store_table_ptr,
    slot_ids_ptr,
    miss_ptr,
    dst_rows_ptr,
    scales_ptr,
    stride_vr,
    stride_vh,
    stride_sp,
    stride_sc,
    stride_sh,
    stride_tb,
    stride_ib,
    stride_ih,
    stride_db,
    stride_qp,
    stride_qc,
    stride_qh,
    K,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    PC: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    slot = pid_s * (BLOCK_T // C_PAD) + offs_t // C_PAD  # [BLOCK_T]
    j = offs_t % C_PAD
    in_range = (slot < K) & (j < C)
    sel = pid_b * stride_ib + pid_h * stride_ih + slot
    chunk = tl.load(slot_ids_ptr + sel, mask=in_range, other=-1).to(tl.int64)
    miss = tl.load(miss_ptr + sel, mask=in_range, other=0)
    rows = in_range & (miss != 0) & (chunk >= 0)
    page = tl.load(store_table_ptr + pid_b * stride_tb + chunk // PC, mask=rows, other=0).to(
        tl.int64
    )
    src = page * stride_sp + (chunk % PC) * stride_sc + pid_h * stride_sh + j * D  # [BLOCK_T]
    mask = rows[:, None] & (offs_d[None, :] < D)
    vals = tl.load(store_ptr + src[:, None] + offs_d[None, :], mask=mask, other=0)
    if FP8:  # uint8 e4m3 codes times the token row's scale
        at = page * stride_qp + (chunk % PC) * stride_qc + pid_h * stride_qh + j  # [BLOCK_T]
        scale = tl.load(scales_ptr + at, mask=rows, other=0.0)
        vals = fp8e4m3_to_f32(vals) * scale[:, None]
    dst = tl.load(dst_rows_ptr + pid_b * stride_db + slot * C + j, mask=rows, other=0).to(tl.int64)
    tl.store(
        v_cache_ptr + dst[:, None] * stride_vr + pid_h * stride_vh + offs_d[None, :],
        vals.to(v_cache_ptr.dtype.element_ty),  # the store keeps its own dtype
        mask=mask,
    )


def gather_values(
    v_cache: torch.Tensor,
    store: torch.Tensor,
    store_table: torch.Tensor,
    slot_ids: torch.Tensor,
    miss: torch.Tensor,
    dst_rows: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> None:
    """Fill missed slots' values in place; see ``reference.gather_values``."""
    B, Hkv, K = slot_ids.shape
    _, S, _, D = v_cache.shape
    PC, CD = store.shape[1], store.shape[3]
    C = CD // D
    check(
        v_cache.stride(3) == 1 and v_cache.stride(0) == S * v_cache.stride(1),
        "v_cache blocks must be contiguous rows ([num_blocks * S] flat rows, contiguous D)",
    )
    check(store.stride(3) == 1, "store rows [C * D] must be contiguous")
    check(scales is None or scales.stride(3) == 1, "scale rows [C] must be contiguous")
    # (Not while a CUDA graph captures: the pinned check queries the driver, and the replayed
    # graph reads the same store the uncaptured warm-up runs checked.)
    host_store = v_cache.is_cuda and store.device.type == "cpu"
    if host_store and not torch.cuda.is_current_stream_capturing():
        check(
            store.is_pinned() and (scales is None or scales.is_pinned()),
            "a host value store must be pinned for the zero-copy kernel; pin it "
            "(tensor.pin_memory()) or call gather_values_ref",
        )
    check(
        all(t.device == v_cache.device for t in (store_table, slot_ids, miss, dst_rows)),
        "store_table, slot_ids, miss and dst_rows must be on v_cache's device",
    )
    check(
        slot_ids.dtype == torch.int32 and store_table.dtype == torch.int32,
        "slot_ids and store_table must be int32",
    )
    check(
        dst_rows.dtype == torch.int64 and dst_rows.stride(1) == 1,
        "dst_rows must be contiguous int64",
    )
    if B * Hkv * K == 0:
        return
    slot_ids = slot_ids.contiguous()
    miss = miss.contiguous().view(torch.int8)
    C_PAD = triton.next_power_of_2(C)
    block_t = max(BLOCK_T, C_PAD)
    grid = (B, Hkv, triton.cdiv(K, block_t // C_PAD))
    fp8 = scales is not None
    sc = scales if fp8 else store  # an unused pointer when not fp8
    _gather_values_kernel[grid](
        v_cache,
        store,
        store_table,
        slot_ids,
        miss,
        dst_rows,
        sc,
        v_cache.stride(1),
        v_cache.stride(2),
        store.stride(0),
        store.stride(1),
        store.stride(2),
        store_table.stride(0),
        slot_ids.stride(0),
        slot_ids.stride(1),
        dst_rows.stride(0),
        sc.stride(0),
        sc.stride(1),
        sc.stride(2),
        K,
        C=C,
        C_PAD=C_PAD,
        PC=PC,
        D=D,
        BLOCK_T=block_t,
        BLOCK_D=triton.next_power_of_2(D),
        FP8=fp8,
        num_warps=4,
    )
