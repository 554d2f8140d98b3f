"""``rms_norm``: reference and Triton == a float64 oracle written here; the reference == the
model's RMSNorm formula (and residual add) bit for bit.

Without CUDA the Triton kernel runs under ``TRITON_INTERPRET=1`` on the CPU. Triton outputs are
NaN-poisoned first, so a column or row the kernel misses shows up.
"""

from __future__ import annotations

import os

import pytest
import torch
from utils import assert_close_verbose

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import shadowkv.kernels.rms_norm.triton as triton_mod  # noqa: E402
from shadowkv.kernels.rms_norm import MAX_TRITON_HIDDEN, rms_norm  # noqa: E402
from shadowkv.kernels.rms_norm.reference import rms_norm as reference  # noqa: E402
from shadowkv.kernels.rms_norm.triton import rms_norm as triton_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16, FP16, FP32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
EPS = 1e-5
ROW_SCALES = (1.0, 0.0, 30.0, 1e-3)  # row i is scaled by ROW_SCALES[i % 4]: zero rows included


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's outputs start as NaN instead of whatever ``torch.empty`` returns."""
    monkeypatch.setattr(
        triton_mod,
        "_empty",
        lambda shape, like: torch.full(shape, float("nan"), dtype=like.dtype, device=like.device),
    )


def todays_formula(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``DecoderLayer``'s residual add and ``models.llama.RMSNorm.forward``, frozen as they were."""
    h = x if residual is None else x + residual
    xf = h.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(h.dtype), h


def oracle(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64: ``h`` rounded once to ``x``'s dtype, ``out = w * h / sqrt(mean(h^2) + eps)``;
    both returned in ``x``'s dtype."""
    h = x.cpu().double()
    if residual is not None:
        h = h + residual.cpu().double()
    h = h.to(x.dtype).double()  # the residual stream is stored in x's dtype
    out = weight.cpu().double() * h / (h.square().mean(-1, keepdim=True) + eps).sqrt()
    return out.to(x.dtype), h.to(x.dtype)


def make_case(
    T: int,
    hidden: int,
    dtype: torch.dtype,
    with_residual: bool,
    weight_dtype: torch.dtype | None = None,
    strided: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x [T, hidden], weight [hidden], residual [T, hidden] or None)``; ``strided`` makes
    ``x`` and ``residual`` column slices of wider rows, like a packed projection's."""
    gen = torch.Generator().manual_seed(hash((T, hidden, dtype.itemsize, with_residual)) % 2**31)
    scales = torch.tensor([ROW_SCALES[i % len(ROW_SCALES)] for i in range(T)], dtype=F64)

    def rows() -> torch.Tensor:
        width = hidden + 24 if strided else hidden
        t = torch.randn(T, width, generator=gen, dtype=F64) * scales[:, None]
        return t.to(DEVICE, dtype)[:, 8 : 8 + hidden] if strided else t.to(DEVICE, dtype)

    x = rows()
    residual = rows() if with_residual else None
    weight = 1 + 0.25 * torch.randn(hidden, generator=gen, dtype=F64)
    return x, weight.to(DEVICE, weight_dtype or dtype), residual


def check_against_oracle(fn, x, weight, residual) -> tuple[torch.Tensor, torch.Tensor]:
    before = [t.clone() for t in (x, weight, residual) if t is not None]
    out, h = fn(x, weight, EPS, residual)
    after = [t for t in (x, weight, residual) if t is not None]
    assert all(map(torch.equal, before, after)), "inputs must stay untouched"
    assert out.dtype == x.dtype and out.shape == x.shape and h.shape == x.shape
    if residual is None:
        assert h is x, "without a residual h is x itself"
    want_out, want_h = oracle(x, weight, EPS, residual)
    assert_close_verbose(h.cpu(), want_h, what="h = x + residual")
    assert_close_verbose(out.cpu(), want_out, what="out")
    return out, h


CASES = [
    pytest.param(T, hidden, dtype, res, w_dtype, strided, id=f"T{T}-h{hidden}-{name}")
    for T, hidden, dtype, res, w_dtype, strided, name in [
        (1, 576, BF16, True, None, False, "bf16-res"),  # SmolLM2
        (3, 576, FP32, False, None, False, "fp32"),
        (17, 576, BF16, False, FP32, False, "bf16-fp32w"),
        (3, 896, BF16, True, None, True, "bf16-res-strided"),  # Qwen2.5-0.5B
        (17, 896, FP32, True, None, False, "fp32-res"),
        (3, 3584, BF16, True, FP32, False, "bf16-res-fp32w"),  # Qwen2.5-7B
        (1, 3584, FP32, True, None, True, "fp32-res-strided"),
        (3, 4096, BF16, True, None, False, "bf16-res"),  # Llama-3.1-8B
        (1, 4096, BF16, False, None, True, "bf16-strided"),
        (3, 4096, FP16, True, None, False, "fp16-res"),
        (17, 100, FP32, True, BF16, False, "fp32-res-bf16w"),
        (3, 1, BF16, True, None, False, "bf16-res"),
    ]
]


@pytest.mark.parametrize(("T", "hidden", "dtype", "res", "w_dtype", "strided"), CASES)
def test_matches_oracle(T, hidden, dtype, res, w_dtype, strided) -> None:
    x, weight, residual = make_case(T, hidden, dtype, res, w_dtype, strided)
    ref_out, ref_h = check_against_oracle(reference, x, weight, residual)
    out, h = check_against_oracle(triton_op, x, weight, residual)
    assert torch.equal(h, ref_h), "h is one rounded add: Triton and PyTorch must agree exactly"
    assert_close_verbose(out.cpu(), ref_out.cpu(), what="out: Triton vs reference")


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_reference_is_bitwise_todays_formula(dtype: torch.dtype, with_residual: bool) -> None:
    x, weight, residual = make_case(17, 896, dtype, with_residual)
    out, h = reference(x, weight, 1e-6, residual)
    want_out, want_h = todays_formula(x, weight, 1e-6, residual)
    assert out.dtype == want_out.dtype == dtype
    assert torch.equal(out, want_out) and torch.equal(h, want_h)


def test_fp32_weight_with_bf16_x_is_rounded_to_bf16() -> None:
    """Today's formula promotes to fp32 here; the op returns that product rounded to bf16."""
    x, weight, residual = make_case(3, 576, BF16, True, FP32)
    out, h = reference(x, weight, EPS, residual)
    want_out, want_h = todays_formula(x, weight, EPS, residual)
    assert want_out.dtype == FP32 and out.dtype == BF16
    assert torch.equal(out, want_out.to(BF16)) and torch.equal(h, want_h)


def test_leading_dims_are_flattened() -> None:
    x, weight, residual = make_case(6, 896, BF16, True)
    out, h = triton_op(x.view(2, 3, 896), weight, EPS, residual.view(2, 3, 896))
    assert out.shape == h.shape == (2, 3, 896)
    want_out, want_h = reference(x, weight, EPS, residual)
    assert torch.equal(h.view(6, 896), want_h)
    assert_close_verbose(out.view(6, 896).cpu(), want_out.cpu(), what="out [2, 3, hidden]")


def test_zero_rows() -> None:
    x, weight, residual = make_case(0, 576, BF16, True)
    for fn in (reference, triton_op):
        out, h = fn(x, weight, EPS, residual)
        assert out.shape == h.shape == (0, 576)


def test_dispatcher_routes_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(triton_mod, "rms_norm", lambda *a: calls.append(a) or triton_op(*a))
    x, weight, residual = make_case(3, 896, BF16, True)
    monkeypatch.setenv("SHADOWKV_KERNELS", "torch")
    check_against_oracle(rms_norm, x, weight, residual)
    assert not calls
    monkeypatch.setenv("SHADOWKV_KERNELS", "triton")
    check_against_oracle(rms_norm, x, weight, residual)
    check_against_oracle(rms_norm, x, weight, None)
    assert len(calls) == 2
    assert MAX_TRITON_HIDDEN == triton_mod.MAX_HIDDEN
    wide = torch.ones(1, MAX_TRITON_HIDDEN + 1)  # too wide for one row per program
    out, _ = rms_norm(wide, torch.ones(MAX_TRITON_HIDDEN + 1), EPS)
    assert len(calls) == 2, "rows wider than the kernel's limit take the reference"
    assert torch.allclose(out, torch.ones_like(wide))


def _bad(T=3, hidden=64, **change) -> dict:
    args = dict(
        x=torch.zeros(T, hidden),
        weight=torch.ones(hidden),
        eps=EPS,
        residual=torch.zeros(T, hidden),
    )
    return args | change


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param(_bad(weight=torch.ones(63)), r"weight \[hidden\]", id="weight-size"),
        pytest.param(_bad(weight=torch.ones(1, 64)), r"weight \[hidden\]", id="weight-2d"),
        pytest.param(_bad(x=torch.tensor(1.0)), r"x \[\.\.\., hidden\]", id="x-0d"),
        pytest.param(_bad(residual=torch.zeros(4, 64)), "shape and dtype", id="residual-rows"),
        pytest.param(_bad(residual=torch.zeros(3, 32)), "shape and dtype", id="residual-width"),
        pytest.param(
            _bad(residual=torch.zeros(3, 64, dtype=BF16)), "shape and dtype", id="residual-dtype"
        ),
        pytest.param(
            _bad(x=torch.zeros(3, 64, dtype=torch.long)), "floating point", id="integer-x"
        ),
    ],
)
@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_bad_arguments_are_refused(
    args: dict, match: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHADOWKV_KERNELS", mode)
    with pytest.raises(ValueError, match=match):
        rms_norm(**args)


def test_triton_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        triton_op(**_bad(x=torch.zeros(3, 64, dtype=F64), residual=None))
    with pytest.raises(ValueError, match="contiguous"):
        triton_op(**_bad(x=torch.zeros(64, 3).t()))
    with pytest.raises(ValueError, match="contiguous"):
        triton_op(**_bad(residual=torch.zeros(64, 3).t()))
    with pytest.raises(ValueError, match="hidden size"):
        triton_op(**_bad(hidden=MAX_TRITON_HIDDEN + 1, T=1))


def test_triton_per_head_norm_of_a_strided_qkv_slice() -> None:
    """Qwen3 / Gemma-3 norm each head of q and k: ``[T, H, D]`` views of the fused projection's
    output, rows strided by the q/k/v width."""
    T, H, Hkv, D = 5, 4, 2, 32
    qkv = torch.randn(T, (H + 2 * Hkv) * D, device=DEVICE)
    k = qkv[:, H * D : (H + Hkv) * D].view(T, Hkv, D)
    w = torch.rand(D, device=DEVICE) + 0.5
    out, _ = triton_op(k, w, EPS)
    assert out.shape == (T, Hkv, D)
    assert_close_verbose(out.cpu(), oracle(k, w, EPS, None)[0], what="per-head norm")
