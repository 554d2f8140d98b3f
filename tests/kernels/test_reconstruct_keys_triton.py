"""Triton ``reconstruct_keys`` == PyTorch reference == float64 oracle (interpreter without CUDA)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from shadowkv.kernels.reconstruct_keys import reconstruct_keys as public_op  # noqa: E402
from shadowkv.kernels.reconstruct_keys.reference import reconstruct_keys as reference  # noqa: E402
from shadowkv.kernels.reconstruct_keys.triton import reconstruct_keys as triton_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
S = 16  # rows per cache block


def rope_tables(max_pos: int, Dr: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[max_pos, Dr/2]`` fp32 tables, one column per frequency."""
    inv = 10000.0 ** (-torch.arange(0, Dr, 2, dtype=torch.float64) / Dr)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def make_case(
    lens: list[int],
    Hkv: int,
    K: int,
    C: int,
    R: int,
    D: int,
    P: int,
    dtype: torch.dtype,
    Dr: int | None = None,
    style: str = "neox",
) -> dict:
    """Distinct chunks per head, ~half the used slots missed, the rest hits or unused."""
    gen = torch.Generator().manual_seed(hash((tuple(lens), Hkv, K, C, R, D, P)) % 2**31)
    B = len(lens)
    max_pages = max(-(-n // P) for n in lens) + 1
    num_pages = B * max_pages + 1
    a_pages = torch.randn(num_pages, P, R, generator=gen, dtype=torch.float64)
    table = torch.randperm(num_pages, generator=gen)[: B * max_pages].view(B, max_pages).int()
    w_t = torch.randn(B + 2, R, Hkv * D, generator=gen, dtype=torch.float64) / R**0.5
    basis_rows = torch.randperm(B + 2, generator=gen)[:B]
    slot_ids = torch.full((B, Hkv, K), -1, dtype=torch.int32)
    used = [min(K, n // C) for n in lens]
    for b, n in enumerate(lens):
        for h in range(Hkv):
            slot_ids[b, h, : used[b]] = torch.randperm(n // C, generator=gen)[: used[b]].int()
    miss = (torch.rand(B, Hkv, K, generator=gen) < 0.5) & (slot_ids >= 0)
    num_rows = (B * K * C // S + 4) * S
    dst = torch.randperm(num_rows, generator=gen)[: B * K * C].view(B, K * C)
    for b in range(B):
        dst[b, used[b] * C :] = -1
    cos, sin = rope_tables(max(lens) + 8, D if Dr is None else Dr)
    to = dict(device=DEVICE)
    return dict(
        k_cache=torch.full((num_rows // S, S, Hkv, D), float("nan"), dtype=dtype, **to),
        a_pages=a_pages.to(dtype=dtype, **to),
        page_table=table.to(**to),
        w_t=w_t.to(dtype=dtype, **to),
        basis_rows=basis_rows.to(**to),
        slot_ids=slot_ids.to(**to),
        miss=miss.to(**to),
        cos=cos.to(**to),
        sin=sin.to(**to),
        dst_rows=dst.to(**to),
        chunk_size=C,
        style=style,
    )


def oracle(case: dict) -> torch.Tensor:
    """float64 rebuild of every missed row, pairs turned as complex numbers; untouched rows NaN."""
    g = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    out = g["k_cache"].double().clone()
    Hkv, D = out.shape[2], out.shape[3]
    flat = out.view(-1, Hkv, D)
    C, P = g["chunk_size"], g["a_pages"].shape[1]
    a_pages, w_t = g["a_pages"].double(), g["w_t"].double()
    turn = torch.complex(g["cos"].double(), g["sin"].double())  # [P, Dr/2]
    half = turn.shape[1]
    first = torch.arange(half) * (2 if g["style"] == "interleaved" else 1)
    second = first + (1 if g["style"] == "interleaved" else half)
    for b, h, s in g["miss"].nonzero().tolist():
        c = int(g["slot_ids"][b, h, s])
        w = w_t[g["basis_rows"][b], :, h * D : (h + 1) * D]
        for j in range(C):
            t = c * C + j
            k = a_pages[g["page_table"][b, t // P], t % P] @ w
            z = torch.complex(k[first], k[second]) * turn[t]
            k[first], k[second] = z.real, z.imag
            flat[g["dst_rows"][b, s * C + j], h] = k
    return out


def run(fn, case: dict) -> torch.Tensor:
    out = {k: (v.clone() if k == "k_cache" else v) for k, v in case.items()}
    fn(**out)
    return out["k_cache"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.equal(out.isnan(), ref.isnan()), "written rows differ from the missed rows"
    fin = ~ref.isnan()
    return ((out[fin] - ref[fin]).norm() / ref[fin].norm()).item()


SHAPES = [
    pytest.param(
        lens,
        Hkv,
        K,
        C,
        R,
        D,
        P,
        Dr,
        style,
        id=f"lens{'-'.join(map(str, lens))}-Hkv{Hkv}-K{K}-C{C}-R{R}-D{D}-P{P}-Dr{Dr}-{style}",
    )
    for lens, Hkv, K, C, R, D, P, Dr, style in [
        ([64], 1, 4, 8, 16, 64, 16, 64, "neox"),
        ([301, 77], 2, 20, 8, 40, 64, 64, 64, "interleaved"),
        ([257], 3, 9, 8, 160, 128, 16, 64, "neox"),
        ([130, 200], 1, 24, 5, 8, 96, 32, 48, "interleaved"),
        ([96], 2, 30, 3, 96, 128, 128, 128, "neox"),
    ]
]


@pytest.mark.parametrize(("lens", "Hkv", "K", "C", "R", "D", "P", "Dr", "style"), SHAPES)
def test_matches_reference_and_oracle(
    lens, Hkv: int, K: int, C: int, R: int, D: int, P: int, Dr: int, style: str
) -> None:
    case = make_case(lens, Hkv, K, C, R, D, P, torch.float32, Dr, style)
    want = oracle(case)
    ref = run(reference, case)
    out = run(triton_op, case)
    assert rel_err(ref, want) < TOL[torch.float32]
    assert rel_err(out, want) < TOL[torch.float32]


@pytest.mark.parametrize(
    ("dtype", "Dr", "style"),
    [
        pytest.param(torch.bfloat16, 64, "interleaved", id="bf16-Dr64-interleaved"),
        pytest.param(torch.float16, 128, "neox", id="fp16-Dr128-neox"),
    ],
)
def test_half_precision(dtype: torch.dtype, Dr: int, style: str) -> None:
    case = make_case([300, 90], 2, 16, 8, 64, 128, 32, dtype, Dr, style)
    out = run(triton_op, case)
    assert out.dtype == dtype
    assert rel_err(out, oracle(case)) < TOL[dtype]
    assert rel_err(out, run(reference, case)) < TOL[dtype]


def test_all_hits_write_nothing() -> None:
    case = make_case([200], Hkv=2, K=12, C=8, R=32, D=64, P=16, dtype=torch.float32)
    case["miss"] = torch.zeros_like(case["miss"])
    assert run(triton_op, case).isnan().all()


def test_bad_input_is_refused() -> None:
    case = make_case([64], 1, 4, 8, 16, 64, 16, torch.float32)
    case["dst_rows"] = case["dst_rows"].int()
    with pytest.raises(ValueError, match="int64"):
        run(triton_op, case)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        pytest.param({"style": "gptj"}, "style", id="unknown-style"),
        pytest.param({"cos": torch.zeros(80, 40), "sin": torch.zeros(80, 40)}, "Dr", id="Dr>D"),
        pytest.param({"sin": torch.zeros(80, 16)}, "Dr/2", id="cos-sin-mismatch"),
        pytest.param(
            {"cos": torch.zeros(80, 64), "sin": torch.zeros(80, 64)}, "Dr", id="old-[P,D]-tables"
        ),
        pytest.param({"basis_rows": torch.zeros(2, dtype=torch.long)}, "basis_rows", id="rows"),
    ],
)
def test_public_op_refuses_bad_tables(change: dict, match: str) -> None:
    case = make_case([64], 1, 4, 8, 16, 64, 16, torch.float32, Dr=32)
    case.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        run(public_op, case)
