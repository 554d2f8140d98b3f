"""SwiGLU's ``silu(gate) * up`` in Triton: one launch over ``[rows, I]`` tiles.

Same contract as ``reference.silu_mul``. Program ``(row, block)`` loads ``BLOCK`` gate columns
and the matching up columns ``I`` further along the row, computes in fp32 and stores in the input
dtype (narrowing through ``kernels._jit.round_to``). ``silu(gate)`` is rounded to the input
dtype before the product, as PyTorch's two ops do, so 16-bit results match the model's formula
up to ``exp``'s last bit. Rows may be strided; the last dim must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shadowkv.kernels._jit import round_to
from shadowkv.kernels._launch import check, interpreting

BLOCK_COLS = 1024
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _silu_mul_kernel(
    out_ptr,
    gate_up_ptr,
    stride_o,
    stride_g,
    inter,
    BLOCK: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    src = gate_up_ptr + row * stride_g + cols
    gate = tl.load(src, mask=mask, other=0.0)
    up = tl.load(src + inter, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    act = round_to(g / (1.0 + tl.exp(-g)), gate.dtype, EMULATE_RNE).to(tl.float32)
    out = round_to(act * up, out_ptr.dtype.element_ty, EMULATE_RNE)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def _empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A new output in ``like``'s dtype and device (tests swap in NaN-filled buffers)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` ``[..., I]`` for ``gate_up [..., 2 * I]``; see
    ``reference.silu_mul``."""
    check(
        gate_up.dim() >= 1 and gate_up.shape[-1] % 2 == 0,
        f"gate_up must be [..., 2 * I], got {tuple(gate_up.shape)}",
    )
    check(gate_up.dtype in FLOATS, f"gate_up must be fp32, bf16 or fp16, got {gate_up.dtype}")
    check(gate_up.stride(-1) == 1, "gate_up needs a contiguous last dim")
    inter = gate_up.shape[-1] // 2
    out = _empty((*gate_up.shape[:-1], inter), gate_up)
    if out.numel() == 0:
        return out
    g2 = gate_up if gate_up.dim() == 2 else gate_up.reshape(-1, 2 * inter)
    out2 = out.view(-1, inter)
    block = min(BLOCK_COLS, triton.next_power_of_2(inter))
    grid = (g2.shape[0], triton.cdiv(inter, block))
    _silu_mul_kernel[grid](
        out2,
        g2,
        out2.stride(0),
        g2.stride(0),
        inter,
        BLOCK=block,
        EMULATE_RNE=interpreting(),
        num_warps=4,
    )
    return out
