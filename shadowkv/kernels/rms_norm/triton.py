"""RMSNorm with the residual add fused in front, in Triton: one launch per call.

Same contract as ``reference.rms_norm``. One program per row holds the whole row
(``BLOCK = next_power_of_2(hidden)``, masked): it loads ``x`` (and ``residual``), stores
``h = x + residual`` rounded to ``x``'s dtype, takes the mean square of that rounded ``h`` in
fp32, rounds the normalised row to ``x``'s dtype like the model does, scales it by ``weight`` in
fp32 and stores ``out`` in ``x``'s dtype. Rows may be strided; the last dim must be contiguous.

Narrowing goes through ``kernels._jit.round_to``: round-to-nearest-even under the interpreter too
(which truncates fp32 to bf16, up to a bf16 ulp per rounding, three in a row here); compiled
kernels keep the hardware's own conversion.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shadowkv.kernels._jit import round_to
from shadowkv.kernels._launch import check, interpreting

MAX_HIDDEN = 16384  # one row per program in registers; Llama-3-70B has 8192
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_kernel(
    out_ptr,
    h_ptr,
    x_ptr,
    res_ptr,
    w_ptr,
    stride_o,
    stride_h,
    stride_x,
    stride_r,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = round_to(x.to(tl.float32) + r.to(tl.float32), x.dtype, EMULATE_RNE)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / hidden + eps)
    normed = round_to(hf * rstd, x.dtype, EMULATE_RNE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = round_to(w * normed, out_ptr.dtype.element_ty, EMULATE_RNE)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def _empty(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A new output in ``like``'s dtype and device (tests swap in NaN-filled buffers)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """``t [..., hidden]`` as ``[rows, hidden]``, a view when the strides allow one."""
    return t if t.dim() == 2 else t.reshape(-1, hidden)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, h)`` for ``x, residual [..., hidden]`` and ``weight [hidden]``; see
    ``reference.rms_norm``. ``h`` is ``x`` itself without a residual."""
    hidden = x.shape[-1]
    check(x.dim() >= 1 and weight.shape == (hidden,), "weight must be [hidden] like x's last dim")
    check(
        x.dtype in FLOATS and weight.dtype in FLOATS,
        f"x and weight must be fp32, bf16 or fp16, got {x.dtype}, {weight.dtype}",
    )
    check(0 < hidden <= MAX_HIDDEN, f"hidden size {hidden} must be in (0, {MAX_HIDDEN}]")
    check(x.stride(-1) == 1 and weight.stride(0) == 1, "x and weight need a contiguous last dim")
    if residual is not None:
        check(
            residual.shape == x.shape and residual.dtype == x.dtype,
            f"residual {tuple(residual.shape)} {residual.dtype} must match x "
            f"{tuple(x.shape)} {x.dtype}",
        )
        check(residual.stride(-1) == 1, "residual needs a contiguous last dim")
    out = _empty(x.shape, x)
    h = x if residual is None else _empty(x.shape, x)
    if x.numel() == 0:
        return out, h
    x2, out2 = _rows(x, hidden), out.view(-1, hidden)
    r2 = x2 if residual is None else _rows(residual, hidden)
    h2 = x2 if residual is None else h.view(-1, hidden)  # h is never written without a residual
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        out2,
        h2,
        x2,
        r2,
        weight,
        out2.stride(0),
        h2.stride(0),
        x2.stride(0),
        r2.stride(0),
        hidden,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        EMULATE_RNE=interpreting(),
        num_warps=min(16, max(4, block // 512)),
    )
    return out, h
