"""The PyTorch ``decode_attention`` reference against a float64 oracle, for each block layout.

The reference reads a sequence's K/V in place when its blocks are consecutive and gathers them
otherwise; both paths must agree with the oracle, and neither may read rows past ``seq_lens``.
"""

from __future__ import annotations

import pytest
import torch

from shadowkv.kernels.decode_attention.reference import decode_attention

S = 16


def paged_case(lens: list[int], G: int, D: int, Hkv: int, layout: str, dtype: torch.dtype):
    """K/V per sequence written into a NaN-poisoned paged cache.

    ``layout``: every sequence's blocks consecutive, all shuffled, or "mixed" (even sequences
    consecutive, odd ones in reverse order).
    """
    gen = torch.Generator().manual_seed(len(lens) * 1000 + G * 100 + D)
    per_seq = [-(-n // S) for n in lens]
    num_blocks = sum(per_seq) + 4
    k_cache = torch.full((num_blocks, S, Hkv, D), float("nan"), dtype=dtype)
    v_cache = torch.full((num_blocks, S, Hkv, D), float("nan"), dtype=dtype)
    order = (
        torch.randperm(num_blocks, generator=gen)
        if layout == "shuffled"
        else torch.arange(num_blocks)
    )
    table = torch.zeros(len(lens), max(per_seq) + 2, dtype=torch.int32)
    keys, values, used = [], [], 0
    for b, (n, m) in enumerate(zip(lens, per_seq)):
        ids = order[used : used + m]
        if layout == "mixed" and b % 2:
            ids = ids.flip(0)  # odd sequences: own blocks in reverse, so not consecutive
        used += m
        table[b, :m] = ids.int()
        k = torch.randn(n, Hkv, D, generator=gen, dtype=torch.float64)
        v = torch.randn(n, Hkv, D, generator=gen, dtype=torch.float64)
        flat = (ids[:, None] * S + torch.arange(S)).flatten()[:n]
        k_cache.view(-1, Hkv, D)[flat] = k.to(dtype)
        v_cache.view(-1, Hkv, D)[flat] = v.to(dtype)
        keys.append(k.to(dtype).double())
        values.append(v.to(dtype).double())
    q = torch.randn(len(lens), Hkv * G, D, generator=gen, dtype=torch.float64).to(dtype)
    return q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32), keys, values


def oracle(
    q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, (k, v) in enumerate(zip(keys, values)):
        G = q.shape[1] // k.shape[1]
        kq, vq = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # [L, H, D]
        s = torch.einsum("hd,lhd->hl", q[b].double(), kq) * scale
        out[b] = torch.einsum("hl,lhd->hd", s.softmax(-1), vq)
    return out


SHAPES = [
    pytest.param([1], 1, 64, 2, id="B1-L1-G1-D64"),
    pytest.param([37, 16, 5], 3, 64, 3, id="B3-Lodd-G3-D64"),
    pytest.param([100, 33], 4, 96, 2, id="B2-L100-G4-D96"),
    pytest.param([65, 17, 48, 1], 7, 128, 1, id="B4-Lodd-G7-D128"),
]


@pytest.mark.parametrize("layout", ["consecutive", "shuffled", "mixed"])
@pytest.mark.parametrize("lens, G, D, Hkv", SHAPES)
def test_matches_float64_oracle(lens: list[int], G: int, D: int, Hkv: int, layout: str) -> None:
    q, kc, vc, table, seq_lens, keys, values = paged_case(lens, G, D, Hkv, layout, torch.float32)
    out = decode_attention(q, kc, vc, table, seq_lens, D**-0.5)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert torch.isfinite(out).all(), "read a NaN-poisoned row past seq_lens"
    ref = oracle(q, keys, values, D**-0.5)
    err = (out.double() - ref).abs()
    assert err.max() < 1e-5, (
        f"max error {err.max():.2e} at {tuple(int(i) for i in (err == err.max()).nonzero()[0])}"
    )


@pytest.mark.parametrize("layout", ["consecutive", "shuffled"])
def test_float64_inputs_are_computed_in_float64(layout: str) -> None:
    q, kc, vc, table, seq_lens, keys, values = paged_case([29, 70], 3, 64, 2, layout, torch.float64)
    out = decode_attention(q, kc, vc, table, seq_lens, 0.125)
    assert out.dtype == torch.float64
    assert (out - oracle(q, keys, values, 0.125)).abs().max() < 1e-12


def test_bfloat16_inputs_return_bfloat16() -> None:
    q, kc, vc, table, seq_lens, keys, values = paged_case(
        [40, 9], 4, 64, 2, "shuffled", torch.bfloat16
    )
    out = decode_attention(q, kc, vc, table, seq_lens, 0.125)
    assert out.dtype == torch.bfloat16
    assert (out.double() - oracle(q, keys, values, 0.125)).abs().max() < 2e-2
