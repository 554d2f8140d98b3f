"""fp8 (e4m3) storage: values and landmarks at one byte each, with a float32 scale per group.

The format is OCP e4m3 "fn" (``torch.float8_e4m3fn``): 1 sign bit, 4 exponent bits (bias 7), 3
mantissa bits, largest finite value 448, no infinities. A group of elements (the last dimension
of the tensor handed in: one token of one KV head for values, one landmark for landmarks) shares
one scale ``amax / 448``, so every group uses the whole fp8 range and nothing can overflow.

Codes are stored as ``uint8``, not as a float8 tensor: the Triton interpreter that runs the CPU
suite has no fp8 type, and a byte tensor moves, pins and pages like any other. Kernels decode the
bits themselves (``_jit.fp8e4m3_to_f32``); this module is the PyTorch reference of both ends.

Round-trip error of one element ``x`` of a group with scale ``s``: at most ``|x| * 2**-4``
(half a unit in the last of 3 mantissa bits) where ``|x| / s >= 2**-6`` (normal range), and at
most ``s * 2**-10`` below it (subnormals step by ``2**-9``). Infinities saturate to the largest
float32 before scaling; NaN stays NaN.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite e4m3fn value
CODE_DTYPE = torch.uint8  # how codes are stored
SCALE_DTYPE = torch.float32
# Smallest scale: a group whose amax is below 448 * 2**-126 (all but zero) would otherwise get a
# subnormal or zero scale and divide to inf; its elements round towards zero instead.
MIN_SCALE = 2.0**-126
VALUE_DTYPES = ("auto", "fp8")  # ShadowKVConfig.value_dtype / landmark_dtype choices
SLICE_ELEMS = 1 << 24  # elements quantised at a time (64 MiB of float32 temporaries)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., G]`` -> (codes ``[..., G]`` uint8, scales ``[...]`` float32), one scale per
    group of the last dimension. Runs on ``x``'s device (the prefill's), in slices of groups so
    a long prompt's float32 temporaries stay small (a 122K-token layer would need ~2 GB)."""
    groups = x.reshape(-1, x.shape[-1])
    codes = torch.empty(groups.shape, dtype=CODE_DTYPE, device=x.device)
    scales = torch.empty(groups.shape[0], dtype=SCALE_DTYPE, device=x.device)
    step = max(1, SLICE_ELEMS // max(1, groups.shape[1]))
    for i in range(0, groups.shape[0], step):
        codes[i : i + step], scales[i : i + step] = _quantize_groups(groups[i : i + step])
    return codes.view(x.shape), scales.view(x.shape[:-1])


def _quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    fmax = torch.finfo(torch.float32).max
    xf = torch.where(xf.isinf(), xf.sign() * fmax, xf)  # saturate; NaN passes through
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scales = (amax / FP8_MAX).clamp_min(MIN_SCALE)
    # Division can land a hair above 448 (rounding); clamp so the cast never makes NaN.
    q = (xf / scales).clamp_(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn).view(CODE_DTYPE), scales.squeeze(-1)


def fp8_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Unscaled float32 values of ``uint8`` e4m3fn codes."""
    return codes.view(torch.float8_e4m3fn).float()


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 ``codes * scales[..., None]`` (inverse of ``quantize_fp8``, to its rounding)."""
    return fp8_to_float(codes) * scales.float().unsqueeze(-1)


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the fp8 store gives it back (in ``x``'s dtype): what tests compare against."""
    return dequantize_fp8(*quantize_fp8(x)).to(x.dtype)
