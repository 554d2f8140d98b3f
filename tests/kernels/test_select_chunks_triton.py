"""Triton ``select_chunks`` == PyTorch reference == a plain-Python set oracle."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from shadowkv.kernels.select_chunks.reference import select_chunks as reference  # noqa: E402
from shadowkv.kernels.select_chunks.triton import select_chunks as triton_op  # noqa: E402

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
