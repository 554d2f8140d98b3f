"""Triton ``score_landmarks`` == PyTorch reference == float64 oracle (interpreter without CUDA)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from shadowkv.kernels.score_landmarks.reference import score_landmarks as reference  # noqa: E402
from shadowkv.kernels.score_landmarks.triton import score_landmarks as triton_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error over finite entries; both must agree on where ``-inf`` is."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not out.isnan().any(), "output holds NaN"
    assert torch.equal(out.isinf(), ref.isinf()), "-inf padding differs"
    fin = ref.isfinite()
    return ((out[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30)).item()


def make_case(counts: list[int], G: int, D: int, Hkv: int, Pc: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(hash((tuple(counts), G, D, Hkv, Pc)) % 2**31)
    B = len(counts)
    max_pages = max(-(-n // Pc) for n in counts) + 1
    num_pages = B * max_pages + 2
    # Landmarks are chunk means: scale them so a few dominate the softmax, as real ones do.
    lm = torch.randn(num_pages, Pc, Hkv, D, generator=gen, dtype=torch.float64) * 0.5
    table = torch.randperm(num_pages, generator=gen)[: B * max_pages].view(B, max_pages).int()
    q = torch.randn(B, Hkv * G, D, generator=gen, dtype=torch.float64)
    to = dict(device=DEVICE, dtype=dtype)
    return dict(
        q=q.to(**to),
        landmarks=lm.to(**to),
        page_table=table.to(DEVICE),
        num_landmarks=torch.tensor(counts, dtype=torch.int32, device=DEVICE),
        scale=D**-0.5,
    )


def oracle(case: dict) -> torch.Tensor:
    """float64 softmax per query head over the sequence's landmarks, max over its GQA group."""
    q = case["q"].double().cpu()
    lm = case["landmarks"].double().cpu()
    table = case["page_table"].long().cpu()
    B, H, D = q.shape
    Pc, Hkv = lm.shape[1], lm.shape[2]
    N = table.shape[1] * Pc
    out = torch.full((B, Hkv, N), float("-inf"), dtype=torch.float64)
    for b, n in enumerate(case["num_landmarks"].tolist()):
        if n == 0:
            continue
        rows = torch.stack([lm[table[b, i // Pc], i % Pc] for i in range(n)])  # [n, Hkv, D]
        qg = q[b].view(Hkv, H // Hkv, D)
        probs = (torch.einsum("hgd,nhd->hgn", qg, rows) * case["scale"]).softmax(-1)
        out[b, :, :n] = probs.amax(dim=1)
    return out


def run(fn, case: dict, **kw) -> torch.Tensor:
    names = ("q", "landmarks", "page_table", "num_landmarks", "scale")
    return fn(*[case[n] for n in names], **kw)


SHAPES = [
    pytest.param(
        counts, G, D, Hkv, Pc, id=f"n{'-'.join(map(str, counts))}-G{G}-D{D}-Hkv{Hkv}-Pc{Pc}"
    )
    for counts, G, D, Hkv, Pc in [
        ([1], 1, 64, 2, 16),
        ([37, 0, 300], 4, 64, 1, 16),
        ([257, 64], 3, 96, 2, 32),
        ([511], 7, 128, 1, 64),
        ([129, 2], 7, 96, 1, 16),
        ([2048, 5], 4, 128, 1, 128),
    ]
]


@pytest.mark.parametrize(("counts", "G", "D", "Hkv", "Pc"), SHAPES)
def test_matches_reference_and_oracle(counts: list[int], G: int, D: int, Hkv: int, Pc: int) -> None:
    case = make_case(counts, G, D, Hkv, Pc, torch.float32)
    want = oracle(case)
    ref = run(reference, case)
    out = run(triton_op, case)
    assert out.shape == want.shape and out.dtype == torch.float32
    assert rel_err(ref, want) < TOL[torch.float32]
    assert rel_err(out, want) < TOL[torch.float32]
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("split_len", [64, 128], ids=lambda s: f"split{s}")
def test_many_splits_poisoned_workspace(split_len: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small splits exercise the merge; NaN-filled workspaces prove unwritten splits stay unread."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(
        torch, "empty_like", lambda x: poisoned(x.shape, dtype=x.dtype, device=x.device)
    )
    case = make_case([700, 3, 0, 130], G=4, D=64, Hkv=2, Pc=16, dtype=torch.float32)
    out = run(triton_op, case, split_len=split_len)
    assert rel_err(out, oracle(case)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision(dtype: torch.dtype) -> None:
    case = make_case([300, 33], G=4, D=128, Hkv=1, Pc=16, dtype=dtype)
    out = run(triton_op, case)
    assert rel_err(out, oracle(case)) < TOL[dtype]
    assert rel_err(out, run(reference, case)) < TOL[dtype]


def test_dispatcher_routes_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    import shadowkv.kernels.score_landmarks as op
    import shadowkv.kernels.score_landmarks.triton as mod

    calls = []
    monkeypatch.setenv("SHADOWKV_KERNELS", "triton")
    monkeypatch.setattr(mod, "score_landmarks", lambda *a: calls.append(a) or triton_op(*a))
    case = make_case([40], G=2, D=64, Hkv=1, Pc=16, dtype=torch.float32)
    out = run(op.score_landmarks, case)
    assert len(calls) == 1 and rel_err(out, oracle(case)) < TOL[torch.float32]


def test_bad_input_is_refused() -> None:
    case = make_case([20], G=2, D=64, Hkv=1, Pc=16, dtype=torch.float32)
    case["num_landmarks"] = case["num_landmarks"].long()
    with pytest.raises(ValueError, match="int32"):
        run(triton_op, case)


@pytest.mark.parametrize(("counts", "G", "D", "Hkv", "Pc"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_landmarks_match_reference_and_oracle(
    counts: list[int], G: int, D: int, Hkv: int, Pc: int, dtype: torch.dtype
) -> None:
    """uint8 e4m3 codes + one float32 scale per landmark score as the dequantised landmarks do:
    Triton (bit decoding, scale on the logit) and the reference against a float64 oracle."""
    from shadowkv.kernels import score_landmarks as op
    from shadowkv.kernels.fp8 import quantize_fp8

    case = make_case(counts, G, D, Hkv, Pc, torch.float32)
    codes, scales = quantize_fp8(case["landmarks"].cpu())
    decoded = codes.view(torch.float8_e4m3fn).double() * scales.double()[..., None]
    want = oracle(dict(case, landmarks=decoded))
    fp8 = dict(case, q=case["q"].to(dtype), landmarks=codes.to(DEVICE))
    for fn in (triton_op, reference, op.score_landmarks):
        out = run(fn, fp8, landmark_scales=scales.to(DEVICE))
        assert rel_err(out, want) < TOL[dtype]
    with pytest.raises(ValueError, match="fp8 landmarks"):
        run(op.score_landmarks, fp8)  # codes without their scales
