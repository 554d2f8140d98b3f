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


@triton.jit
def fp8e4m3_to_f32(codes):
    # uint8 e4m3fn codes -> their unscaled float32 values, from the bits (the Triton interpreter
    # has no fp8 type; on a GPU this is a few integer ops per byte of a memory-bound load).
    # Normal numbers move the 4-bit exponent (bias 7) and 3-bit mantissa into a float32's fields;
    # subnormals (exponent 0) are mantissa * 2**-9. The NaN codes 0x7F / 0xFF are never stored.
    b = codes.to(tl.uint32)
    sign = (b >> 7) << 31
    e = (b >> 3) & 0xF
    m = b & 0x7
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    sub = tl.where(sign != 0, -sub, sub)
    return tl.where(e == 0, sub, normal)
