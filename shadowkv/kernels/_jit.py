"""``@triton.jit`` helpers several kernels share (imports Triton: kernels' triton.py only)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    # fp32 x narrowed to dtype. The Triton 3.9 interpreter truncates fp32 -> bf16 where the
    # hardware rounds to nearest even; EMULATE_RNE (set when interpreting) rounds by hand first,
    # so CPU tests see what a GPU computes.
    if EMULATE_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)
