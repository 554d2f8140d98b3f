"""The fp8 (e4m3) storage format: PyTorch quantiser and the Triton bit decoder kernels use."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from shadowkv.kernels._jit import fp8e4m3_to_f32  # noqa: E402
from shadowkv.kernels.fp8 import (  # noqa: E402
    FP8_MAX,
    MIN_SCALE,
    dequantize_fp8,
    fp8_to_float,
    quantize_fp8,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def round_trip_bound(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per element: half an ulp of a 3-bit mantissa in the normal range, half a subnormal step
    (2**-9 of the scale) below it."""
    return torch.maximum(x.abs() * 2**-4, scales[..., None] * 2**-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_round_trip_within_the_format_bound(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, 96, generator=gen) * torch.logspace(-6, 4, 64)[:, None, None]
    x = x.to(dtype)
    codes, scales = quantize_fp8(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == x.shape[:-1]
    back = dequantize_fp8(codes, scales)
    err = (back - x.float()).abs()
    assert (err <= round_trip_bound(x.float(), scales)).all()
    # The group's largest magnitude is exact (it maps to +-448).
    i = x.float().abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(back.gather(-1, i), x.float().gather(-1, i), rtol=2**-20, atol=0)


def test_edge_values_saturate_and_never_make_inf_or_nan() -> None:
    big = torch.finfo(torch.float32).max
    x = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # all zeros: exact zeros back
            [1.0, -1.0, FP8_MAX, -FP8_MAX],  # +-max of the format
            [1e30, -1e30, 3.0, 0.5],  # far beyond the fp8 range
            [float("inf"), float("-inf"), 1.0, -2.0],  # infinities saturate
            [1e-30, -3e-31, 2e-32, 0.0],  # tiny values keep their relative size
            [1e-42, 0.0, -1e-42, 0.0],  # float32 subnormals: scale floors at MIN_SCALE
        ]
    )
    codes, scales = quantize_fp8(x)
    back = dequantize_fp8(codes, scales)
    assert back.isfinite().all() and (scales > 0).all() and (scales >= MIN_SCALE).all()
    assert torch.equal(back[0], torch.zeros(4))
    torch.testing.assert_close(back[1], x[1], rtol=0, atol=0)
    torch.testing.assert_close(back[2, :2], x[2, :2], rtol=2**-20, atol=0)
    assert torch.equal(back[3, :2], torch.tensor([big, -big]))
    finite = x[[0, 1, 2, 4, 5]]
    ok = (back[[0, 1, 2, 4, 5]] - finite).abs() <= round_trip_bound(finite, scales[[0, 1, 2, 4, 5]])
    assert ok.all()
    assert back[4, 0] == pytest.approx(1e-30, rel=2**-4)
    assert (back[5].abs() <= 1e-42 + MIN_SCALE * 2**-10).all()


@triton.jit
def _decode_kernel(codes_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    codes = tl.load(codes_ptr + offs, mask=offs < N, other=0)
    tl.store(out_ptr + offs, fp8e4m3_to_f32(codes), mask=offs < N)


def test_triton_bit_decoder_equals_torch_for_every_code() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    want = fp8_to_float(codes)
    keep = ~want.isnan()  # 0x7F / 0xFF: NaN codes, never stored (the quantiser saturates)
    out = torch.empty(256, dtype=torch.float32, device=DEVICE)
    _decode_kernel[(1,)](codes.to(DEVICE), out, 256, BLOCK=256)
    out = out.cpu()
    assert torch.equal(out[keep], want[keep])
    assert torch.equal(out[keep].signbit(), want[keep].signbit())  # -0.0 stays -0.0
    assert int(keep.sum()) == 254


def test_quantising_in_slices_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import shadowkv.kernels.fp8 as fp8

    x = torch.randn(37, 3, 64) * torch.logspace(-3, 3, 37)[:, None, None]
    whole = quantize_fp8(x)
    monkeypatch.setattr(fp8, "SLICE_ELEMS", 64 * 5)  # 5 groups a slice, the last one short
    sliced = fp8.quantize_fp8(x)
    assert torch.equal(whole[0], sliced[0]) and torch.equal(whole[1], sliced[1])
