"""``varlen_attention``: Triton (interpreted on the CPU) and the reference == a float64 oracle.

Packed segments with odd lengths, queries equal to keys (a whole prompt) and fewer than keys (a
later chunk of a prompt), GQA groups 1, 3, 4, 7 and head dims 64, 96, 128.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from shadowkv.kernels.varlen_attention import varlen_attention  # noqa: E402
from shadowkv.kernels.varlen_attention.reference import (  # noqa: E402
    varlen_attention as reference,
)
from shadowkv.kernels.varlen_attention.triton import varlen_attention as triton_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def oracle(q, k, v, cu_q, cu_k, scale) -> torch.Tensor:
    """Float64 softmax with an explicit lower-right causal mask, segment by segment."""
    G = q.shape[1] // k.shape[1]
    outs = []
    for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        qs = q[a:b].double().transpose(0, 1)  # [H, Tq, D]
        ks = k[c:d].double().repeat_interleave(G, 1).transpose(0, 1)  # [H, Tk, D]
        vs = v[c:d].double().repeat_interleave(G, 1).transpose(0, 1)
        Tq, Tk = b - a, d - c
        rows = torch.arange(Tq)[:, None] + (Tk - Tq)
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(torch.arange(Tk)[None, :] > rows, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def bounds(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def make_case(tq: list[int], tk: list[int], G: int, D: int, Hkv: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(hash((tuple(tq), tuple(tk), G, D)) % 2**31)
    H = G * Hkv
    q = torch.randn(sum(tq), H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(tk), Hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(tk), Hkv, D, generator=gen, dtype=torch.float64)
    to = dict(device=DEVICE, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), bounds(tq), bounds(tk)


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert not out.isnan().any(), "output holds NaN"
    return ((out.double().cpu() - want).norm() / want.norm()).item()


# (queries per segment, keys per segment, GQA group, head dim): a whole prompt (Tq == Tk) next to
# later chunks (Tq < Tk), lengths around the 64-row tiles, one query over many keys.
CASES = [
    ([13], [13], 1, 64),
    ([5, 70, 1], [5, 133, 9], 3, 96),
    ([9, 17], [40, 17], 4, 128),
    ([66, 3, 31], [66, 67, 100], 7, 64),
]


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("tq,tk,G,D", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_matches_float64_oracle(impl: str, tq, tk, G: int, D: int) -> None:
    Hkv, scale = 2, D**-0.5
    q, k, v, cu_q, cu_k = make_case(tq, tk, G, D, Hkv, torch.float32)
    want = oracle(q.cpu(), k.cpu(), v.cpu(), cu_q, cu_k, scale)
    if impl == "triton":
        dev = torch.device(DEVICE)
        cq = torch.tensor(cu_q, dtype=torch.int32, device=dev)
        ck = torch.tensor(cu_k, dtype=torch.int32, device=dev)
        out = triton_op(q, k, v, cq, ck, max(tq), scale)
    else:
        out = reference(q, k, v, cu_q, cu_k, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, want) < TOL[torch.float32]


def test_bf16_triton_matches_oracle() -> None:
    q, k, v, cu_q, cu_k = make_case([7, 50], [30, 50], 4, 128, 2, torch.bfloat16)
    dev = torch.device(DEVICE)
    cq, ck = (torch.tensor(c, dtype=torch.int32, device=dev) for c in (cu_q, cu_k))
    out = triton_op(q, k, v, cq, ck, 50, 128**-0.5)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, oracle(q.cpu(), k.cpu(), v.cpu(), cu_q, cu_k, 128**-0.5)) < TOL[
        torch.bfloat16
    ]


def test_strided_views_are_read_in_place() -> None:
    """q, k, v as the model hands them over: views into one fused projection's output."""
    T, H, Hkv, D = 21, 6, 2, 64
    fused = torch.randn(T, (H + 2 * Hkv) * D, device=DEVICE)
    q, k, v = fused.split([H * D, Hkv * D, Hkv * D], -1)
    q, k, v = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
    cu = [0, 8, 21]
    dev = torch.device(DEVICE)
    c = torch.tensor(cu, dtype=torch.int32, device=dev)
    out = triton_op(q, k, v, c, c, 13, 0.1)
    assert rel_err(out, oracle(q.cpu(), k.cpu(), v.cpu(), cu, cu, 0.1)) < TOL[torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Llama-3.1-8B shapes: GPU only")
def test_llama_shapes_on_gpu() -> None:
    tq, tk = [1000, 37, 512, 3], [1000, 2085, 512, 4000]
    q, k, v, cu_q, cu_k = make_case(tq, tk, 4, 128, 8, torch.bfloat16)
    out = varlen_attention(q, k, v, cu_q, cu_k, 128**-0.5)  # the dispatch: Triton on CUDA
    want = reference(q.float(), k.float(), v.float(), cu_q, cu_k, 128**-0.5)
    assert rel_err(out, want.double().cpu()) < TOL[torch.bfloat16]


@pytest.mark.parametrize(
    "cu_q,cu_k,match",
    [
        ([0, 5, 9], [0, 5], "one bound per segment"),
        ([0, 5, 9], [0, 4, 12], "segment 0 has 5 queries and 4 keys"),
        ([0, 5, 8], [0, 5, 12], "bounds must run from 0"),
        ([0, 0, 9], [0, 3, 12], "segment 0 has 0 queries"),
    ],
)
def test_bad_bounds_are_refused_by_name(cu_q, cu_k, match: str) -> None:
    q, k = torch.zeros(9, 4, 64), torch.zeros(12, 2, 64)
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, k, cu_q, cu_k, 0.1)


def test_dispatch_reference_equals_causal_attention_per_segment() -> None:
    """On the CPU the dispatch is the reference: each segment exactly as a lone chunk's."""
    from shadowkv.kernels.varlen_attention.reference import causal_attention

    q, k, v, cu_q, cu_k = make_case([4, 11], [9, 11], 3, 64, 2, torch.float32)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    out = varlen_attention(q, k, v, cu_q, cu_k, 0.2) if DEVICE == "cpu" else reference(
        q, k, v, cu_q, cu_k, 0.2
    )
    want = torch.cat([causal_attention(q[:4], k[:9], v[:9], 0.2),
                      causal_attention(q[4:], k[9:], v[9:], 0.2)])
    assert torch.equal(out, want)


def test_heads_wider_than_128_take_the_reference(monkeypatch) -> None:
    import shadowkv.kernels.varlen_attention as varlen

    monkeypatch.setattr(varlen, "use_triton", lambda t, op=None: True)
    q, k, v, cu_q, cu_k = make_case([3, 5], [6, 5], 2, 256, 1, torch.float32)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    assert torch.equal(varlen_attention(q, k, v, cu_q, cu_k, 0.1),
                       reference(q, k, v, cu_q, cu_k, 0.1))
