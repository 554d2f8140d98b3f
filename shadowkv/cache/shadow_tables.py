"""Per-sequence page tables of the ShadowKV cache and the index plans built from them once a step.

Every tensor a layer's prefill or decode indexes with is built here, once per step, so the
per-layer work only launches ops (no host round trips between layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shadowkv.cache.base import CacheCapacityError, device_columns
from shadowkv.cache.shadow_layout import PAGE_CHUNKS, SeqLayout, cdiv


@dataclass(frozen=True)
class PrefillPlan:
    row: int
    layout: SeqLayout
    exact_rows: torch.Tensor  # [E] buffer rows of the exact tokens (all T when dense)
    factor_rows: torch.Tensor  # [T] rows of the factor pages (empty when dense)
    landmark_rows: torch.Tensor  # [N] rows of the landmark pages
    store_pages: torch.Tensor  # value-store pages in chunk order
    value_tier: int  # the store tier those pages belong to


@dataclass(frozen=True)
class SparsePlan:
    factor_tables: torch.Tensor  # [B, max factor pages] int32
    landmark_tables: torch.Tensor  # [B, max landmark pages] int32 (a prefix of factor_tables)
    store_tables: torch.Tensor  # [B, max store pages] int32
    num_landmarks: torch.Tensor  # [B] int32
    num_select: torch.Tensor  # [B] int32
    dst_rows: torch.Tensor  # [B, K*C] int64 buffer rows of the selected slots, -1 unused
    primed: torch.Tensor  # [B] bool: the slots hold a previous step's selection
    # (tier, [B] bool: the sequences whose values it holds, or None for all of them) per tier
    # that holds a sparse sequence of the step: decode gathers once per entry.
    value_groups: tuple[tuple[int, torch.Tensor | None], ...]


@dataclass(frozen=True)
class DecodePlan:
    seqs: list[int]
    rows: torch.Tensor  # [B] sequence slots
    buf_tables: torch.Tensor  # [B, max blocks] int32
    seq_lens: torch.Tensor  # [B] int32 buffer rows to attend, the new token included
    gen_rows: torch.Tensor  # [B] int64 buffer row of the new token
    sparse: SparsePlan | None  # None when every sequence in the step runs dense


class SequenceTables:
    """Sequence slots, their layouts, and device page tables (factor, value-store, buffer).

    Value-store page numbers index the arena of the sequence's tier (``value_tier``).
    """

    def __init__(
        self,
        max_num_seqs: int,
        max_model_len: int,
        chunk_size: int,
        page_tokens: int,
        block_rows: int,
        device: torch.device,
    ) -> None:
        self.chunk_size, self.page_tokens, self.block_rows = chunk_size, page_tokens, block_rows
        self.device = device

        def table(width: int) -> torch.Tensor:
            return torch.zeros(max_num_seqs, width, dtype=torch.int32, device=device)

        self.factor = table(cdiv(max_model_len, page_tokens))
        self.store = table(cdiv(cdiv(max_model_len, chunk_size), PAGE_CHUNKS))
        self.buffer = table(cdiv(max_model_len, block_rows))
        self.rows: dict[int, int] = {}
        self.layouts: dict[int, SeqLayout] = {}
        self.value_tier: dict[int, int] = {}
        self.primed: set[int] = set()  # sequences whose slots hold a previous selection
        self._free = list(range(max_num_seqs - 1, -1, -1))

    @property
    def has_free_row(self) -> bool:
        return bool(self._free)

    def admit(
        self,
        seq_id: int,
        layout: SeqLayout,
        factor_pages: list[int],
        store_pages: list[int],
        blocks: list[int],
        value_tier: int,
    ) -> int:
        """Give a sequence a slot and fill its tables; returns the slot row."""
        row = self._free.pop()
        for t, pages in (
            (self.factor, factor_pages),
            (self.store, store_pages),
            (self.buffer, blocks),
        ):
            t[row, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.rows[seq_id], self.layouts[seq_id] = row, layout
        self.value_tier[seq_id] = value_tier
        return row

    def release(self, seq_id: int) -> None:
        row = self.rows.pop(seq_id)
        for t in (self.factor, self.store, self.buffer):
            t[row] = 0
        self._free.append(row)
        self.layouts.pop(seq_id)
        self.value_tier.pop(seq_id)
        self.primed.discard(seq_id)

    def buffer_rows(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Flat rows (``block * S + offset``) of a sequence's buffer rows ``[start, end)``."""
        S = self.block_rows
        pos = torch.arange(start, end, device=self.device)
        return self.buffer[self.rows[seq_id]].long()[pos // S] * S + pos % S

    def plan_prefill(self, seq_id: int) -> PrefillPlan:
        lay, row = self.layouts[seq_id], self.rows[seq_id]
        P, dev = self.page_tokens, self.device
        exact_end = lay.prompt_len if lay.dense else lay.select_start
        table = self.factor[row].long()
        tok = torch.arange(0 if lay.dense else lay.prompt_len, device=dev)
        lm = torch.arange(lay.num_landmarks, device=dev)
        return PrefillPlan(
            row,
            lay,
            exact_rows=self.buffer_rows(seq_id, 0, exact_end),
            factor_rows=table[tok // P] * P + tok % P,
            landmark_rows=table[lm // PAGE_CHUNKS] * PAGE_CHUNKS + lm % PAGE_CHUNKS,
            store_pages=self.store[row].long(),
            value_tier=self.value_tier[seq_id],
        )

    def plan_decode(self, seq_ids: list[int], lengths: list[int]) -> DecodePlan:
        """Index tensors of one decode step; ``lengths`` are tokens cached before it."""
        lays = [self.layouts[s] for s in seq_ids]
        gen = [lay.gen_start + n - lay.prompt_len for lay, n in zip(lays, lengths)]
        for s, lay, g in zip(seq_ids, lays, gen):
            if g >= lay.buffer_rows:
                raise CacheCapacityError(
                    f"sequence {s} generates past the {lay.max_new_tokens} new tokens reserved "
                    "at admission"
                )
        S = self.block_rows
        cols = device_columns(
            {
                "rows": [self.rows[s] for s in seq_ids],
                "gen": gen,
                "num_select": [lay.num_select for lay in lays],
                "select_start": [lay.select_start for lay in lays],
                "num_landmarks": [lay.num_landmarks for lay in lays],
                "primed": [s in self.primed for s in seq_ids],
                "tier": [self.value_tier[s] for s in seq_ids],
            },
            self.device,
        )
        rows, gen_t = cols["rows"], cols["gen"]
        tables = self.buffer[rows, : max(cdiv(g + 1, S) for g in gen)]
        gen_rows = tables.gather(1, (gen_t // S)[:, None]).squeeze(1).long() * S + gen_t % S
        sparse = None
        if not all(lay.dense for lay in lays):
            sparse = self._plan_sparse(seq_ids, lays, cols, tables)
        seq_lens = (gen_t + 1).to(torch.int32)
        return DecodePlan(list(seq_ids), rows, tables, seq_lens, gen_rows, sparse)

    def _plan_sparse(
        self,
        seq_ids: list[int],
        lays: list[SeqLayout],
        cols: dict[str, torch.Tensor],
        tables: torch.Tensor,
    ) -> SparsePlan:
        S, C, dev = self.block_rows, self.chunk_size, self.device

        def widest(pages: list[int]) -> int:
            return max(1, *pages)

        rows, num_select = cols["rows"], cols["num_select"].to(torch.int32)
        K = max(lay.num_select for lay in lays)
        offs = torch.arange(K * C, device=dev)
        used = offs[None, :] < cols["num_select"][:, None] * C
        # Selected slots sit before the new token's row, so ``tables`` covers them.
        r = torch.where(used, cols["select_start"][:, None] + offs, 0)
        dst = tables.gather(1, r // S).long() * S + r % S
        factor = self.factor[rows, : widest([cdiv(x.prompt_len, self.page_tokens) for x in lays])]
        return SparsePlan(
            factor_tables=factor,
            landmark_tables=factor[:, : widest([cdiv(x.num_landmarks, PAGE_CHUNKS) for x in lays])],
            store_tables=self.store[
                rows, : widest([cdiv(x.num_chunks, PAGE_CHUNKS) for x in lays])
            ],
            num_landmarks=cols["num_landmarks"].to(torch.int32),
            num_select=num_select,
            dst_rows=dst.masked_fill(~used, -1),
            primed=cols["primed"].bool(),
            value_groups=self._value_groups(seq_ids, lays, cols["tier"]),
        )

    def _value_groups(
        self, seq_ids: list[int], lays: list[SeqLayout], tier: torch.Tensor
    ) -> tuple[tuple[int, torch.Tensor | None], ...]:
        tiers = [self.value_tier[s] for s in seq_ids]
        used = sorted({t for t, lay in zip(tiers, lays) if not lay.dense})
        if len(used) == 1:  # dense sequences have no misses, so one tier serves the whole batch
            return ((used[0], None),)
        return tuple((u, tier == u) for u in used)  # [B] masks, built on the device
