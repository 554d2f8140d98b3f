"""``apply_rope``: reference and Triton == a float64 complex-multiplication oracle written here.

Without CUDA the Triton kernel runs under ``TRITON_INTERPRET=1`` on the CPU. Also pins the
reference ``rotate`` to the old duplicated-table formula bit for bit (neox, full rotary).
"""

from __future__ import annotations

import os

import pytest
import torch
from utils import assert_close_verbose

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from shadowkv.kernels.rope import ROPE_STYLES, apply_rope, rotate  # noqa: E402
from shadowkv.kernels.rope.reference import apply_rope as reference  # noqa: E402
from shadowkv.kernels.rope.triton import apply_rope as triton_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16, FP16, FP32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
MAX_POS = 4096


def tables(Dr: int, dtype: torch.dtype = FP32) -> tuple[torch.Tensor, torch.Tensor]:
    """``[MAX_POS, Dr/2]`` cos/sin tables, one column per frequency."""
    inv = 10000.0 ** (-torch.arange(0, Dr, 2, dtype=F64) / Dr)
    ang = torch.outer(torch.arange(MAX_POS, dtype=F64), inv)
    return ang.cos().to(DEVICE, dtype), ang.sin().to(DEVICE, dtype)


def oracle(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """float64: each pair as the complex number ``x1 + i x2`` times ``cos + i sin``.

    ``x [T, H, D]``, ``cos/sin [T, Dr/2]``; dims ``[Dr, D)`` are copied.
    """
    x = x.cpu().double()
    half = cos.shape[-1]
    turn = torch.complex(cos.cpu().double(), sin.cpu().double())[:, None, :]  # [T, 1, Dr/2]
    head = x[..., : 2 * half]
    if style == "neox":  # pair i = (x[i], x[i + half])
        pairs = head.unflatten(-1, (2, half)).transpose(-1, -2)
    else:  # pair i = (x[2i], x[2i + 1])
        pairs = head.unflatten(-1, (half, 2))
    turned = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * turn)  # [.., half, 2]
    if style == "neox":
        turned = turned.transpose(-1, -2)
    return torch.cat([turned.flatten(-2), x[..., 2 * half :]], dim=-1)


def make_case(T: int, Hkv: int, G: int, D: int, Dr: int, dtype: torch.dtype, table_dtype=FP32):
    """q and k as strided views of one packed ``[T, H + 2 Hkv, D]`` projection, like a model's."""
    gen = torch.Generator().manual_seed(hash((T, Hkv, G, D, Dr)) % 2**31)
    H = G * Hkv
    qkv = torch.randn(T, H + 2 * Hkv, D, generator=gen, dtype=F64).to(DEVICE, dtype)
    positions = torch.randint(0, MAX_POS, (T,), generator=gen).to(DEVICE)
    cos, sin = tables(Dr, table_dtype)
    return qkv[:, :H], qkv[:, H : H + Hkv], cos[positions], sin[positions]


def check_against_oracle(fn, q, k, cos, sin, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    q_before, k_before = q.clone(), k.clone()
    q_rot, k_rot = fn(q, k, cos, sin, style)
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "inputs must stay untouched"
    Dr = 2 * cos.shape[-1]
    for name, got, x in (("q", q_rot, q), ("k", k_rot, k)):
        assert got.dtype == x.dtype and got.shape == x.shape
        want = oracle(x, cos, sin, style).to(x.dtype)
        assert_close_verbose(got.cpu(), want, what=f"{name} rotated")
        assert torch.equal(got[..., Dr:], x[..., Dr:]), f"{name}: pass-through dims changed"
    return q_rot, k_rot


CASES = [
    pytest.param(
        T,
        Hkv,
        G,
        D,
        int(D * frac),
        style,
        dtype,
        id=f"T{T}-Hkv{Hkv}-G{G}-D{D}-Dr{int(D * frac)}-{style}-{str(dtype)[6:]}",
    )
    for T, Hkv, G, D, frac, style, dtype in [
        (1, 2, 1, 64, 1.0, "neox", FP32),
        (7, 3, 4, 64, 0.5, "interleaved", FP32),
        (7, 1, 3, 96, 1.0, "interleaved", BF16),
        (7, 2, 3, 96, 0.5, "neox", FP32),
        (1, 8, 4, 128, 1.0, "neox", BF16),
        (33, 2, 7, 128, 1.0, "interleaved", BF16),
        (33, 2, 4, 128, 0.5, "neox", BF16),
        (33, 1, 7, 128, 0.25, "interleaved", FP32),
        (7, 4, 1, 128, 0.25, "neox", BF16),
    ]
]


@pytest.mark.parametrize(("T", "Hkv", "G", "D", "Dr", "style", "dtype"), CASES)
def test_matches_oracle(T: int, Hkv: int, G: int, D: int, Dr: int, style: str, dtype) -> None:
    q, k, cos, sin = make_case(T, Hkv, G, D, Dr, dtype)
    ref = check_against_oracle(reference, q, k, cos, sin, style)
    out = check_against_oracle(triton_op, q, k, cos, sin, style)
    for name, o, r in zip("qk", out, ref):
        assert_close_verbose(o.cpu(), r.cpu(), what=f"{name}: Triton vs reference")


@pytest.mark.parametrize(
    ("dtype", "table_dtype"),
    [(FP16, BF16), (BF16, FP16), (FP32, F64)],
    ids=["x-fp16-tables-bf16", "x-bf16-tables-fp16", "x-fp32-tables-fp64"],
)
def test_table_dtypes(dtype: torch.dtype, table_dtype: torch.dtype) -> None:
    q, k, cos, sin = make_case(7, 2, 3, 64, 64, dtype, table_dtype)
    check_against_oracle(reference, q, k, cos, sin, "neox")
    check_against_oracle(triton_op, q, k, cos, sin, "interleaved")


@pytest.mark.parametrize("dtype", [FP32, BF16, F64], ids=str)
def test_neox_is_bitwise_the_old_duplicated_table_formula(dtype: torch.dtype) -> None:
    """``x * cat(c, c) + rotate_half(x) * cat(s, s)`` in the table dtype, as models/rope.py did."""
    q, _, cos, sin = make_case(33, 2, 4, 128, 128, dtype)
    if dtype == F64:
        cos, sin = cos.double(), sin.double()
    c, s = torch.cat([cos, cos], -1)[:, None, :], torch.cat([sin, sin], -1)[:, None, :]
    xf = q.to(cos.dtype)
    half = q.shape[-1] // 2
    old = (xf * c + torch.cat([-xf[..., half:], xf[..., :half]], dim=-1) * s).to(q.dtype)
    assert torch.equal(rotate(q, cos[:, None, :], sin[:, None, :]), old)


def test_zero_tokens() -> None:
    q, k, cos, sin = make_case(0, 2, 2, 64, 32, FP32)
    for fn in (reference, triton_op):
        q_rot, k_rot = fn(q, k, cos, sin, "neox")
        assert q_rot.shape == (0, 4, 64) and k_rot.shape == (0, 2, 64)


def test_dispatcher_routes_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    import shadowkv.kernels.rope.triton as mod

    calls = []
    monkeypatch.setattr(mod, "apply_rope", lambda *a: calls.append(a) or triton_op(*a))
    q, k, cos, sin = make_case(7, 2, 3, 64, 32, FP32)
    monkeypatch.setenv("SHADOWKV_KERNELS", "torch")
    check_against_oracle(apply_rope, q, k, cos, sin, "interleaved")
    assert not calls
    monkeypatch.setenv("SHADOWKV_KERNELS", "triton")
    check_against_oracle(apply_rope, q, k, cos, sin, "interleaved")
    assert len(calls) == 1


def _bad(T=3, H=4, Hkv=2, D=64, half=16, **change):
    args = dict(
        q=torch.zeros(T, H, D),
        k=torch.zeros(T, Hkv, D),
        cos=torch.zeros(T, half),
        sin=torch.zeros(T, half),
        style="neox",
    )
    return args | change


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param(_bad(style="gptj"), "style", id="unknown-style"),
        pytest.param(_bad(half=40), "Dr", id="Dr-over-D"),
        pytest.param(_bad(half=0), "Dr", id="no-rotary-dims"),
        pytest.param(_bad(q=torch.zeros(3, 64)), r"q \[T, H, D\]", id="q-2d"),
        pytest.param(_bad(k=torch.zeros(3, 2, 32)), "like q", id="k-head-dim"),
        pytest.param(_bad(k=torch.zeros(4, 2, 64)), "like q", id="k-tokens"),
        pytest.param(_bad(cos=torch.zeros(5, 16), sin=torch.zeros(5, 16)), "T=3", id="cos-rows"),
        pytest.param(_bad(sin=torch.zeros(3, 8)), "sin", id="sin-shape"),
        pytest.param(
            _bad(cos=torch.zeros(3, 16, dtype=torch.long)), "floating", id="integer-tables"
        ),
    ],
)
def test_bad_arguments_are_refused(args: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_rope(**args)


def test_triton_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        triton_op(**_bad(q=torch.zeros(3, 4, 64, dtype=F64)))
    with pytest.raises(ValueError, match="contiguous"):
        triton_op(**_bad(q=torch.zeros(3, 64, 4).transpose(1, 2)))
    with pytest.raises(ValueError, match="style"):
        rotate(torch.zeros(3, 64), torch.zeros(3, 16), torch.zeros(3, 16), "rotate-half")
    assert ROPE_STYLES == ("neox", "interleaved")
