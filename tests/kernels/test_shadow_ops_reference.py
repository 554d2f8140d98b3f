"""The four ShadowKV ops' references against float64 loop oracles written here.

Each oracle walks the op's contract one (sequence, head, slot) at a time with Python indexing, so
it shares no vectorised code with ``reference.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from utils import assert_close_verbose

from shadowkv.kernels.gather_values import gather_values
from shadowkv.kernels.reconstruct_keys import reconstruct_keys
from shadowkv.kernels.score_landmarks import score_landmarks
from shadowkv.kernels.select_chunks import select_chunks, select_chunks_inplace

F64 = torch.float64


def page_tables(
    counts: list[int], per_page: int, num_pages: int, gen: torch.Generator
) -> torch.Tensor:
    """``[B, max_pages]`` int32 tables of distinct shuffled pages (never page 0), zero-padded."""
    need = [math.ceil(c / per_page) for c in counts]
    width = max(1, max(need))
    perm = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(counts), width, dtype=torch.int32)
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    return table


def paged(table: torch.Tensor, per_page: int, b: int, i: int) -> tuple[int, int]:
    return int(table[b, i // per_page]), i % per_page


# score_landmarks ------------------------------------------------------------------------------
SCORE_SHAPES = [
    pytest.param(1, 1, 1, 64, [13], 4, id="B1-G1-Hkv1-D64-N13"),
    pytest.param(3, 3, 2, 64, [1, 37, 0], 8, id="B3-G3-Hkv2-D64-N1,37,0"),
    pytest.param(2, 4, 2, 96, [29, 16], 16, id="B2-G4-Hkv2-D96-N29,16"),
    pytest.param(2, 7, 1, 128, [51, 7], 16, id="B2-G7-Hkv1-D128-N51,7"),
]


@pytest.mark.parametrize("B,G,Hkv,D,counts,Pc", SCORE_SHAPES)
def test_score_landmarks_matches_oracle(B, G, Hkv, D, counts, Pc) -> None:
    gen = torch.Generator().manual_seed(1)
    H = G * Hkv
    q = torch.randn(B, H, D, dtype=F64, generator=gen)
    landmarks = torch.randn(12, Pc, Hkv, D, dtype=F64, generator=gen)
    table = page_tables(counts, Pc, 12, gen)
    scale = 1 / math.sqrt(D)
    got = score_landmarks(q, landmarks, table, torch.tensor(counts, dtype=torch.int32), scale)
    N = table.shape[1] * Pc
    want = torch.full((B, Hkv, N), -math.inf, dtype=F64)
    for b, n in enumerate(counts):
        for h in range(Hkv):
            for g in range(G):
                logits = [
                    scale * float(q[b, h * G + g] @ landmarks[paged(table, Pc, b, i)][h])
                    for i in range(n)
                ]
                top = max(logits, default=0.0)
                exps = [math.exp(x - top) for x in logits]
                for i, e in enumerate(exps):
                    want[b, h, i] = max(float(want[b, h, i]), e / sum(exps))
    assert got.dtype == torch.float32 and got.shape == (B, Hkv, N)
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "-inf must mark exactly the padding"
    finite = torch.isfinite(want)
    assert_close_verbose(got[finite], want[finite].float(), atol=1e-6, rtol=1e-5, what="scores")


# select_chunks --------------------------------------------------------------------------------
def select_oracle(scores, ids, table, Pc, num_select, prev):
    """Top chunks per (b, h); kept slots stay, misses ascending fill free slots ascending."""
    B, Hkv, K = prev.shape
    slots = torch.full((B, Hkv, K), -1, dtype=torch.int32)
    miss = torch.zeros(B, Hkv, K, dtype=torch.bool)
    for b in range(B):
        k = int(num_select[b])
        for h in range(Hkv):
            ranked = sorted(range(scores.shape[2]), key=lambda n: -float(scores[b, h, n]))[:k]
            chosen = {int(ids[paged(table, Pc, b, n)][h]) for n in ranked}
            old = [int(x) for x in prev[b, h, :k]]
            new = [c if c in chosen else -1 for c in old]
            missing = sorted(chosen - set(new))
            for s in range(k):
                if new[s] == -1:
                    new[s] = missing.pop(0)
                    miss[b, h, s] = True
            slots[b, h, :k] = torch.tensor(new, dtype=torch.int32)
    return slots, miss


SELECT_SHAPES = [
    pytest.param(1, 1, [16], [4], 8, id="B1-Hkv1-N16-K4-divides"),
    pytest.param(2, 2, [37, 21], [5, 7], 8, id="B2-Hkv2-N37,21-K5,7-ragged"),
    pytest.param(3, 4, [30, 12, 9], [12, 0, 9], 4, id="B3-Hkv4-K12,0,9-with-dense-and-all"),
]


@pytest.mark.parametrize("B,Hkv,counts,budgets,Pc", SELECT_SHAPES)
def test_select_chunks_matches_oracle_over_steps(B, Hkv, counts, budgets, Pc) -> None:
    gen = torch.Generator().manual_seed(2)
    table = page_tables(counts, Pc, 16, gen)
    ids = torch.randint(0, 1000, (16, Pc, Hkv), dtype=torch.int32, generator=gen)
    for b, n in enumerate(counts):  # distinct chunk ids per (sequence, head)
        for h in range(Hkv):
            chunk_ids = torch.randperm(3 * n + 1, generator=gen)[:n]
            for i in range(n):
                ids[paged(table, Pc, b, i)][h] = int(chunk_ids[i])
    K = max(budgets)
    N = table.shape[1] * Pc
    num_select = torch.tensor(budgets, dtype=torch.int32)
    prev = torch.full((B, Hkv, K), -1, dtype=torch.int32)
    base = torch.rand(B, Hkv, N, generator=gen)
    for step in range(6):
        # Drifting scores: each step keeps part of the previous top set.
        scores = base + 0.6 * torch.rand(B, Hkv, N, generator=gen)
        pad = torch.arange(N)[None, :] >= torch.tensor(counts)[:, None]
        scores = scores.masked_fill(pad[:, None, :], -math.inf)
        got_ids, got_miss = select_chunks(scores, ids, table, num_select, prev)
        want_ids, want_miss = select_oracle(scores, ids, table, Pc, num_select, prev)
        assert torch.equal(got_ids, want_ids), f"step {step}: slot ids differ"
        assert torch.equal(got_miss, want_miss), f"step {step}: miss masks differ"
        prev = got_ids
    assert got_miss.any() and (~got_miss & (got_ids >= 0)).any(), "steps should mix hits and misses"


def test_select_chunks_inplace_matches_oracle_over_steps() -> None:
    """The in-place form keeps its selection in ``state[rows, :, :K]`` (other rows and slots
    untouched) and counts kept / used slots of primed sequences."""
    gen = torch.Generator().manual_seed(3)
    Hkv, Pc, counts, budgets, rows = 2, 8, [37, 21, 50], [7, 0, 5], [4, 0, 2]
    table = page_tables(counts, Pc, 24, gen)
    ids = torch.randperm(24 * Pc * Hkv, generator=gen).int().view(24, Pc, Hkv)  # all distinct
    K, N, B = max(budgets), table.shape[1] * Pc, len(counts)
    num_select = torch.tensor(budgets, dtype=torch.int32)
    state = torch.randint(-1, 99, (6, Hkv, K + 2), dtype=torch.int32, generator=gen)
    row_index = torch.tensor(rows)
    state[row_index, :, :K] = -1
    counters = torch.zeros(2, dtype=torch.int64)
    primed = torch.tensor([False, True, True])
    base = torch.rand(B, Hkv, N, generator=gen)
    hits = used = 0
    for step in range(5):
        scores = base + 0.6 * torch.rand(B, Hkv, N, generator=gen)
        pad = torch.arange(N)[None, :] >= torch.tensor(counts)[:, None]
        scores = scores.masked_fill(pad[:, None, :], -math.inf)
        prev = state[row_index, :, :K]
        want_ids, want_miss = select_oracle(scores, ids, table, Pc, num_select, prev)
        want_state = state.clone()
        want_state[row_index, :, :K] = want_ids
        for b in range(B):
            if primed[b]:
                hits += int(((want_ids[b] >= 0) & ~want_miss[b]).sum())
                used += int((want_ids[b] >= 0).sum())
        got_ids, got_miss = select_chunks_inplace(
            scores, ids, table, num_select, state, row_index, K, primed, counters
        )
        assert torch.equal(got_ids, want_ids) and torch.equal(got_miss, want_miss), step
        assert torch.equal(state, want_state), f"step {step}: state differs"
        assert counters.tolist() == [hits, used], step
        primed = torch.ones(B, dtype=torch.bool)
    assert 0 < hits < used, "steps should mix hits and misses"


# reconstruct_keys / gather_values --------------------------------------------------------------
def rope_tables(max_pos: int, Dr: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[max_pos, Dr/2]`` tables: one column per frequency."""
    inv = 1.0 / 10000 ** (torch.arange(0, Dr, 2, dtype=F64) / Dr)
    ang = torch.outer(torch.arange(max_pos, dtype=F64), inv)
    return ang.cos(), ang.sin()


def rope_pair(i: int, half: int, style: str) -> tuple[int, int]:
    """Dims of RoPE pair ``i``: neox ``(i, i + Dr/2)``, interleaved ``(2i, 2i + 1)``."""
    return (2 * i, 2 * i + 1) if style == "interleaved" else (i, i + half)


def random_slots(B, Hkv, K, C, budgets, num_chunks, S, gen):
    """Slot ids, miss mask and distinct destination rows for a ragged batch."""
    slot_ids = torch.full((B, Hkv, K), -1, dtype=torch.int32)
    for b, k in enumerate(budgets):
        for h in range(Hkv):
            slot_ids[b, h, :k] = torch.randperm(num_chunks[b], generator=gen)[:k].int()
    miss = (torch.rand(B, Hkv, K, generator=gen) < 0.6) & (slot_ids >= 0)
    flat = torch.randperm(40 * S, generator=gen)[: B * K * C].view(B, K * C)
    used = torch.arange(K * C)[None, :] < torch.tensor(budgets)[:, None] * C
    return slot_ids, miss, flat.masked_fill(~used, -1)


RECON_SHAPES = [
    pytest.param(1, 1, 64, 5, 8, [40], [4], 24, 64, "neox", None, id="B1-Hkv1-D64-R5-T40-K4"),
    pytest.param(
        2, 2, 64, 37, 8, [101, 57], [6, 3], 20, 64, "interleaved", None,
        id="B2-Hkv2-D64-P20-straddle-il",
    ),
    pytest.param(
        3, 4, 128, 48, 4, [83, 30, 11], [9, 7, 0], 32, 64, "neox", None,
        id="B3-Hkv4-D128-R48-C4-Dr64",
    ),
    pytest.param(
        2, 3, 96, 16, 8, [64, 72], [8, 9], 16, 48, "interleaved", None,
        id="B2-Hkv3-D96-all-Dr48-il",
    ),
    # Per-segment bases: 3 segments (page-aligned start 40, mid-page and mid-chunk 61) and 2
    # (start 13, padded with a segment owning no token).
    pytest.param(
        2, 2, 64, 12, 8, [101, 57], [12, 7], 20, 48, "neox", [[0, 40, 61], [0, 13]],
        id="B2-Hkv2-D64-P20-segs3,2-Dr48",
    ),
]
NO_TOKEN = torch.iinfo(torch.int32).max  # start of a padding segment


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("B,Hkv,D,R,C,lengths,budgets,P,Dr,style,segs", RECON_SHAPES)
def test_reconstruct_keys_matches_oracle(
    B, Hkv, D, R, C, lengths, budgets, P, Dr, style, segs, dtype
) -> None:
    gen = torch.Generator().manual_seed(3)
    S, K = 16, max(max(budgets), 1)
    chunks = [n // C for n in lengths]
    budgets = [min(k, c) for k, c in zip(budgets, chunks)]
    a_pages = torch.randn(24, P, R, dtype=F64, generator=gen)
    table = page_tables(lengths, P, 24, gen)
    w_t = torch.randn(5, R, Hkv * D, dtype=F64, generator=gen)
    if segs is None:  # one segment: one basis per sequence
        seg_basis = torch.randperm(5, generator=gen)[:B, None]
        seg_starts = torch.zeros(B, 1, dtype=torch.int32)
    else:
        G = max(map(len, segs))
        rows = torch.randperm(5, generator=gen).tolist()
        seg_basis = torch.full((B, G), -1, dtype=torch.int64)  # padding: never read
        seg_starts = torch.full((B, G), NO_TOKEN, dtype=torch.int32)
        for b, starts in enumerate(segs):
            seg_starts[b, : len(starts)] = torch.tensor(starts, dtype=torch.int32)
            seg_basis[b, : len(starts)] = torch.tensor([rows.pop() for _ in starts])  # distinct
    cos, sin = rope_tables(max(lengths), Dr)
    slot_ids, miss, dst = random_slots(B, Hkv, K, C, budgets, chunks, S, gen)
    k_cache = torch.full((40, S, Hkv, D), math.nan, dtype=dtype)
    reconstruct_keys(
        k_cache,
        a_pages.to(dtype),
        table,
        w_t.to(dtype),
        seg_basis,
        seg_starts,
        slot_ids,
        miss,
        cos.to(dtype),
        sin.to(dtype),
        dst,
        C,
        style=style,
    )
    want = torch.full((40 * S, Hkv, D), math.nan, dtype=F64)
    half = Dr // 2
    for b in range(B):
        for h in range(Hkv):
            for s in range(K):
                if not miss[b, h, s]:
                    continue
                for j in range(C):
                    t = int(slot_ids[b, h, s]) * C + j
                    g = max(i for i, start in enumerate(seg_starts[b].tolist()) if start <= t)
                    w = w_t[seg_basis[b, g], :, h * D : (h + 1) * D]
                    key = (a_pages[paged(table, P, b, t)] @ w).tolist()  # dims >= Dr stay
                    for i in range(half):
                        d1, d2 = rope_pair(i, half, style)
                        c, sn, x1, x2 = float(cos[t, i]), float(sin[t, i]), key[d1], key[d2]
                        key[d1], key[d2] = x1 * c - x2 * sn, x2 * c + x1 * sn
                    want[int(dst[b, s * C + j]), h] = torch.tensor(key, dtype=F64)
    got = k_cache.view(-1, Hkv, D).double()
    assert torch.equal(got.isnan(), want.isnan()), "exactly the missed slots' rows must be written"
    tol = {"atol": 1e-10, "rtol": 1e-8} if dtype == F64 else {"atol": 1e-4, "rtol": 1e-4}
    written = ~want.isnan()
    assert_close_verbose(got[written], want[written], what="rebuilt keys", **tol)


GATHER_SHAPES = [
    pytest.param(1, 1, 64, 8, [5], [3], 4, id="B1-Hkv1-D64-chunks5-K3"),
    pytest.param(2, 2, 128, 8, [13, 40], [4, 11], 8, id="B2-Hkv2-D128-ragged"),
    pytest.param(3, 7, 64, 4, [9, 20, 3], [9, 5, 0], 4, id="B3-Hkv7-C4-all-and-none"),
]


@pytest.mark.parametrize("B,Hkv,D,C,num_chunks,budgets,Pc", GATHER_SHAPES)
def test_gather_values_matches_oracle(B, Hkv, D, C, num_chunks, budgets, Pc) -> None:
    gen = torch.Generator().manual_seed(4)
    S, K = 16, max(budgets)
    store = torch.randn(16, Pc, Hkv, C * D, dtype=F64, generator=gen)
    table = page_tables(num_chunks, Pc, 16, gen)
    slot_ids, miss, dst = random_slots(B, Hkv, K, C, budgets, num_chunks, S, gen)
    v_cache = torch.full((40, S, Hkv, D), math.nan, dtype=F64)
    gather_values(v_cache, store, table, slot_ids, miss, dst)
    want = torch.full((40 * S, Hkv, D), math.nan, dtype=F64)
    for b in range(B):
        for h in range(Hkv):
            for s in range(K):
                if miss[b, h, s]:
                    row = store[paged(table, Pc, b, int(slot_ids[b, h, s]))][h]
                    for j in range(C):
                        want[int(dst[b, s * C + j]), h] = row[j * D : (j + 1) * D]
    got = v_cache.view(-1, Hkv, D)
    assert torch.equal(got.isnan(), want.isnan()), "exactly the missed slots' rows must be written"
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])


def test_ops_reject_mismatched_shapes() -> None:
    q = torch.randn(2, 6, 16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        score_landmarks(
            q,
            torch.randn(4, 8, 4, 16),
            torch.zeros(2, 1, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32),
            0.25,
        )
    with pytest.raises(ValueError, match="exceed"):
        select_chunks(
            torch.randn(1, 1, 8),
            torch.zeros(2, 8, 1, dtype=torch.int32),
            torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32),
            torch.full((1, 1, 9), -1, dtype=torch.int32),
        )
    with pytest.raises(ValueError, match="floating-point"):  # the store's dtype may differ,
        gather_values(  # but it must be one the op can convert
            torch.zeros(2, 4, 1, 8),
            torch.zeros(2, 2, 1, 32, dtype=torch.int16),
            torch.zeros(1, 1, dtype=torch.int32),
            torch.zeros(1, 1, 1, dtype=torch.int32),
            torch.zeros(1, 1, 1, dtype=torch.bool),
            torch.zeros(1, 4, dtype=torch.long),
        )
