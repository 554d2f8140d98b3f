"""Decode attention over a paged cache in Triton: split-KV (flash-decoding) plus a reduce pass.

Same contract as ``reference.py``: ``q [B, H, D]``; ``k_cache, v_cache [num_blocks, S, Hkv, D]``;
``block_table [B, max_blocks]`` int32; ``seq_lens [B]`` int32 (each >= 1) -> ``[B, H, D]`` in
``q``'s dtype.

Pass 1 runs one program per (sequence, KV head, split of ``split_len`` tokens). It loads each K/V
tile once for all ``G`` query heads of the KV head and writes the split's normalised output and
log-sum-exp (base 2). Pass 2 runs one program per (sequence, query head) and merges the splits that
hold tokens. The grid is sized from the block table's capacity rather than ``seq_lens`` so the
launch needs no host sync; programs past a sequence's length return at once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from shadowkv.kernels._launch import check, dot_dtype, dot_precision, plan_split_len

BLOCK_N = 64  # tokens per K/V tile
MAX_SPLITS = 64


@triton.jit
def _decode_attention_split_kernel(
    part_out_ptr,
    part_lse_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    block_table_ptr,
    seq_lens_ptr,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_tb,
    qk_scale,
    split_len,
    G: tl.constexpr,
    D: tl.constexpr,
    S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + pid_b).to(tl.int64)
    start = pid_s * split_len
    if start >= seq_len:
        return
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = pid_h * G + offs_g  # [BLOCK_G] query heads of this KV head
    q = tl.load(
        q_ptr + pid_b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile in range(start, end, BLOCK_N):
        tok = tile + offs_n  # [BLOCK_N]
        mask_n = tok < end
        block = tl.load(block_table_ptr + pid_b * stride_tb + tok // S, mask=mask_n, other=0)
        row = block.to(tl.int64) * stride_kn + (tok % S) * stride_ks + pid_h * stride_kh
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        vrow = block.to(tl.int64) * stride_vn + (tok % S) * stride_vs + pid_h * stride_vh
        v = tl.load(v_ptr + vrow[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    lse = m_i + tl.log2(l_i)
    base = pid_b * stride_pb + heads * stride_ph + pid_s * stride_ps  # [BLOCK_G]
    tl.store(
        part_out_ptr + base[:, None] + offs_d[None, :], out, mask=mask_g[:, None] & mask_d[None, :]
    )
    tl.store(part_lse_ptr + pid_b * stride_lb + heads * stride_lh + pid_s, lse, mask=mask_g)


@triton.jit
def _decode_attention_reduce_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    stride_ob,
    stride_oh,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    split_len,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + pid_b).to(tl.int64)
    num_used = (
        seq_len + split_len - 1
    ) // split_len  # splits that hold tokens; the rest are unwritten
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_used
    mask_d = offs_d < D
    lse = tl.load(
        part_lse_ptr + pid_b * stride_lb + pid_h * stride_lh + offs_s,
        mask=mask_s,
        other=float("-inf"),
    )  # [BLOCK_SPLITS]
    w = tl.exp2(lse - tl.max(lse, axis=0))
    w = w / tl.sum(w, axis=0)
    part = tl.load(
        part_out_ptr
        + pid_b * stride_pb
        + pid_h * stride_ph
        + offs_s[:, None] * stride_ps
        + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_SPLITS, BLOCK_D]
    out = tl.sum(part * w[:, None], axis=0)
    tl.store(
        out_ptr + pid_b * stride_ob + pid_h * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    split_len: int | None = None,
) -> torch.Tensor:
    """Attention of ``q [B, H, D]`` over each sequence's first ``seq_lens[b]`` cached rows.

    ``split_len`` (tokens, a multiple of 64) overrides the split planner; tests use it to force
    many splits. Every ``seq_lens[b]`` must be >= 1 (not checked: that would sync the host).
    """
    B, H, D = q.shape
    _, S, Hkv, Dk = k_cache.shape
    check(k_cache.shape == v_cache.shape, "k_cache and v_cache must have the same shape")
    check(Dk == D, f"head dim of q ({D}) and of the cache ({Dk}) differ")
    check(H % Hkv == 0, f"query heads ({H}) must be a multiple of KV heads ({Hkv})")
    check(q.dtype == k_cache.dtype == v_cache.dtype, "q, k_cache and v_cache need one dtype")
    check(
        block_table.dtype == torch.int32 and seq_lens.dtype == torch.int32,
        "block_table and seq_lens must be int32",
    )
    check(block_table.shape[0] == B and seq_lens.shape == (B,), "block_table/seq_lens need B rows")
    check(
        q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1,
        "q, k_cache and v_cache need a contiguous last dim",
    )
    check(
        block_table.stride(-1) == 1 and seq_lens.is_contiguous(), "index tensors must be contiguous"
    )
    G = H // Hkv
    out = torch.empty_like(q)
    if B == 0:
        return out
    capacity = block_table.shape[1] * S
    if split_len is None:
        split_len = plan_split_len(B * Hkv, capacity, q.device, BLOCK_N, MAX_SPLITS)
    check(split_len > 0 and split_len % BLOCK_N == 0, f"split_len must be a multiple of {BLOCK_N}")
    num_splits = triton.cdiv(capacity, split_len)
    part_out = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    BLOCK_D = triton.next_power_of_2(D)
    _decode_attention_split_kernel[(B, Hkv, num_splits)](
        part_out,
        part_lse,
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_table.stride(0),
        scale * math.log2(math.e),
        split_len,
        G=G,
        D=D,
        S=S,
        BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_D=BLOCK_D,
        BLOCK_N=BLOCK_N,
        PRECISION=dot_precision(q.dtype),
        DOT_DTYPE=dot_dtype(q.dtype),
        num_warps=4,
    )
    _decode_attention_reduce_kernel[(B, H)](
        out,
        part_out,
        part_lse,
        seq_lens,
        out.stride(0),
        out.stride(1),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        split_len,
        D=D,
        BLOCK_D=BLOCK_D,
        BLOCK_SPLITS=max(2, triton.next_power_of_2(num_splits)),
        num_warps=4,
    )
    return out
