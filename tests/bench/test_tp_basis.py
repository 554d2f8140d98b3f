"""``benchmarks/tp_basis.py``'s core: one low-rank key basis over all heads (TP=1) against one
per tensor-parallel rank, on random keys whose answer is known."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from shadowkv.cache.layout import AttentionSpec

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tp_basis.py"
TOL = 1e-9  # fp64 keys throughout


def load_script():
    spec = importlib.util.spec_from_file_location("tp_basis", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tp_basis"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tpb = load_script()


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))[0]


def test_split_rank_sums_to_the_rank_and_refuses_too_small_a_rank() -> None:
    assert tpb.split_rank(64, 3) == [22, 21, 21]
    assert tpb.split_rank(48, 2) == [24, 24]
    with pytest.raises(ValueError, match="rank=2 cannot be split over world=3"):
        tpb.split_rank(2, 3)


def test_head_blocks_are_contiguous_like_the_model_shards() -> None:
    assert [b.tolist() for b in tpb.head_blocks(4, 2)] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="world=3 does not divide num_kv_heads=4"):
        tpb.head_blocks(4, 3)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_full_rank_is_exact_for_every_option(world: int) -> None:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(64, 4, 8, generator=gen, dtype=torch.float64)
    e = tpb.basis_errors(keys, 32, world)
    assert max(e.one, e.split, e.per_rank) < TOL


def block_keys(
    gen: torch.Generator, T: int, Hkv: int, D: int, world: int, spectrum: list[float]
) -> torch.Tensor:
    """Keys ``[T, Hkv, D]`` whose rank blocks are ``U_i diag(spectrum) V_iᵀ`` with mutually
    orthogonal ``U_i`` (independent per rank) and the same singular values in every block."""
    w = Hkv // world * D
    s = torch.tensor(spectrum, dtype=torch.float64)
    u = orthonormal(T, world * len(s), gen)
    blocks = [
        u[:, i * len(s) : (i + 1) * len(s)] * s @ orthonormal(w, len(s), gen).T
        for i in range(world)
    ]
    return torch.cat(blocks, dim=1).view(T, Hkv, D)


def test_per_rank_structure_is_exact_with_split_bases_at_the_right_rank() -> None:
    gen = torch.Generator().manual_seed(1)
    keys = block_keys(gen, 96, 4, 8, 2, [5.0, 4.0, 3.0])  # rank 3 per TP rank, 6 in all
    exact = tpb.basis_errors(keys, 6, 2)
    assert max(exact.one, exact.split, exact.per_rank) < TOL
    short = tpb.basis_errors(keys, 5, 2)  # (b): 3 + 2, one direction short on rank 1
    assert short.split > 0.1


def test_block_diagonal_keys_make_split_bases_no_worse() -> None:
    gen = torch.Generator().manual_seed(2)
    spectrum = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    keys = block_keys(gen, 128, 6, 4, 3, spectrum)
    for rank in (3, 6, 9, 12):  # a multiple of the world: (a) keeps the same top of each block
        e = tpb.basis_errors(keys, rank, 3)
        assert e.one > 0.01
        assert e.split == pytest.approx(e.one, abs=TOL)


def test_structure_shared_across_ranks_needs_the_rank_on_every_rank() -> None:
    """Every head reads the same rank-4 subspace: one basis over all heads is exact at rank 4,
    per-rank bases need rank 4 each, so splitting 4 over the ranks loses most of the keys."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(80, 4, generator=gen, dtype=torch.float64)
    keys = (a @ torch.randn(4, 4 * 8, generator=gen, dtype=torch.float64)).view(80, 4, 8)
    e = tpb.basis_errors(keys, 4, 2)
    assert e.one < TOL and e.per_rank < TOL
    assert e.split > 0.2


@pytest.mark.parametrize("world", [2, 4])
def test_per_rank_le_one_le_split_on_any_keys(world: int) -> None:
    gen = torch.Generator().manual_seed(4)
    decay = torch.logspace(0, -2, 32, dtype=torch.float64)  # a spectrum like real keys'
    keys = (torch.randn(200, 32, generator=gen, dtype=torch.float64) * decay).view(200, 4, 8)
    keys = keys @ orthonormal(8, 8, gen)  # mix each head's dims
    for rank in (4, 8, 12, 20):
        e = tpb.basis_errors(keys, rank, world)
        assert e.per_rank <= e.one + TOL
        assert e.one <= e.split + TOL
        assert e.one > 0


def test_attention_error_matches_a_per_head_loop() -> None:
    gen = torch.Generator().manual_seed(5)
    H, Hkv, D, T = 6, 2, 8, 40
    q = torch.randn(H, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(T, Hkv, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k2 = k.clone()
    k2[:, 1] += 0.3 * torch.randn(T, D, generator=gen, dtype=torch.float64)  # KV head 1 only
    errs = []
    for h in range(H):
        kv = h // (H // Hkv)  # contiguous groups of query heads per KV head
        o, o2 = ((kk[:, kv] @ q[h] * 0.5).softmax(0) @ v[:, kv] for kk in (k, k2))
        errs.append(float((o2 - o).norm() / o.norm()))
    assert errs[:3] == [0.0, 0.0, 0.0] and min(errs[3:]) > 0
    assert tpb.attention_error(q, k, k2, v, 0.5) == pytest.approx(sum(errs) / H, rel=1e-9)
    assert tpb.attention_error(q, k, k.clone(), v, 0.5) == 0.0


def test_with_exact_takes_each_heads_own_tokens() -> None:
    keys = torch.arange(1.0, 25.0, dtype=torch.float64).view(6, 2, 2)
    exact = torch.tensor([[0, 5], [3, 1]])  # head 0 keeps tokens 0 and 3, head 1 keeps 5 and 1
    out = tpb.with_exact(torch.zeros_like(keys), keys, exact)
    kept = out.abs().sum(-1) > 0  # [T, Hkv]
    assert kept[:, 0].nonzero().flatten().tolist() == [0, 3]
    assert kept[:, 1].nonzero().flatten().tolist() == [1, 5]
    assert torch.equal(out[kept], keys[kept])


def fake_layer(gen: torch.Generator, T: int, H: int, Hkv: int, D: int):
    spec = AttentionSpec(H, Hkv, D, D**-0.5, D)
    k_pre, v = (torch.randn(T, Hkv, D, generator=gen, dtype=torch.float64) for _ in range(2))
    q = torch.randn(H, D, generator=gen, dtype=torch.float64)
    return tpb.LayerKeys(k_pre, v, q, spec)


def test_study_rank_names_the_option_a_tp_engine_resolves_to() -> None:
    """Keys of 2 x 64 columns over TP=2, as Qwen2.5-0.5B: the default rank (64) resolves to the
    full 64 columns of a rank; a fraction splits the rank (b); a column count repeats it (c),
    or is refused above a rank's columns; full rank is exact everywhere."""
    gen = torch.Generator().manual_seed(6)
    T, D = 512, 64  # enough 8-token chunks for 48 outliers and the local window
    layers = [fake_layer(gen, T, 4, 2, D) for _ in range(2)]
    angles = torch.arange(T, dtype=torch.float64)[:, None] * 10000 ** (-torch.arange(D // 2) / D)
    cos, sin = angles.cos(), angles.sin()
    out = {s: tpb.study_rank(layers, cos, sin, s, 2) for s in ("default", "0.25", "32", "96", "1")}
    option = {s: (r["rank"], r["engine_rank_per_rank"], r["engine_option"]) for s, r in out.items()}
    assert option["default"] == (64, 64, "full rank (exact)")
    assert option["0.25"] == (32, 16, "(b)")
    assert option["32"] == (32, 32, "(c)")
    assert option["96"][:2] == (96, None) and option["96"][2].startswith("refused")
    assert all(max(row[c] for c in tpb.COLUMNS) < TOL for row in out["1"]["layers"])
    for row in out["32"]["layers"]:
        assert row["key_per_rank"] <= row["key_one"] <= row["key_split"]
        assert 0 < row["kept_one"] < row["attn_one"]  # exact tokens only remove error
