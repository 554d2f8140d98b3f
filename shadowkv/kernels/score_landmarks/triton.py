"""Landmark scores in Triton: split logits pass, then a normalise-and-max pass.

Same contract as ``reference.py``: ``q [B, H, D]``, ``landmarks [num_pages, Pc, Hkv, D]``,
``page_table [B, max_pages]`` int32, ``num_landmarks [B]`` int32 -> ``[B, Hkv, N]`` float32 with
``N = max_pages * Pc``: ``max_g softmax_n(scale * q_g . L_n)`` over each sequence's landmarks,
``-inf`` past them.

Pass 1, one program per (sequence, KV head, split of landmarks), reads each landmark tile once for
all ``G`` query heads, writes the base-2 logits ``[B, H, N]`` to a scratch buffer and the split's
running max and sum per head. Pass 2, same grid, merges the splits' (max, sum) into each head's
log-sum-exp, turns the logits into probabilities and keeps the max over the group. Writing ``G``
fp32 logits per landmark costs less than reading a landmark (``D`` values) twice.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from shadowkv.kernels._jit import fp8e4m3_to_f32
from shadowkv.kernels._launch import check, dot_dtype, dot_precision, plan_split_len

BLOCK_N = 64  # landmarks per tile
MAX_SPLITS = 64


@triton.jit
def _score_landmarks_logits_kernel(
    logits_ptr,
    part_m_ptr,
    part_l_ptr,
    q_ptr,
    lm_ptr,
    lm_scales_ptr,
    page_table_ptr,
    num_landmarks_ptr,
    stride_xb,
    stride_xh,
    stride_pb,
    stride_ph,
    stride_qb,
    stride_qh,
    stride_lp,
    stride_lc,
    stride_lh,
    stride_sp,
    stride_sc,
    stride_tb,
    qk_scale,
    split_len,
    G: tl.constexpr,
    D: tl.constexpr,
    PC: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    FP8: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    n_valid = tl.load(num_landmarks_ptr + pid_b).to(tl.int64)
    start = pid_s * split_len
    if start >= n_valid:
        return
    end = tl.minimum(start + split_len, n_valid)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = pid_h * G + offs_g  # [BLOCK_G]
    q = tl.load(
        q_ptr + pid_b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    for tile in range(start, end, BLOCK_N):
        n = tile + offs_n  # [BLOCK_N]
        mask_n = n < end
        page = tl.load(page_table_ptr + pid_b * stride_tb + n // PC, mask=mask_n, other=0)
        row = page.to(tl.int64) * stride_lp + (n % PC) * stride_lc + pid_h * stride_lh
        lm = tl.load(
            lm_ptr + row[:, None] + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0,
        )  # [BLOCK_N, BLOCK_D]
        if FP8:
            # e4m3 codes are exact in bf16/fp16/fp32; their scale multiplies the logit instead
            # of every element.
            lm = fp8e4m3_to_f32(lm)
        s = tl.dot(q, tl.trans(lm.to(DOT_DTYPE)), input_precision=PRECISION)  # [BLOCK_G, BLOCK_N]
        if FP8:
            at = page.to(tl.int64) * stride_sp + (n % PC) * stride_sc + pid_h
            s = s * tl.load(lm_scales_ptr + at, mask=mask_n, other=0.0)[None, :]
        s = s * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        tl.store(
            logits_ptr + pid_b * stride_xb + heads[:, None] * stride_xh + n[None, :],
            s,
            mask=mask_g[:, None] & mask_n[None, :],
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a valid landmark
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new

    part = pid_b * stride_pb + heads * stride_ph + pid_s
    tl.store(part_m_ptr + part, m_i, mask=mask_g)
    tl.store(part_l_ptr + part, l_i, mask=mask_g)


@triton.jit
def _score_landmarks_normalize_kernel(
    out_ptr,
    logits_ptr,
    part_m_ptr,
    part_l_ptr,
    num_landmarks_ptr,
    stride_ob,
    stride_oh,
    stride_xb,
    stride_xh,
    stride_pb,
    stride_ph,
    N,
    split_len,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    n_valid = tl.load(num_landmarks_ptr + pid_b).to(tl.int64)
    num_used = (n_valid + split_len - 1) // split_len  # splits pass 1 wrote
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < G
    heads = pid_h * G + offs_g

    part = (
        pid_b * stride_pb + heads[:, None] * stride_ph + offs_s[None, :]
    )  # [BLOCK_G, BLOCK_SPLITS]
    mask_p = mask_g[:, None] & (offs_s[None, :] < num_used)
    m = tl.load(part_m_ptr + part, mask=mask_p, other=float("-inf"))
    lsum = tl.load(part_l_ptr + part, mask=mask_p, other=0.0)
    m_max = tl.max(m, axis=1)  # [BLOCK_G]; -inf only when the sequence has no landmarks
    m_safe = tl.where(m_max > float("-inf"), m_max, 0.0)
    total = tl.sum(lsum * tl.exp2(m - m_safe[:, None]), axis=1)
    lse = m_safe + tl.log2(tl.where(total > 0, total, 1.0))  # [BLOCK_G]

    start = pid_s * split_len
    for tile in range(start, tl.minimum(start + split_len, N), BLOCK_N):
        n = tile + offs_n
        valid = n < n_valid
        s = tl.load(
            logits_ptr + pid_b * stride_xb + heads[:, None] * stride_xh + n[None, :],
            mask=mask_g[:, None] & valid[None, :],
            other=float("-inf"),
        )  # [BLOCK_G, BLOCK_N]
        p = tl.max(tl.exp2(s - lse[:, None]), axis=0)  # [BLOCK_N]
        p = tl.where(valid, p, float("-inf"))
        tl.store(out_ptr + pid_b * stride_ob + pid_h * stride_oh + n, p, mask=n < N)


def score_landmarks(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    page_table: torch.Tensor,
    num_landmarks: torch.Tensor,
    scale: float,
    landmark_scales: torch.Tensor | None = None,
    *,
    split_len: int | None = None,
) -> torch.Tensor:
    """``[B, Hkv, max_pages * Pc]`` float32 scores; see ``reference.score_landmarks``.

    ``split_len`` (landmarks, a multiple of 64) overrides the split planner; tests use it to force
    many splits.
    """
    B, H, D = q.shape
    _, PC, Hkv, Dl = landmarks.shape
    check(
        Dl == D and H % Hkv == 0,
        f"landmarks {tuple(landmarks.shape)} do not fit q {tuple(q.shape)}",
    )
    fp8 = landmark_scales is not None
    check(
        q.dtype == landmarks.dtype or fp8,
        f"q ({q.dtype}) and landmarks ({landmarks.dtype}) need one dtype",
    )
    check(
        not fp8 or (landmarks.dtype == torch.uint8 and landmark_scales.stride(2) == 1),
        "fp8 landmarks are uint8 codes with contiguous [pages, Pc, Hkv] float32 scales",
    )
    lm_scales = landmark_scales if fp8 else landmarks  # an unused pointer when not fp8
    check(
        page_table.dtype == torch.int32 and num_landmarks.dtype == torch.int32,
        "page_table and num_landmarks must be int32",
    )
    check(
        q.stride(-1) == 1
        and landmarks.stride(-1) == 1
        and page_table.stride(-1) == 1
        and num_landmarks.is_contiguous(),
        "q, landmarks and page_table need a contiguous last dim",
    )
    G = H // Hkv
    N = page_table.shape[1] * PC
    out = torch.empty(B, Hkv, N, dtype=torch.float32, device=q.device)
    if B == 0 or N == 0:
        return out
    if split_len is None:
        split_len = plan_split_len(B * Hkv, N, q.device, BLOCK_N, MAX_SPLITS)
    check(split_len > 0 and split_len % BLOCK_N == 0, f"split_len must be a multiple of {BLOCK_N}")
    num_splits = triton.cdiv(N, split_len)
    logits = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    part_m = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    BLOCK_G = max(16, triton.next_power_of_2(G))
    grid = (B, Hkv, num_splits)
    _score_landmarks_logits_kernel[grid](
        logits,
        part_m,
        part_l,
        q,
        landmarks,
        lm_scales,
        page_table,
        num_landmarks,
        logits.stride(0),
        logits.stride(1),
        part_m.stride(0),
        part_m.stride(1),
        q.stride(0),
        q.stride(1),
        landmarks.stride(0),
        landmarks.stride(1),
        landmarks.stride(2),
        lm_scales.stride(0),
        lm_scales.stride(1),
        page_table.stride(0),
        scale * math.log2(math.e),
        split_len,
        G=G,
        D=D,
        PC=PC,
        BLOCK_G=BLOCK_G,
        BLOCK_D=triton.next_power_of_2(D),
        BLOCK_N=BLOCK_N,
        PRECISION=dot_precision(q.dtype),
        DOT_DTYPE=dot_dtype(q.dtype),
        FP8=fp8,
        num_warps=4,
    )
    _score_landmarks_normalize_kernel[grid](
        out,
        logits,
        part_m,
        part_l,
        num_landmarks,
        out.stride(0),
        out.stride(1),
        logits.stride(0),
        logits.stride(1),
        part_m.stride(0),
        part_m.stride(1),
        N,
        split_len,
        G=G,
        BLOCK_G=BLOCK_G,
        BLOCK_N=BLOCK_N,
        BLOCK_SPLITS=max(2, triton.next_power_of_2(num_splits)),
        num_warps=4,
    )
    return out
