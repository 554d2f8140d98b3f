"""Triton ``decode_attention`` == PyTorch reference == float64 oracle.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` on the CPU (slow: shapes stay small).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from shadowkv.kernels.decode_attention.reference import decode_attention as reference  # noqa: E402
from shadowkv.kernels.decode_attention.triton import decode_attention as triton_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "output holds NaN"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_case(
    lens: list[int], G: int, D: int, Hkv: int, S: int, dtype: torch.dtype, spare_blocks: int = 3
) -> dict:
    """Per-sequence K/V scattered into a shuffled paged cache; free rows hold large garbage."""
    gen = torch.Generator().manual_seed(hash((tuple(lens), G, D, Hkv, S)) % 2**31)
    B = len(lens)
    per_seq = [-(-n // S) for n in lens]
    num_blocks = sum(per_seq) + spare_blocks
    k_cache = torch.full((num_blocks, S, Hkv, D), 1e4)
    v_cache = torch.full((num_blocks, S, Hkv, D), -1e4)
    max_blocks = max(per_seq) + 2
    table = torch.zeros(B, max_blocks, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen)
    ks, vs, used = [], [], 0
    for b, n in enumerate(lens):
        k = torch.randn(n, Hkv, D, generator=gen, dtype=torch.float64)
        v = torch.randn(n, Hkv, D, generator=gen, dtype=torch.float64)
        ids = perm[used : used + per_seq[b]]
        used += per_seq[b]
        table[b, : per_seq[b]] = ids.int()
        for j, blk in enumerate(ids.tolist()):
            rows = slice(j * S, min((j + 1) * S, n))
            k_cache[blk, : rows.stop - rows.start] = k[rows].float()
            v_cache[blk, : rows.stop - rows.start] = v[rows].float()
        ks.append(k)
        vs.append(v)
    q = torch.randn(B, Hkv * G, D, generator=gen, dtype=torch.float64)
    to = dict(device=DEVICE, dtype=dtype)
    return dict(
        q=q.to(**to),
        k_cache=k_cache.to(**to),
        v_cache=v_cache.to(**to),
        block_table=table.to(DEVICE),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        scale=D**-0.5,
        keys=ks,
        values=vs,
    )


def oracle(case: dict) -> torch.Tensor:
    """float64 softmax attention per sequence, from the unpaged K/V and the dtype-rounded q/K/V."""
    q = case["q"].double().cpu()
    B, H, D = q.shape
    dt = case["q"].dtype
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b, (k, v) in enumerate(zip(case["keys"], case["values"])):
        k, v = k.to(dt).double(), v.to(dt).double()  # what the cache actually holds
        Hkv = k.shape[1]
        kq = k.repeat_interleave(H // Hkv, dim=1)  # [L, H, D]
        vq = v.repeat_interleave(H // Hkv, dim=1)
        s = torch.einsum("hd,lhd->hl", q[b], kq) * case["scale"]
        out[b] = torch.einsum("hl,lhd->hd", s.softmax(-1), vq)
    return out


def run(fn, case: dict, **kw) -> torch.Tensor:
    args = [case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens", "scale")]
    return fn(*args, **kw)


SHAPES = [
    pytest.param(lens, G, D, Hkv, id=f"lens{'-'.join(map(str, lens))}-G{G}-D{D}-Hkv{Hkv}")
    for lens, G, D, Hkv in [
        ([1], 1, 64, 2),
        ([37, 1, 300], 4, 64, 1),
        ([257, 64], 3, 96, 2),
        ([511], 7, 128, 1),
        ([129, 2], 7, 96, 1),
        ([1000, 5], 1, 128, 1),
        ([2048], 4, 128, 1),
    ]
]


@pytest.mark.parametrize(("lens", "G", "D", "Hkv"), SHAPES)
def test_matches_reference_and_oracle(lens: list[int], G: int, D: int, Hkv: int) -> None:
    case = make_case(lens, G, D, Hkv, S=16, dtype=torch.float32)
    want = oracle(case)
    ref = run(reference, case)
    out = run(triton_op, case)
    assert out.shape == case["q"].shape and out.dtype == torch.float32
    assert rel_err(ref.cpu(), want) < TOL[torch.float32]
    assert rel_err(out.cpu(), want) < TOL[torch.float32]
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("split_len", [64, 128], ids=lambda s: f"split{s}")
def test_many_splits_poisoned_workspace(split_len: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced small splits exercise the merge; NaN workspaces prove unused splits stay unread."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(
        torch, "empty_like", lambda x: poisoned(x.shape, dtype=x.dtype, device=x.device)
    )
    case = make_case([700, 3, 130], G=4, D=64, Hkv=2, S=16, dtype=torch.float32, spare_blocks=40)
    out = run(triton_op, case, split_len=split_len)
    assert rel_err(out.cpu(), oracle(case)) < TOL[torch.float32]


def test_ignores_nan_rows_and_table_entries_past_length() -> None:
    case = make_case([45, 17], G=3, D=64, Hkv=1, S=16, dtype=torch.float32)
    # Free rows of the last blocks and table entries past each length are never read.
    for b, n in enumerate([45, 17]):
        blk = int(case["block_table"][b, (n - 1) // 16])
        case["k_cache"][blk, n % 16 :] = float("nan")
        case["v_cache"][blk, n % 16 :] = float("nan")
        case["block_table"][b, -(-n // 16) :] = 10**6
    out = run(triton_op, case)
    assert rel_err(out.cpu(), oracle(case)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision(dtype: torch.dtype) -> None:
    case = make_case([300, 33], G=4, D=128, Hkv=1, S=16, dtype=dtype)
    out = run(triton_op, case)
    assert out.dtype == dtype
    assert rel_err(out.cpu(), oracle(case)) < TOL[dtype]
    assert rel_err(out, run(reference, case)) < TOL[dtype]


def test_dispatcher_routes_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    import shadowkv.kernels.decode_attention as op
    import shadowkv.kernels.decode_attention.triton as mod

    calls = []
    monkeypatch.setenv("SHADOWKV_KERNELS", "triton")
    monkeypatch.setattr(mod, "decode_attention", lambda *a: calls.append(a) or triton_op(*a))
    case = make_case([20], G=2, D=64, Hkv=1, S=16, dtype=torch.float32)
    out = run(op.decode_attention, case)
    assert len(calls) == 1 and rel_err(out.cpu(), oracle(case)) < TOL[torch.float32]


def test_bad_input_is_refused() -> None:
    case = make_case([20], G=2, D=64, Hkv=1, S=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="int32"):
        case["seq_lens"] = case["seq_lens"].long()
        run(triton_op, case)
    case = make_case([20], G=2, D=64, Hkv=1, S=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple of 64"):
        run(triton_op, case, split_len=100)


@pytest.mark.parametrize(("lens", "G", "D", "Hkv"), SHAPES[:4])
def test_head_major_pool(lens: list[int], G: int, D: int, Hkv: int) -> None:
    """The dense cache stores its pool head-major ``[Hkv, blocks, S, D]`` and passes the
    ``[blocks, S, Hkv, D]`` view: both ops must follow the strides."""
    case = make_case(lens, G, D, Hkv, S=16, dtype=torch.float32)
    for name in ("k_cache", "v_cache"):
        t = case[name]
        case[name] = t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
        assert torch.equal(case[name], t) and (Hkv == 1 or not case[name].is_contiguous())
    want = oracle(case)
    assert rel_err(run(reference, case).cpu(), want) < TOL[torch.float32]
    assert rel_err(run(triton_op, case).cpu(), want) < TOL[torch.float32]
