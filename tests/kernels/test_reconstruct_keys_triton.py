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
I32 = dict(dtype=torch.int32)
NO_TOKEN = torch.iinfo(torch.int32).max  # start of an unused (padding) segment


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
    segs: list[list[int]] | None = None,
    basis_dtype: torch.dtype = torch.int64,
) -> dict:
    """Distinct chunks per head, ~half the used slots missed, the rest hits or unused.

    ``segs[b]`` lists sequence ``b``'s segment starts (``[0]``: one segment, the default); each
    segment gets its own basis row, shorter lists are padded with segments that own no token
    (start ``NO_TOKEN``, basis ``-1``: never read).
    """
    key = (tuple(lens), Hkv, K, C, R, D, P)
    if segs is not None:
        key += (tuple(map(tuple, segs)),)
    gen = torch.Generator().manual_seed(hash(key) % 2**31)
    B = len(lens)
    segs = segs or [[0]] * B
    assert len(segs) == B and all(starts[0] == 0 for starts in segs)
    G = max(map(len, segs))
    max_pages = max(-(-n // P) for n in lens) + 1
    num_pages = B * max_pages + 1
    a_pages = torch.randn(num_pages, P, R, generator=gen, dtype=torch.float64)
    table = torch.randperm(num_pages, generator=gen)[: B * max_pages].view(B, max_pages).int()
    w_t = torch.randn(B * G + 2, R, Hkv * D, generator=gen, dtype=torch.float64) / R**0.5
    seg_basis = torch.full((B, G), -1, dtype=torch.int64)
    seg_starts = torch.full((B, G), NO_TOKEN, dtype=torch.int32)
    free_rows = torch.randperm(B * G + 2, generator=gen).tolist()
    for b, starts in enumerate(segs):
        seg_starts[b, : len(starts)] = torch.tensor(starts, dtype=torch.int32)
        seg_basis[b, : len(starts)] = torch.tensor([free_rows.pop() for _ in starts])
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
        seg_basis=seg_basis.to(dtype=basis_dtype, **to),
        seg_starts=seg_starts.to(**to),
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
        starts = g["seg_starts"][b].tolist()
        for j in range(C):
            t = c * C + j
            seg = sum(start <= t for start in starts) - 1
            w = w_t[int(g["seg_basis"][b, seg]), :, h * D : (h + 1) * D]
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


def case_id(lens, Hkv, K, C, R, D, P, Dr, style, segs, basis_dtype) -> str:
    out = f"lens{'-'.join(map(str, lens))}-Hkv{Hkv}-K{K}-C{C}-R{R}-D{D}-P{P}-Dr{Dr}-{style}"
    if segs is not None:
        out += "-segs" + "_".join("-".join(map(str, starts)) for starts in segs)
    return out + ("-i32" if basis_dtype == torch.int32 else "")


ONE_SEGMENT = (None, torch.int64)  # (segs, basis_dtype) of the cases that leave them out
SHAPES = [
    pytest.param(*args, id=case_id(*args))
    for args in (
        (*shape, *ONE_SEGMENT[len(shape) - 9 :])
        for shape in [
            ([64], 1, 4, 8, 16, 64, 16, 64, "neox"),
            ([301, 77], 2, 20, 8, 40, 64, 64, 64, "interleaved"),
            ([257], 3, 9, 8, 160, 128, 16, 64, "neox"),
            ([130, 200], 1, 24, 5, 8, 96, 32, 48, "interleaved"),
            ([96], 2, 30, 3, 96, 128, 128, 128, "neox"),
            # Several segments, each with its own basis. Starts on page boundaries (128 with
            # P=64, 32 with P=16, 64 and 96 with P=32) and not (37, 200, 100, 101: a one-token
            # segment), inside chunks too; sequences with fewer segments are padded.
            ([301, 77], 2, 20, 8, 40, 64, 64, 64, "interleaved", [[0, 128], [0, 37]]),
            ([257, 130], 3, 9, 8, 160, 128, 16, 64, "neox", [[0, 32, 200], [0, 50]], torch.int32),
            (
                [130, 200, 64], 1, 24, 5, 8, 96, 32, 48, "interleaved",
                [[0, 64, 96], [0, 100, 101], [0]],
            ),
            # ShadowKV's two segments (a shared prefix, a suffix of its own from token 256 on
            # 128-token pages) beside a one-segment sequence padded to the same two columns.
            ([457, 300], 2, 20, 8, 24, 16, 128, 16, "neox", [[0, 256], [0]]),
        ]
    )
]


@pytest.mark.parametrize(
    ("lens", "Hkv", "K", "C", "R", "D", "P", "Dr", "style", "segs", "basis_dtype"),
    SHAPES,
)
def test_matches_reference_and_oracle(
    lens, Hkv: int, K: int, C: int, R: int, D: int, P: int, Dr: int, style: str, segs, basis_dtype
) -> None:
    case = make_case(lens, Hkv, K, C, R, D, P, torch.float32, Dr, style, segs, basis_dtype)
    want = oracle(case)
    ref = run(reference, case)
    out = run(triton_op, case)
    assert rel_err(ref, want) < TOL[torch.float32]
    assert rel_err(out, want) < TOL[torch.float32]


@pytest.mark.parametrize(
    ("dtype", "Dr", "style", "segs"),
    [
        pytest.param(torch.bfloat16, 64, "interleaved", None, id="bf16-Dr64-interleaved"),
        pytest.param(torch.float16, 128, "neox", None, id="fp16-Dr128-neox"),
        pytest.param(
            torch.bfloat16, 96, "neox", [[0, 64, 150], [0, 45]], id="bf16-Dr96-neox-3segs"
        ),
    ],
)
def test_half_precision(dtype: torch.dtype, Dr: int, style: str, segs) -> None:
    case = make_case([300, 90], 2, 16, 8, 64, 128, 32, dtype, Dr, style, segs)
    out = run(triton_op, case)
    assert out.dtype == dtype
    assert rel_err(out, oracle(case)) < TOL[dtype]
    assert rel_err(out, run(reference, case)) < TOL[dtype]


def test_rows_of_one_later_segment_only() -> None:
    """Every missed row in the last of 3 segments: the kernel skips segments 0 and 1 whole."""
    case = make_case([200], 2, 8, 8, 32, 64, 16, torch.float32, segs=[[0, 40, 96]])
    ids = torch.stack([torch.randperm(13)[:8] + 12, torch.randperm(13)[:8] + 12])  # chunks >= 12
    case["slot_ids"] = ids[None].int().to(DEVICE)
    case["miss"] = torch.ones_like(case["miss"])
    case["dst_rows"] = torch.arange(8 * 8, device=DEVICE)[None]
    want = oracle(case)
    assert rel_err(run(reference, case), want) < TOL[torch.float32]
    assert rel_err(run(triton_op, case), want) < TOL[torch.float32]


def test_all_hits_write_nothing() -> None:
    case = make_case([200], Hkv=2, K=12, C=8, R=32, D=64, P=16, dtype=torch.float32)
    case["miss"] = torch.zeros_like(case["miss"])
    assert run(triton_op, case).isnan().all()


def test_bad_input_is_refused() -> None:
    case = make_case([64], 1, 4, 8, 16, 64, 16, torch.float32)
    case["dst_rows"] = case["dst_rows"].int()
    with pytest.raises(ValueError, match="int64"):
        run(triton_op, case)
    case = make_case([64], 1, 4, 8, 16, 64, 16, torch.float32, segs=[[0, 16]])
    case["seg_starts"] = case["seg_starts"][:, :1]
    with pytest.raises(ValueError, match="seg_starts"):
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
        pytest.param({"seg_basis": torch.zeros(1, dtype=torch.long)}, "seg_basis", id="1d-basis"),
        pytest.param({"seg_basis": torch.zeros(2, 1, dtype=torch.long)}, "seg_basis", id="basis-B"),
        pytest.param({"seg_starts": torch.zeros(1, 2, **I32)}, "seg_starts", id="starts-shape"),
        pytest.param({"seg_starts": torch.zeros(1, 1, dtype=torch.long)}, "int32", id="starts-i64"),
        pytest.param({"seg_basis": torch.zeros(1, 1)}, "int32 or int64", id="float-basis"),
    ],
)
def test_public_op_refuses_bad_tables(change: dict, match: str) -> None:
    case = make_case([64], 1, 4, 8, 16, 64, 16, torch.float32, Dr=32)
    case.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        run(public_op, case)
