"""Triton ``gather_values`` == PyTorch reference == a per-row Python copy (CPU: interpreter).

On CUDA a host-tier store is pinned host memory read in place by the kernel (zero-copy); a
device-tier store is a device tensor.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from shadowkv.kernels.fp8 import quantize_fp8  # noqa: E402
from shadowkv.kernels.gather_values.reference import gather_values as reference  # noqa: E402
from shadowkv.kernels.gather_values.triton import gather_values as triton_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
S = 16  # rows per cache block


def make_case(
    chunks: list[int], Hkv: int, K: int, C: int, D: int, Pc: int, dtype: torch.dtype
) -> dict:
    gen = torch.Generator().manual_seed(hash((tuple(chunks), Hkv, K, C, D, Pc)) % 2**31)
    B = len(chunks)
    max_pages = max(-(-n // Pc) for n in chunks) + 1
    num_pages = B * max_pages + 1
    store = torch.randn(num_pages, Pc, Hkv, C * D, generator=gen).to(dtype)
    if DEVICE == "cuda":
        store = store.pin_memory()
    table = torch.randperm(num_pages, generator=gen)[: B * max_pages].view(B, max_pages).int()
    slot_ids = torch.full((B, Hkv, K), -1, dtype=torch.int32)
    used = [min(K, n) for n in chunks]
    for b, n in enumerate(chunks):
        for h in range(Hkv):
            slot_ids[b, h, : used[b]] = torch.randperm(n, generator=gen)[: used[b]].int()
    miss = (torch.rand(B, Hkv, K, generator=gen) < 0.6) & (slot_ids >= 0)
    num_rows = (B * K * C // S + 4) * S
    dst = torch.randperm(num_rows, generator=gen)[: B * K * C].view(B, K * C)
    for b in range(B):
        dst[b, used[b] * C :] = -1
    return dict(
        v_cache=torch.full((num_rows // S, S, Hkv, D), float("nan"), dtype=dtype, device=DEVICE),
        store=store,
        store_table=table.to(DEVICE),
        slot_ids=slot_ids.to(DEVICE),
        miss=miss.to(DEVICE),
        dst_rows=dst.to(DEVICE),
    )


def oracle(case: dict) -> torch.Tensor:
    g = {k: v.cpu() for k, v in case.items()}
    out = g["v_cache"].clone()
    Hkv, D = out.shape[2], out.shape[3]
    Pc, C = g["store"].shape[1], g["store"].shape[3] // D
    flat = out.view(-1, Hkv, D)
    for b, h, s in g["miss"].nonzero().tolist():
        c = int(g["slot_ids"][b, h, s])
        row = g["store"][g["store_table"][b, c // Pc], c % Pc, h].view(C, D)
        for j in range(C):
            flat[g["dst_rows"][b, s * C + j], h] = row[j]
    return out


def run(fn, case: dict) -> torch.Tensor:
    out = {k: (v.clone() if k == "v_cache" else v) for k, v in case.items()}
    fn(**out)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out["v_cache"].cpu()


SHAPES = [
    pytest.param(
        chunks,
        Hkv,
        K,
        C,
        D,
        Pc,
        id=f"chunks{'-'.join(map(str, chunks))}-Hkv{Hkv}-K{K}-C{C}-D{D}-Pc{Pc}",
    )
    for chunks, Hkv, K, C, D, Pc in [
        ([4], 1, 4, 8, 64, 4),
        ([37, 90], 2, 20, 8, 128, 16),
        ([33], 3, 33, 8, 96, 8),
        ([50, 3], 2, 24, 5, 64, 16),
        ([300], 1, 256, 8, 128, 64),
    ]
]


@pytest.mark.parametrize(("chunks", "Hkv", "K", "C", "D", "Pc"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference_and_oracle(
    chunks, Hkv: int, K: int, C: int, D: int, Pc: int, dtype
) -> None:
    case = make_case(chunks, Hkv, K, C, D, Pc, dtype)
    want = oracle(case)
    out = run(triton_op, case)
    assert torch.equal(out.isnan(), want.isnan()), "written rows differ from the missed rows"
    assert torch.equal(out.nan_to_num(), want.nan_to_num())
    assert torch.equal(run(reference, case).nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize(("chunks", "Hkv", "K", "C", "D", "Pc"), SHAPES)
def test_device_resident_store_matches_reference_and_oracle(
    chunks, Hkv: int, K: int, C: int, D: int, Pc: int
) -> None:
    case = make_case(chunks, Hkv, K, C, D, Pc, torch.float32)
    case["store"] = case["store"].to(DEVICE)  # the device value tier
    want = oracle(case)
    out = run(triton_op, case)
    assert torch.equal(out.isnan(), want.isnan()), "written rows differ from the missed rows"
    assert torch.equal(out.nan_to_num(), want.nan_to_num())
    assert torch.equal(run(reference, case).nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize(
    "store_dtype,cache_dtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32-store-bf16-buffer", "bf16-store-fp32-buffer"],
)
def test_the_store_keeps_its_own_dtype(store_dtype, cache_dtype) -> None:
    """Values land converted to the buffer's dtype; the store is read in its own. (Narrowing to
    bf16 may differ by one bf16 ulp under the Triton interpreter, which truncates.)"""
    from shadowkv.kernels.gather_values import gather_values

    case = make_case([37, 90], 2, 20, 8, 64, 16, store_dtype)
    case["v_cache"] = case["v_cache"].to(cache_dtype)
    want = oracle(case)
    for fn in (triton_op, reference, gather_values):
        out = run(fn, case)
        assert out.dtype == cache_dtype and torch.equal(out.isnan(), want.isnan())
        rtol = 2**-7 if cache_dtype == torch.bfloat16 else 0
        torch.testing.assert_close(out.nan_to_num(), want.nan_to_num(), rtol=rtol, atol=0)


def fp8_case(case: dict) -> tuple[dict, torch.Tensor]:
    """The case's store quantised to fp8 codes + per-token scales (same tier), and the float64
    values those stand for: ``[pages, Pc, Hkv, C*D]``."""
    store = case["store"]
    P, Pc, Hkv, CD = store.shape
    D = case["v_cache"].shape[3]
    C = CD // D
    codes, scales = quantize_fp8(store.float().view(P, Pc, Hkv, C, D))
    scales = scales * torch.rand(scales.shape).add(0.5)  # scales unlike each other's amax
    decoded = codes.view(torch.float8_e4m3fn).double() * scales.double()[..., None]
    if DEVICE == "cuda" and store.is_pinned():
        codes, scales = codes.pin_memory(), scales.pin_memory()
    out = dict(case, store=codes.view(P, Pc, Hkv, CD).to(store.device), scales=scales.to(
        store.device))
    return out, decoded.view(P, Pc, Hkv, CD)


@pytest.mark.parametrize(("chunks", "Hkv", "K", "C", "D", "Pc"), SHAPES)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tier", ["host", "device"])
def test_fp8_store_matches_reference_and_float64_oracle(
    chunks, Hkv: int, K: int, C: int, D: int, Pc: int, cache_dtype, tier: str
) -> None:
    """fp8 codes + scales land as the dequantised values: the Triton kernel (bit decoding) and
    the reference (torch's float8 cast) agree with a float64 oracle of ``code * scale``."""
    case = make_case(chunks, Hkv, K, C, D, Pc, torch.float32)
    if tier == "device":
        case["store"] = case["store"].to(DEVICE)
    case["v_cache"] = case["v_cache"].to(cache_dtype)
    fp8, decoded = fp8_case(case)
    want = oracle(dict(case, store=decoded, v_cache=case["v_cache"].double()))
    rtol = 2**-7 if cache_dtype == torch.bfloat16 else 2**-23
    for fn in (triton_op, reference):
        out = run(fn, fp8)
        assert out.dtype == cache_dtype and torch.equal(out.isnan(), want.isnan())
        torch.testing.assert_close(out.double().nan_to_num(), want.nan_to_num(), rtol=rtol, atol=0)


def test_fp8_store_needs_its_scales_in_shape() -> None:
    from shadowkv.kernels.gather_values import gather_values

    fp8, _ = fp8_case(make_case([40], 2, 16, 8, 64, 16, torch.float32))
    with pytest.raises(ValueError, match="scales"):
        run(gather_values, dict(fp8, scales=None))
    with pytest.raises(ValueError, match="scales"):
        run(gather_values, dict(fp8, scales=fp8["scales"][..., :4]))


def test_an_integer_store_is_refused() -> None:
    from shadowkv.kernels.gather_values import gather_values

    case = make_case([40], 2, 16, 8, 64, 16, torch.float32)
    case["store"] = case["store"].to(torch.int8)
    with pytest.raises(ValueError, match="floating-point"):
        run(gather_values, case)


def test_no_miss_writes_nothing() -> None:
    case = make_case([40], 2, 16, 8, 64, 16, torch.float32)
    case["miss"] = torch.zeros_like(case["miss"])
    assert run(triton_op, case).isnan().all()


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="pinned vs pageable host memory only matters on CUDA")
def test_pageable_store_is_refused() -> None:
    case = make_case([40], 2, 16, 8, 64, 16, torch.float32)
    case["store"] = case["store"].clone()  # a pageable copy
    with pytest.raises(ValueError, match="pinned"):
        run(triton_op, case)


def test_bad_input_is_refused() -> None:
    case = make_case([40], 2, 16, 8, 64, 16, torch.float32)
    case["dst_rows"] = case["dst_rows"].int()
    with pytest.raises(ValueError, match="int64"):
        run(triton_op, case)
