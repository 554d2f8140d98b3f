"""Rotary position embeddings in Triton: q and k of every token in one launch.

Same contract as ``reference.apply_rope``. The grid is (token, head block): the first
``cdiv(H, BLOCK_H)`` head blocks of a token rotate ``q``, the rest rotate ``k``. A program loads
its token's ``cos``/``sin`` row once (any float dtype, fp32 math), gathers the two members of
every pair as two ``[BLOCK_H, HALF]`` tiles (the style only changes their column offsets), turns
them and stores them back at the same columns; the pass-through columns ``[Dr, D)`` of partial
rotary are copied unchanged.

``rope_pair_cols`` and ``rope_rotate`` are the building blocks other kernels import to fuse RoPE
into their epilogue (``reconstruct_keys``), so the rotation is written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shadowkv.kernels._launch import check

MAX_TILE = 1024  # heads x pairs per program and member tile


@triton.jit
def rope_pair_cols(i, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    # Columns of the two members of pair i: neox (i, i + HALF), interleaved (2i, 2i + 1).
    if INTERLEAVED:
        first = 2 * i
        second = first + 1
    else:
        first = i
        second = i + HALF
    return first, second


@triton.jit
def rope_rotate(x1, x2, cos, sin):
    # Pair (x1, x2) turned by the angle whose cosine and sine are given (fp32 in, fp32 out).
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_heads(
    out_ptr,
    x_ptr,
    cos,
    sin,
    pid_t,
    head0,
    stride_ot,
    stride_oh,
    stride_xt,
    stride_xh,
    num_heads,
    HALF: tl.constexpr,
    PASS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    # Heads [head0, head0 + BLOCK_H) of token pid_t; cos/sin are [BLOCK_HALF] fp32.
    offs_h = head0 + tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    mask_h = offs_h < num_heads
    mask = mask_h[:, None] & (offs_i < HALF)[None, :]
    x_row = x_ptr + pid_t * stride_xt + offs_h[:, None] * stride_xh  # [BLOCK_H, 1]
    o_row = out_ptr + pid_t * stride_ot + offs_h[:, None] * stride_oh
    first, second = rope_pair_cols(offs_i, HALF, INTERLEAVED)
    x1 = tl.load(x_row + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + second[None, :], mask=mask, other=0.0).to(tl.float32)
    o1, o2 = rope_rotate(x1, x2, cos[None, :], sin[None, :])
    out_ty = out_ptr.dtype.element_ty
    tl.store(o_row + first[None, :], o1.to(out_ty), mask=mask)
    tl.store(o_row + second[None, :], o2.to(out_ty), mask=mask)
    if PASS > 0:
        offs_p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        mask_p = mask_h[:, None] & (offs_p < 2 * HALF + PASS)[None, :]
        x = tl.load(x_row + offs_p[None, :], mask=mask_p, other=0.0)
        tl.store(o_row + offs_p[None, :], x.to(out_ty), mask=mask_p)


@triton.jit
def _rope_kernel(
    q_out_ptr,
    k_out_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    H,
    Hkv,
    q_blocks,
    HALF: tl.constexpr,
    PASS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    mask_i = offs_i < HALF
    cos = tl.load(cos_ptr + pid_t * stride_cos + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pid_t * stride_sin + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    if pid_h < q_blocks:
        _rope_heads(
            q_out_ptr,
            q_ptr,
            cos,
            sin,
            pid_t,
            pid_h * BLOCK_H,
            stride_qot,
            stride_qoh,
            stride_qt,
            stride_qh,
            H,
            HALF,
            PASS,
            INTERLEAVED,
            BLOCK_H,
            BLOCK_HALF,
            BLOCK_PASS,
        )
    else:
        _rope_heads(
            k_out_ptr,
            k_ptr,
            cos,
            sin,
            pid_t,
            (pid_h - q_blocks) * BLOCK_H,
            stride_kot,
            stride_koh,
            stride_kt,
            stride_kh,
            Hkv,
            HALF,
            PASS,
            INTERLEAVED,
            BLOCK_H,
            BLOCK_HALF,
            BLOCK_PASS,
        )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "neox"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of ``q`` and ``k``; see ``reference.apply_rope``."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    half = cos.shape[1]
    floats = (torch.float32, torch.bfloat16, torch.float16)
    check(
        q.dtype in floats and k.dtype in floats,
        f"q and k must be fp32, bf16 or fp16, got {q.dtype}, {k.dtype}",
    )
    check(
        q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1,
        "q, k, cos and sin need a contiguous last dim",
    )
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T == 0 or H + Hkv == 0:
        return q_out, k_out
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(H, Hkv)), max(1, MAX_TILE // block_half))
    q_blocks = triton.cdiv(H, block_h)
    grid = (T, q_blocks + triton.cdiv(Hkv, block_h))
    _rope_kernel[grid](
        q_out,
        k_out,
        q,
        k,
        cos,
        sin,
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        H,
        Hkv,
        q_blocks,
        HALF=half,
        PASS=D - 2 * half,
        INTERLEAVED=style == "interleaved",
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        BLOCK_PASS=triton.next_power_of_2(max(1, D - 2 * half)),
    )
    return q_out, k_out
