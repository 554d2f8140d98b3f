"""Per-sequence page tables of the ShadowKV cache and the index plans built from them once a step.

Every tensor a layer's prefill or decode indexes with is built here, once per step, so the
per-layer work only launches ops (no host round trips between layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shadowkv.cache.base import CacheCapacityError, bucket
from shadowkv.cache.shadow_layout import PAGE_CHUNKS, SeqLayout, cdiv


@dataclass(frozen=True)
class PrefillPlan:
    row: int
    layout: SeqLayout
    exact_rows: torch.Tensor  # [E] buffer rows of the exact tokens (all T when dense)
    factor_rows: torch.Tensor  # [T] rows of the factor pages (empty when dense)
    landmark_rows: torch.Tensor  # [N] rows of the landmark pages
    store_pages: tuple[int, ...]  # value-store pages in chunk order (host ints: copy plans)
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
    drive_hit_rate: float | None = None  # benchmarks: selection driven to this hit rate


@dataclass(frozen=True)
class DecodePlan:
    rows: torch.Tensor  # [B] sequence slots
    buf_tables: torch.Tensor  # [B, max blocks] int32
    seq_lens: torch.Tensor  # [B] int32 buffer rows to attend, the new token included
    gen_rows: torch.Tensor  # [B] int64 buffer row of the new token
    sparse: SparsePlan | None  # None when every sequence in the step runs dense


@dataclass(frozen=True)
class StepWidths:
    """Python-level sizes of a decode plan (hashable: the key of a captured step).

    ``buffer``: buffer-table columns. The rest sizes the sparse part and is 0 when the step has
    no sparse sequence: factor / landmark / value-store page-table columns, ``select`` slots per
    KV head, and ``tiers``: the value tiers gathered from (one gather each).
    """

    buffer: int
    factor: int = 0
    landmark: int = 0
    store: int = 0
    select: int = 0
    tiers: tuple[int, ...] = ()
    # Benchmarks: the selection is driven to this hit rate (shadow_drive.py). Part of the key so
    # a captured step never replays another setting.
    drive_hit_rate: float | None = None

    @property
    def sparse(self) -> bool:
        return self.select > 0


class SequenceTables:
    """Sequence slots, their layouts, and device page tables (factor, value-store, buffer).

    Value-store page numbers index the arena of the sequence's tier (``value_tier``). Row
    ``pad_row`` (past the ``max_num_seqs`` slots) belongs to the padding entries of fixed-shape
    steps: null pages everywhere, its buffer table pointing at a scratch block.
    """

    def __init__(
        self,
        max_num_seqs: int,
        max_model_len: int,
        chunk_size: int,
        page_tokens: int,
        block_rows: int,
        device: torch.device,
        scratch_block: int,
        max_select: int,
    ) -> None:
        self.chunk_size, self.page_tokens, self.block_rows = chunk_size, page_tokens, block_rows
        self.device = device

        def table(width: int) -> torch.Tensor:
            return torch.zeros(max_num_seqs + 1, width, dtype=torch.int32, device=device)

        self.factor = table(cdiv(max_model_len, page_tokens))
        self.store = table(cdiv(cdiv(max_model_len, chunk_size), PAGE_CHUNKS))
        self.buffer = table(cdiv(max_model_len, block_rows))
        self.max_select = max_select  # selection slots per KV head (the selection state's width)
        self.pad_row = max_num_seqs
        self.buffer[self.pad_row] = scratch_block
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

    def plan_prefill(self, seq_id: int, store_pages: tuple[int, ...]) -> PrefillPlan:
        """Index tensors of one sequence's prefill; ``store_pages`` are its value pages."""
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
            store_pages=store_pages,
            value_tier=self.value_tier[seq_id],
        )

    def decode_columns(self, seq_ids: list[int], lengths: list[int]) -> dict[str, list[int]]:
        """Per-sequence integers of one decode step; ``lengths`` are tokens cached before it."""
        lays = [self.layouts[s] for s in seq_ids]
        gen = [lay.gen_start + n - lay.prompt_len for lay, n in zip(lays, lengths)]
        for s, lay, g in zip(seq_ids, lays, gen):
            if g >= lay.buffer_rows:
                raise CacheCapacityError(
                    f"sequence {s} generates past the {lay.max_new_tokens} new tokens reserved "
                    "at admission"
                )
        return {
            "rows": [self.rows[s] for s in seq_ids],
            "gen": gen,
            "num_select": [lay.num_select for lay in lays],
            "select_start": [lay.select_start for lay in lays],
            "num_landmarks": [lay.num_landmarks for lay in lays],
            "primed": [s in self.primed for s in seq_ids],
            "tier": [self.value_tier[s] for s in seq_ids],
        }

    def pad_columns(self) -> dict[str, int]:
        """A padding entry: no prompt rows, nothing selected, its token in the scratch block."""
        cols = dict.fromkeys(("gen", "num_select", "select_start", "num_landmarks", "primed"), 0)
        return {"rows": self.pad_row, **cols, "tier": 0}

    def decode_widths(
        self,
        seq_ids: list[int],
        lengths: list[int],
        static: bool,
        tiers: tuple[int, ...],
        drive_hit_rate: float | None = None,
    ) -> StepWidths:
        """Exact sizes of this batch's plan, or (``static``) sizes fixed for the batch's life:
        each a power of two at least as large, capped by its table; ``tiers`` are the store's
        tiers (a static step gathers from every tier, masked)."""
        lays = [self.layouts[s] for s in seq_ids]
        S, P = self.block_rows, self.page_tokens
        if static:
            buffer = bucket(max(cdiv(x.buffer_rows, S) for x in lays), self.buffer.shape[1])
        else:  # up to the new token's row
            buffer = max(cdiv(x.gen_start + n - x.prompt_len + 1, S) for x, n in zip(lays, lengths))
        sparse = [x for x in lays if not x.dense]
        if not sparse:
            return StepWidths(buffer)

        def width(need: int, table: torch.Tensor) -> int:
            need = max(1, need)
            return bucket(need, table.shape[1]) if static else need

        factor = width(max(cdiv(x.prompt_len, P) for x in sparse), self.factor)
        landmark = width(max(cdiv(x.num_landmarks, PAGE_CHUNKS) for x in sparse), self.factor)
        select = max(x.num_select for x in sparse)
        if static:
            select = min(bucket(select, self.max_select), landmark * PAGE_CHUNKS)
        else:
            tiers = tuple(sorted({self.value_tier[s] for s, x in zip(seq_ids, lays) if not x.dense}))
        return StepWidths(
            buffer,
            factor,
            landmark,
            width(max(cdiv(x.num_chunks, PAGE_CHUNKS) for x in sparse), self.store),
            select,
            tiers,
            drive_hit_rate,
        )

    def plan_decode(self, cols: dict[str, torch.Tensor], widths: StepWidths) -> DecodePlan:
        """Index tensors of one decode step from its device columns (device ops only)."""
        S = self.block_rows
        rows, gen_t = cols["rows"], cols["gen"]
        tables = self.buffer[rows, : widths.buffer]
        gen_rows = tables.gather(1, (gen_t // S)[:, None]).squeeze(1).long() * S + gen_t % S
        sparse = self._plan_sparse(cols, tables, widths) if widths.sparse else None
        seq_lens = (gen_t + 1).to(torch.int32)
        return DecodePlan(rows, tables, seq_lens, gen_rows, sparse)

    def _plan_sparse(
        self, cols: dict[str, torch.Tensor], tables: torch.Tensor, widths: StepWidths
    ) -> SparsePlan:
        S, C, dev = self.block_rows, self.chunk_size, self.device
        rows, num_select = cols["rows"], cols["num_select"].to(torch.int32)
        offs = torch.arange(widths.select * C, device=dev)
        used = offs[None, :] < cols["num_select"][:, None] * C
        # Selected slots sit before the new token's row, so ``tables`` covers them.
        r = torch.where(used, cols["select_start"][:, None] + offs, 0)
        dst = tables.gather(1, r // S).long() * S + r % S
        factor = self.factor[rows, : widths.factor]
        if len(widths.tiers) == 1:  # dense sequences have no misses: one gather serves them all
            groups: tuple[tuple[int, torch.Tensor | None], ...] = ((widths.tiers[0], None),)
        else:  # [B] masks, built on the device
            groups = tuple((u, cols["tier"] == u) for u in widths.tiers)
        return SparsePlan(
            factor_tables=factor,
            landmark_tables=factor[:, : widths.landmark],
            store_tables=self.store[rows, : widths.store],
            num_landmarks=cols["num_landmarks"].to(torch.int32),
            num_select=num_select,
            dst_rows=dst.masked_fill(~used, -1),
            primed=cols["primed"].bool(),
            value_groups=groups,
            drive_hit_rate=widths.drive_hit_rate,
        )
