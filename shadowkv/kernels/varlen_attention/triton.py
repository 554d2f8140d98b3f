"""Causal prefill attention over packed segments in Triton: a flash-attention forward.

Same contract as ``reference.py``: ``q [sum Tq, H, D]``, ``k, v [sum Tk, Hkv, D]``, int32
``cu_seqlens_q, cu_seqlens_k [num_segments + 1]`` on the device; segment ``i``'s queries are the
last ``Tq_i`` of its ``Tk_i >= Tq_i`` keys' tokens (causal aligned to the lower right) ->
``[sum Tq, H, D]`` in ``q``'s dtype.

One program per (block of ``BLOCK_M`` query rows, query head, segment). It walks the segment's
key tiles up to the block's causal limit with an online softmax in fp32 (base 2) and writes the
normalised rows once. ``D`` is padded to a power of two with masks (64, 96, 128). The grid is
sized by ``max_seqlen_q``, a host integer the caller knows, so the launch reads nothing back from
the device; programs past their segment's queries return at once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from shadowkv.kernels._launch import check, dot_dtype, dot_precision

BLOCK_M = 64  # query rows per program
BLOCK_N = 64  # keys per tile


@triton.jit
def _varlen_attention_kernel(
    out_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    cu_q_ptr,
    cu_k_ptr,
    stride_ot,
    stride_oh,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    qk_scale,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    q_lo = tl.load(cu_q_ptr + seg).to(tl.int64)
    num_q = tl.load(cu_q_ptr + seg + 1).to(tl.int64) - q_lo
    k_lo = tl.load(cu_k_ptr + seg).to(tl.int64)
    num_k = tl.load(cu_k_ptr + seg + 1).to(tl.int64) - k_lo
    first = pid_m.to(tl.int64) * BLOCK_M
    if first >= num_q:
        return
    off = num_k - num_q  # query row i sees keys [0, i + off]
    kv_head = head // G

    offs_m = first + tl.arange(0, BLOCK_M)  # [BLOCK_M] query rows of the segment
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < num_q
    mask_d = offs_d < D
    q_rows = (q_lo + offs_m) * stride_qt + head * stride_qh
    q = tl.load(
        q_ptr + q_rows[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0
    ).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys past the block's last row's limit are masked for every row: stop before them.
    hi = tl.minimum(num_k, first + BLOCK_M + off)
    for tile in range(0, hi, BLOCK_N):
        keys = tile + offs_n  # [BLOCK_N]
        mask_n = keys < num_k
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_rows = (k_lo + keys) * stride_kt + kv_head * stride_kh
        k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v_rows = (k_lo + keys) * stride_vt + kv_head * stride_vh
        v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale
        visible = mask_n[None, :] & (keys[None, :] <= offs_m[:, None] + off)
        s = tl.where(visible, s, float("-inf"))  # [BLOCK_M, BLOCK_N]
        # Finite: every row sees key 0, which is in the first tile.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION
        )
        m_i = m_new

    out = acc / l_i[:, None]
    o_rows = (q_lo + offs_m) * stride_ot + head * stride_oh
    tl.store(
        out_ptr + o_rows[:, None] + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
) -> torch.Tensor:
    """Lower-right causal attention of every segment's queries over its keys: ``[sum Tq, H, D]``.

    ``max_seqlen_q`` (the longest segment's queries) sizes the grid. Each segment must have
    ``Tk >= Tq`` (not checked: that would read the bounds back to the host).
    """
    T, H, D = q.shape
    Hkv = k.shape[1]
    check(k.shape == v.shape and k.dim() == 3, "k and v must both be [sum Tk, Hkv, D]")
    check(k.shape[2] == D, f"head dim of q ({D}) and of k/v ({k.shape[2]}) differ")
    check(H % Hkv == 0, f"query heads ({H}) must be a multiple of KV heads ({Hkv})")
    check(q.dtype == k.dtype == v.dtype, "q, k and v need one dtype")
    check(
        cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32,
        "cu_seqlens_q and cu_seqlens_k must be int32",
    )
    check(
        cu_seqlens_q.shape == cu_seqlens_k.shape and cu_seqlens_q.dim() == 1,
        "cu_seqlens_q and cu_seqlens_k need one bound per segment plus one",
    )
    check(
        q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1,
        "q, k and v need a contiguous last dim",
    )
    out = torch.empty_like(q)
    num_segments = cu_seqlens_q.shape[0] - 1
    if T == 0 or num_segments == 0 or max_seqlen_q == 0:
        return out
    grid = (triton.cdiv(max_seqlen_q, BLOCK_M), H, num_segments)
    _varlen_attention_kernel[grid](
        out,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        out.stride(0),
        out.stride(1),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        scale * math.log2(math.e),
        G=H // Hkv,
        D=D,
        BLOCK_D=triton.next_power_of_2(D),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        PRECISION=dot_precision(q.dtype),
        DOT_DTYPE=dot_dtype(q.dtype),
        num_warps=4,
        num_stages=2,
    )
    return out
