"""Triton ``select_chunks`` / ``select_chunks_inplace`` == PyTorch reference == plain-Python
oracles."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from shadowkv.kernels.select_chunks import (  # noqa: E402
    select_chunks_inplace as dispatch_inplace,
)
from shadowkv.kernels.select_chunks.reference import select_chunks as reference  # noqa: E402
from shadowkv.kernels.select_chunks.reference import (  # noqa: E402
    select_chunks_inplace as select_chunks_inplace_ref,
)
from shadowkv.kernels.select_chunks.triton import select_chunks as triton_op  # noqa: E402
from shadowkv.kernels.select_chunks.triton import select_chunks_inplace  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(counts: list[int], sel: list[int], Hkv: int, K: int, Pc: int, seed: int = 0) -> dict:
    """Distinct shuffled chunk ids per head; ``prev_ids`` overlaps the new top-k by about half."""
    gen = torch.Generator().manual_seed(seed)
    B = len(counts)
    max_pages = max(-(-n // Pc) for n in counts) + 1
    num_pages = B * max_pages + 1
    ids = torch.stack(
        [torch.randperm(num_pages * Pc * 3, generator=gen)[: num_pages * Pc] for _ in range(Hkv)],
        -1,
    ).view(num_pages, Pc, Hkv)
    table = torch.randperm(num_pages, generator=gen)[: B * max_pages].view(B, max_pages)
    N = max_pages * Pc
    scores = torch.rand(B, Hkv, N, generator=gen)
    scores[torch.arange(N) >= torch.tensor(counts)[:, None, None].expand(B, Hkv, N)] = float("-inf")
    paged = ids[table.long()].reshape(B, N, Hkv).permute(0, 2, 1)  # [B, Hkv, N]
    prev = torch.full((B, Hkv, K), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            pool = paged[b, h, : counts[b]][torch.randperm(counts[b], generator=gen)]
            k = sel[b]
            prev[b, h, :k] = pool[:k].int()
            prev[b, h, :k][torch.rand(k, generator=gen) < 0.15] = -1  # some slots start empty
    return dict(
        scores=scores.to(DEVICE),
        landmark_ids=ids.int().to(DEVICE),
        page_table=table.int().to(DEVICE),
        num_select=torch.tensor(sel, dtype=torch.int32, device=DEVICE),
        prev_ids=prev.to(DEVICE),
    )


def oracle(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Set semantics: hits keep slots; sorted misses fill sorted free slots."""
    scores, ids = case["scores"].cpu(), case["landmark_ids"].cpu()
    table, prev = case["page_table"].cpu().long(), case["prev_ids"].cpu()
    B, Hkv, _ = scores.shape
    K, Pc = prev.shape[-1], ids.shape[1]
    slot = torch.full((B, Hkv, K), -1, dtype=torch.int32)
    miss = torch.zeros(B, Hkv, K, dtype=torch.bool)
    for b, k in enumerate(case["num_select"].tolist()):
        for h in range(Hkv):
            best = scores[b, h].argsort(descending=True)[:k].tolist()
            chosen = {int(ids[table[b, n // Pc], n % Pc, h]) for n in best}
            old = prev[b, h, :k].tolist()
            misses = sorted(chosen - set(old))
            free = [j for j in range(k) if old[j] not in chosen]
            for j in range(k):
                slot[b, h, j] = old[j] if old[j] in chosen else -1
            for j, c in zip(free, misses, strict=True):
                slot[b, h, j], miss[b, h, j] = c, True
    return slot, miss


def run(fn, case: dict):
    names = ("scores", "landmark_ids", "page_table", "num_select", "prev_ids")
    return fn(*[case[n] for n in names])


SHAPES = [
    pytest.param(
        counts,
        sel,
        Hkv,
        K,
        Pc,
        id=f"n{'-'.join(map(str, counts))}-k{'-'.join(map(str, sel))}-Hkv{Hkv}-K{K}-Pc{Pc}",
    )
    for counts, sel, Hkv, K, Pc in [
        ([1], [1], 1, 1, 16),
        ([37, 20, 300], [5, 0, 5], 2, 5, 16),
        ([257, 64], [40, 33], 3, 40, 32),
        ([300], [256], 1, 256, 64),
        ([100, 2], [17, 2], 2, 17, 8),
    ]
]


@pytest.mark.parametrize(("counts", "sel", "Hkv", "K", "Pc"), SHAPES)
def test_matches_reference_and_oracle(counts, sel, Hkv: int, K: int, Pc: int) -> None:
    case = make_case(counts, sel, Hkv, K, Pc)
    want_slot, want_miss = oracle(case)
    ref_slot, ref_miss = run(reference, case)
    slot, miss = run(triton_op, case)
    assert slot.dtype == torch.int32 and miss.dtype == torch.bool
    assert torch.equal(ref_slot.cpu(), want_slot) and torch.equal(ref_miss.cpu(), want_miss)
    assert torch.equal(slot.cpu(), want_slot), (slot.cpu() != want_slot).nonzero()[:5]
    assert torch.equal(miss.cpu(), want_miss)


def test_steps_keep_buffer_equal_to_selection() -> None:
    """Feeding slot_ids back as prev_ids: the buffer always holds exactly the chosen chunks."""
    case = make_case([400, 150], [48, 31], Hkv=2, K=48, Pc=16, seed=3)
    gen = torch.Generator().manual_seed(7)
    hits = []
    for _ in range(4):
        slot, miss = run(triton_op, case)
        want_slot, want_miss = oracle(case)
        assert torch.equal(slot.cpu(), want_slot) and torch.equal(miss.cpu(), want_miss)
        kept = (slot == case["prev_ids"]) & (slot >= 0)
        assert not (kept & miss).any()
        hits.append(kept.sum().item())
        # Drift the scores a little so consecutive steps share most chunks.
        noise = torch.rand(case["scores"].shape, generator=gen).to(DEVICE) * 0.3
        case = {**case, "scores": case["scores"] + noise, "prev_ids": slot}
    assert sum(hits[1:]) > 0, "drifted scores must produce hits"


def test_bad_input_is_refused() -> None:
    case = make_case([40], [4], Hkv=1, K=4, Pc=16)
    case["prev_ids"] = case["prev_ids"].long()
    with pytest.raises(ValueError, match="int32"):
        run(triton_op, case)


# select_chunks_inplace ------------------------------------------------------------------------
def inplace_case(
    counts: list[int],
    sel: list[int],
    Hkv: int,
    K: int,
    Pc: int,
    rows: list[int],
    primed: list[bool],
    seed: int = 0,
    stale: bool = False,
) -> dict:
    """A persistent selection state ``[max(rows) + 2, Hkv, K + 3]`` whose batch rows hold about
    half of this step's top chunks, other chunks of the sequence and empty slots; every other
    entry (other rows, slots ``>= K``, with ``stale`` also slots ``num_select..K``) is junk the
    op must leave alone or ignore."""
    case = make_case(counts, sel, Hkv, K, Pc, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    scores, ids = case["scores"].cpu(), case["landmark_ids"].cpu()
    table = case["page_table"].cpu().long()
    B, _, N = scores.shape
    state = torch.randint(-1, 5000, (max(rows) + 2, Hkv, K + 3), generator=gen, dtype=torch.int32)
    for b, (row, k) in enumerate(zip(rows, sel)):
        state[row, :, k:K] = -1
        if stale and k < K:
            state[row, :, k:K] = torch.randint(0, 5000, (Hkv, K - k), generator=gen).int()
        for h in range(Hkv):
            order = scores[b, h].argsort(descending=True)
            lm = ids[table[b, order // Pc], order % Pc, h]  # chunk ids, best first
            top, rest = lm[:k], lm[k : counts[b]]
            pool = torch.cat([top[torch.rand(k, generator=gen) < 0.5], rest])
            pool = pool[torch.randperm(len(pool), generator=gen)][:k]
            slots = torch.full((k,), -1, dtype=torch.int32)
            where = torch.randperm(k, generator=gen)[: len(pool)]
            slots[where] = pool.int()
            slots[torch.rand(k, generator=gen) < 0.1] = -1  # some slots start empty
            state[row, h, :k] = slots
    return dict(
        scores=case["scores"],
        landmark_ids=case["landmark_ids"],
        page_table=case["page_table"],
        num_select=case["num_select"],
        state=state.to(DEVICE),
        rows=torch.tensor(rows, dtype=torch.int64, device=DEVICE),
        num_slots=K,
        primed=torch.tensor(primed, dtype=torch.bool, device=DEVICE),
        counters=torch.tensor([7, 11], dtype=torch.int64, device=DEVICE),
    )


def inplace_oracle(case: dict) -> tuple[list, list, list, list]:
    """Plain-Python lists ``(state, slot_ids, miss, counters)`` after one step.

    Per (b, h): the ``num_select[b]`` best landmarks' chunk ids; a slot keeps its chunk when it
    is chosen again, the other chosen chunks in ascending id fill the remaining used slots in
    ascending order; slots ``>= num_select[b]`` become ``-1``. Primed sequences add their kept
    slots and used slots to the counters.
    """
    scores = case["scores"].cpu().tolist()
    ids = case["landmark_ids"].cpu().tolist()
    table = case["page_table"].cpu().tolist()
    state = case["state"].cpu().tolist()
    rows, K = case["rows"].cpu().tolist(), case["num_slots"]
    primed = case["primed"].cpu().tolist()
    hits, used = case["counters"].cpu().tolist()
    Pc = len(ids[0])
    slot_ids, miss = [], []
    for b, k in enumerate(case["num_select"].cpu().tolist()):
        slot_ids.append([]), miss.append([])
        for h, old in enumerate(state[rows[b]]):
            N = len(scores[b][h])
            best = sorted(range(N), key=lambda n: -scores[b][h][n])[:k]
            chosen = {ids[table[b][n // Pc]][n % Pc][h] for n in best}
            new = [c if c in chosen else None for c in old[:k]]
            missing = sorted(chosen - set(new))
            flags = [c is None for c in new]
            new = [missing.pop(0) if c is None else c for c in new]
            assert not missing
            hits += sum(not f for f in flags) if primed[b] else 0
            used += k if primed[b] else 0
            old[:K] = new + [-1] * (K - k)
            slot_ids[b].append(old[:K])
            miss[b].append(flags + [False] * (K - k))
    return state, slot_ids, miss, [hits, used]


def run_inplace(fn, case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    names = ("scores", "landmark_ids", "page_table", "num_select", "state", "rows", "num_slots")
    return fn(*[case[n] for n in names], case["primed"], case["counters"])


def clone_case(case: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def check_inplace(case: dict) -> None:
    """Triton == reference == the Python oracle: outputs, the whole state, the counters."""
    want_state, want_slot, want_miss, want_counters = inplace_oracle(case)
    ref_case, tri_case = clone_case(case), clone_case(case)
    ref_slot, ref_miss = run_inplace(select_chunks_inplace_ref, ref_case)
    slot, miss = run_inplace(select_chunks_inplace, tri_case)
    assert slot.dtype == torch.int32 and miss.dtype == torch.bool
    for got, got_miss, c in ((ref_slot, ref_miss, ref_case), (slot, miss, tri_case)):
        assert got.cpu().tolist() == want_slot, (got.cpu() != torch.tensor(want_slot)).nonzero()
        assert got_miss.cpu().tolist() == want_miss
        assert c["state"].cpu().tolist() == want_state, "state: only rows[b, :, :K] may change"
        assert c["counters"].cpu().tolist() == want_counters


INPLACE_SHAPES = [
    pytest.param(counts, sel, Hkv, K, Pc, rows, primed, id=name)
    for name, counts, sel, Hkv, K, Pc, rows, primed in [
        ("Hkv1-K1", [1], [1], 1, 1, 16, [3], [True]),
        ("Hkv2-K5-rows502", [37, 20, 300], [5, 0, 3], 2, 5, 16, [5, 0, 2], [True, False, True]),
        ("Hkv3-K16-ragged", [40, 16], [16, 9], 3, 16, 8, [4, 1], [False, True]),
        ("Hkv4-K64", [100, 70, 64], [64, 10, 64], 4, 64, 32, [2, 6, 0], [True, True, False]),
        ("Hkv7-K5-all-sel0", [9, 30], [0, 0], 7, 5, 4, [1, 0], [True, True]),
        ("Hkv7-K16", [33, 17, 200], [7, 16, 1], 7, 16, 16, [0, 3, 1], [True, False, True]),
        ("Hkv1-K256-all", [256], [256], 1, 256, 64, [2], [True]),
        ("Hkv2-K256-B2", [300, 700], [256, 131], 2, 256, 64, [1, 0], [True, False]),
    ]
]


@pytest.mark.parametrize(("counts", "sel", "Hkv", "K", "Pc", "rows", "primed"), INPLACE_SHAPES)
def test_inplace_matches_reference_and_oracle(counts, sel, Hkv, K, Pc, rows, primed) -> None:
    check_inplace(inplace_case(counts, sel, Hkv, K, Pc, rows, primed))


def test_inplace_ignores_stale_slots_past_num_select() -> None:
    check_inplace(inplace_case([60, 50], [3, 12], 2, 16, 8, [2, 0], [True, True], stale=True))


def test_inplace_steps_track_the_oracle() -> None:
    """Four decode steps on one state: drifting scores, so later steps mostly hit."""
    case = inplace_case([400, 150, 90], [48, 31, 40], 3, 48, 16, [4, 0, 2], [False, True, True])
    gen = torch.Generator().manual_seed(9)
    for step in range(4):
        want_state, want_slot, want_miss, want_counters = inplace_oracle(case)
        slot, miss = run_inplace(select_chunks_inplace, case)  # updates case in place
        assert slot.cpu().tolist() == want_slot and miss.cpu().tolist() == want_miss, step
        assert case["state"].cpu().tolist() == want_state, step
        assert case["counters"].cpu().tolist() == want_counters, step
        noise = torch.rand(case["scores"].shape, generator=gen).to(DEVICE) * 0.3
        case["scores"] = case["scores"] + noise
        case["primed"] = torch.ones_like(case["primed"])
    hits, used = (case["counters"] - torch.tensor([7, 11], device=DEVICE)).tolist()
    assert 0 < hits < used, "drifted scores must mix hits and misses"


def test_inplace_is_canonical_whatever_the_topk_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shuffling each sequence's picks (the top-k order among selected landmarks) changes
    nothing: misses are placed by chunk id, not by pick order."""
    case = inplace_case([90, 70], [20, 13], 2, 20, 16, [1, 0], [True, True], seed=4)
    want_state, want_slot, want_miss, want_counters = inplace_oracle(case)
    real = torch.Tensor.topk
    gen = torch.Generator().manual_seed(5)
    calls = []

    def shuffled(self: torch.Tensor, k: int, dim: int = -1, **kw) -> SimpleNamespace:
        top = real(self, k, dim=dim, **kw).indices.clone()
        calls.append(k)
        for b, n in enumerate(case["num_select"].tolist()):
            for h in range(top.shape[1]):
                top[b, h, :n] = top[b, h, :n][torch.randperm(n, generator=gen).to(top.device)]
        return SimpleNamespace(indices=top)

    monkeypatch.setattr(torch.Tensor, "topk", shuffled)
    slot, miss = run_inplace(select_chunks_inplace, case)
    assert calls == [20], "the op must take its picks from torch.topk"
    assert slot.cpu().tolist() == want_slot and miss.cpu().tolist() == want_miss
    assert case["state"].cpu().tolist() == want_state
    assert case["counters"].cpu().tolist() == want_counters


def test_inplace_with_nothing_to_do_launches_nothing() -> None:
    case = inplace_case([20], [0], 2, 0 + 1, 16, [1], [True])
    case["num_slots"] = 0
    before = clone_case(case)
    slot, miss = run_inplace(select_chunks_inplace, case)
    assert slot.shape == (1, 2, 0) and miss.shape == (1, 2, 0)
    assert torch.equal(case["state"], before["state"])
    assert torch.equal(case["counters"], before["counters"])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("state", lambda t: t.long(), "int32"),
        ("state", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), "slot axis"),
        ("rows", lambda t: t.float(), "rows"),
        ("rows", lambda t: t[:1], "rows"),
        ("primed", lambda t: t.int(), "primed"),
        ("counters", lambda t: t.int(), "counters"),
        ("counters", lambda t: t[:1], "counters"),
        ("num_select", lambda t: t.long(), "int32"),
        ("landmark_ids", lambda t: t.long(), "int32"),
        ("num_slots", lambda k: k + 4, "Kmax"),
    ],
)
def test_inplace_refuses_bad_input(
    field: str, value, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the dispatcher (shape checks) into the Triton launcher (dtype/layout checks)."""
    monkeypatch.setenv("SHADOWKV_KERNELS", "triton")
    case = inplace_case([40, 30], [4, 2], 2, 4, 16, [1, 0], [True, False])
    case[field] = value(case[field])
    with pytest.raises(ValueError, match=match):
        run_inplace(dispatch_inplace, case)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_inplace_property(data: st.DataObject) -> None:
    """Random small batches: Triton == reference == oracle, state and counters included."""
    B = data.draw(st.integers(1, 3), label="B")
    Hkv = data.draw(st.integers(1, 4), label="Hkv")
    K = data.draw(st.integers(1, 20), label="K")
    Pc = data.draw(st.sampled_from([4, 8, 16]), label="Pc")
    counts = data.draw(st.lists(st.integers(K, 3 * K + 8), min_size=B, max_size=B), label="n")
    sel = [data.draw(st.integers(0, K), label="sel") for _ in range(B)]
    rows = data.draw(st.permutations(range(B + 2)), label="rows")[:B]
    primed = data.draw(st.lists(st.booleans(), min_size=B, max_size=B), label="primed")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    stale = data.draw(st.booleans(), label="stale")
    case = inplace_case(counts, sel, Hkv, K, Pc, rows, primed, seed, stale)
    if data.draw(st.booleans(), label="int32 rows"):
        case["rows"] = case["rows"].int()
    check_inplace(case)
