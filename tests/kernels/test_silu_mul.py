"""``silu_mul``: reference and Triton == a float64 oracle written here; the reference == the
model's MLP formula bit for bit.

Without CUDA the Triton kernel runs under ``TRITON_INTERPRET=1`` on the CPU. Triton outputs are
NaN-poisoned first, so a column or row the kernel misses shows up.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close_verbose

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import shadowkv.kernels.silu_mul.triton as triton_mod  # noqa: E402
from shadowkv.kernels.silu_mul import silu_mul  # noqa: E402
from shadowkv.kernels.silu_mul.reference import silu_mul as reference  # noqa: E402
from shadowkv.kernels.silu_mul.triton import silu_mul as triton_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16, FP16, FP32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's outputs start as NaN instead of whatever ``torch.empty`` returns."""
    monkeypatch.setattr(
        triton_mod,
        "_empty",
        lambda shape, like: torch.full(shape, float("nan"), dtype=like.dtype, device=like.device),
    )


def todays_formula(gate_up: torch.Tensor) -> torch.Tensor:
    """``models.llama.MLP.forward`` between its two projections, frozen as it was."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def oracle(gate_up: torch.Tensor) -> torch.Tensor:
    """float64 ``gate / (1 + exp(-gate)) * up``, returned in ``gate_up``'s dtype."""
    g = gate_up.cpu().double()
    inter = g.shape[-1] // 2
    gate, up = g[..., :inter], g[..., inter:]
    return (gate * torch.sigmoid(gate) * up).to(gate_up.dtype)


def make_case(T: int, inter: int, dtype: torch.dtype, strided: bool = False) -> torch.Tensor:
    """``gate_up [T, 2 * inter]``, gates spread over ``[-12, 12]``; ``strided`` makes it a column
    slice of wider rows."""
    gen = torch.Generator().manual_seed(hash((T, inter, dtype.itemsize, strided)) % 2**31)
    width = 2 * inter + 40 if strided else 2 * inter
    t = torch.randn(T, width, generator=gen, dtype=F64) * 4
    t = t.to(DEVICE, dtype)
    return t[:, 16 : 16 + 2 * inter] if strided else t


def check_against_oracle(fn, gate_up: torch.Tensor) -> torch.Tensor:
    before = gate_up.clone()
    out = fn(gate_up)
    assert torch.equal(gate_up, before), "the input must stay untouched"
    assert out.dtype == gate_up.dtype
    assert out.shape == (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    assert_close_verbose(out.cpu(), oracle(gate_up), what="silu(gate) * up")
    return out


CASES = [
    pytest.param(T, inter, dtype, strided, id=f"T{T}-I{inter}-{str(dtype)[6:]}{tag}")
    for T, inter, dtype, strided, tag in [
        (1, 1, FP32, False, ""),
        (3, 100, BF16, True, "-strided"),
        (17, 576, FP32, False, ""),
        (3, 1536, BF16, False, ""),  # SmolLM2-135M
        (1, 4864, BF16, False, ""),  # Qwen2.5-0.5B
        (3, 4864, FP32, True, "-strided"),
        (17, 896, BF16, False, ""),
        (3, 2048, FP16, False, ""),
    ]
]


@pytest.mark.parametrize(("T", "inter", "dtype", "strided"), CASES)
def test_matches_oracle(T: int, inter: int, dtype: torch.dtype, strided: bool) -> None:
    gate_up = make_case(T, inter, dtype, strided)
    ref = check_against_oracle(reference, gate_up)
    out = check_against_oracle(triton_op, gate_up)
    assert_close_verbose(out.cpu(), ref.cpu(), what="Triton vs reference")


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_reference_is_bitwise_todays_formula(dtype: torch.dtype) -> None:
    gate_up = make_case(17, 896, dtype)
    assert torch.equal(reference(gate_up), todays_formula(gate_up))
    assert torch.equal(reference(gate_up.view(1, 17, -1)), todays_formula(gate_up)[None])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, under the interpreter
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_extreme_gates(dtype: torch.dtype) -> None:
    """``exp(-gate)`` overflows to inf for very negative gates: the result is ``-0 * up``."""
    gate = torch.tensor([-1e4, -100.0, -20.0, -0.0, 0.0, 1e-30, 20.0, 100.0, 1e4])
    up = torch.tensor([3.0, -2.0, 1.0, 5.0, -5.0, 1e30, 0.5, -0.25, 2.0])
    gate_up = torch.cat([gate, up])[None].to(DEVICE, dtype)
    for fn in (reference, triton_op):
        out = check_against_oracle(fn, gate_up)
        assert torch.isfinite(out).all()


def test_leading_dims() -> None:
    gate_up = make_case(6, 896, BF16)
    out = triton_op(gate_up.view(2, 3, -1))
    assert out.shape == (2, 3, 896)
    assert_close_verbose(out.view(6, 896).cpu(), reference(gate_up).cpu(), what="[2, 3, I]")


def test_zero_rows() -> None:
    for fn in (reference, triton_op):
        assert fn(make_case(0, 64, BF16)).shape == (0, 64)


def test_dispatcher_routes_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(triton_mod, "silu_mul", lambda *a: calls.append(a) or triton_op(*a))
    gate_up = make_case(3, 100, BF16)
    monkeypatch.setenv("SHADOWKV_KERNELS", "torch")
    check_against_oracle(silu_mul, gate_up)
    assert not calls
    monkeypatch.setenv("SHADOWKV_KERNELS", "triton")
    check_against_oracle(silu_mul, gate_up)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("gate_up", "match"),
    [
        pytest.param(torch.zeros(3, 7), r"\[\.\.\., 2 \* I\]", id="odd-width"),
        pytest.param(torch.tensor(1.0), r"\[\.\.\., 2 \* I\]", id="0d"),
        pytest.param(torch.zeros(3, 8, dtype=torch.int32), "floating point", id="integer"),
    ],
)
@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_bad_arguments_are_refused(
    gate_up: torch.Tensor, match: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHADOWKV_KERNELS", mode)
    with pytest.raises(ValueError, match=match):
        silu_mul(gate_up)


def test_triton_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        triton_op(torch.zeros(3, 8, dtype=F64))
    with pytest.raises(ValueError, match="contiguous"):
        triton_op(torch.zeros(8, 3).t())
    with pytest.raises(ValueError, match="2 \\* I"):
        triton_op(torch.zeros(3, 7))
