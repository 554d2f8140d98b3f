"""Per-sequence page tables of the ShadowKV cache and the index plans built from them once a step.

Every tensor a layer's prefill or decode indexes with is built here, once per step, so the
per-layer work only launches ops (no host round trips between layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shadowkv.cache.base import CacheCapacityError, SeqRecord, bucket
from shadowkv.cache.shadow_layout import PAGE_CHUNKS, SeqLayout, cdiv

FACTOR, BLOCKS, BASIS = "factor", "blocks", "basis"  # allocator names (values: VALUE_POOLS)
VALUE_POOLS = ("host values", "device values")  # by tier index
# Exact post-RoPE key copies of a prompt, for suffix prefills from its prefixes: pages of the
# host value tier, listed in a record under this name (an alias of that pool:
# ``AttentionCache.pool_aliases``) so it tells its key pages from its value pages
# (``ShadowKVCache.will_share_prefixes``).
KEYS = "host key copies"
# Prompt segments per sequence, each factorised with its own key basis (prefix sharing makes two:
# a shared prefix and a long suffix of the request's own); unused ones start past every token.
MAX_SEGMENTS = 2
NO_SEGMENT = torch.iinfo(torch.int32).max


@dataclass
class ShadowSeq(SeqRecord):
    """A ShadowKV sequence: its rows (``layout``), the value tier its values live in, the slot
    of its key basis ``W^T`` (its prompt's segment 0: a shared prefix's, if it started from one;
    a segment 1's is its second ``BASIS`` page; ``pad_row`` when it runs dense), whether
    its selection slots hold a previous step's chunks (``primed``), and per layer the outlier
    chunk ids ``[O, Hkv]`` of its prefilled sparse prompt in the order of its buffer rows
    (``outlier_ids``: what sharing its prefix copies, ``shadow_share.py``)."""

    layout: SeqLayout | None = None
    value_tier: int = 0
    basis: int = 0
    primed: bool = False
    outlier_ids: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def lay(self) -> SeqLayout:
        assert self.layout is not None
        return self.layout

    @property
    def value_pages(self) -> list[int]:
        return self.pages.get(VALUE_POOLS[self.value_tier], [])


@dataclass(frozen=True)
class PrefillPlan:
    basis: int  # the w_t row (basis slot) its factorisation goes to
    layout: SeqLayout
    exact_rows: torch.Tensor  # [E] buffer rows of the exact tokens (all T when dense)
    factor_rows: torch.Tensor  # [T] rows of the factor pages (empty when dense)
    landmark_rows: torch.Tensor  # [N] rows of the landmark pages
    store_pages: tuple[int, ...]  # value-store pages in chunk order (host ints: copy plans)
    value_tier: int  # the store tier those pages belong to
    suffix_basis: int = 0  # the w_t row of segment 1's basis (``layout.segment_start > 0``)
    # Host-tier pages of exact post-RoPE keys, chunk order (``KEYS``): where a prompt's are
    # written, or, for a sequence from a prefix, where the prefix's are read; () when none.
    key_pages: tuple[int, ...] = ()


@dataclass(frozen=True)
class SparsePlan:
    factor_tables: torch.Tensor  # [B, max factor pages] int32
    landmark_tables: torch.Tensor  # [B, max landmark pages] int32
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
    rows: torch.Tensor  # [B] sequence slots
    seg_basis: torch.Tensor  # [B, MAX_SEGMENTS] w_t row of each prompt segment's key basis
    seg_starts: torch.Tensor  # [B, MAX_SEGMENTS] int32 first token of each segment
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

    @property
    def sparse(self) -> bool:
        return self.select > 0


class SequenceTables:
    """Device page tables of the sequence slots (factor, landmark, value-store, buffer) and the
    step plans built from them and the sequences' records.

    Landmark ``i`` of a sequence is slot ``i % 16`` of page ``landmark[row, i // 16]``. The
    landmark table equals the factor table, except for a sequence with a segment 1 (prefix
    sharing): the shared factor pages holding whole pages of segment 0's landmarks, then its own
    copy page, then its suffix's factor pages (``admit``).

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
        self.landmark = table(cdiv(max_model_len, page_tokens) + 1)  # + a segment-1 copy page
        self.store = table(cdiv(cdiv(max_model_len, chunk_size), PAGE_CHUNKS))
        self.buffer = table(cdiv(max_model_len, block_rows))
        self.seg_basis = table(MAX_SEGMENTS)
        self.seg_starts = table(MAX_SEGMENTS).fill_(NO_SEGMENT)
        self.seg_starts[:, 0] = 0
        self.seg_basis[max_num_seqs] = max_num_seqs  # the padding row's (never read: no misses)
        self.max_select = max_select  # selection slots per KV head (the selection state's width)
        self.pad_row = max_num_seqs
        self.buffer[self.pad_row] = scratch_block

    def admit(self, rec: ShadowSeq) -> None:
        """Fill a newly admitted sequence's tables. One segment: the whole prompt, its landmarks
        on its factor pages. With a segment 1 from token ``n``, its factor pages are ``n/P``
        shared ones, then its own copy page, then its suffix's (``segment_pages``)."""
        factor = rec.pages.get(FACTOR, [])
        landmark = factor
        lay = rec.layout
        if lay is not None and lay.segment_start:
            factor, landmark = segment_pages(factor, lay, self.page_tokens)
            self.seg_basis[rec.row, 1] = rec.pages[BASIS][1]
            self.seg_starts[rec.row, 1] = lay.segment_start
        for t, pages in (
            (self.factor, factor),
            (self.landmark, landmark),
            (self.store, rec.value_pages),
            (self.buffer, rec.pages[BLOCKS]),
        ):
            t[rec.row, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.seg_basis[rec.row, 0] = rec.basis

    def grow(self, rec: ShadowSeq) -> None:
        """A grown sequence's buffer table: the blocks it holds now, in order."""
        blocks = rec.pages[BLOCKS]
        self.buffer[rec.row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)

    def release(self, row: int) -> None:
        for t in (self.factor, self.landmark, self.store, self.buffer, self.seg_basis):
            t[row] = 0
        self.seg_starts[row, 1:] = NO_SEGMENT

    def buffer_rows(self, row: int, start: int, end: int) -> torch.Tensor:
        """Flat rows (``block * S + offset``) of slot ``row``'s buffer rows ``[start, end)``."""
        S = self.block_rows
        pos = torch.arange(start, end, device=self.device)
        return self.buffer[row].long()[pos // S] * S + pos % S

    def plan_prefill(self, rec: ShadowSeq) -> PrefillPlan:
        """Index tensors of one sequence's prefill."""
        lay, row = rec.lay, rec.row
        P, dev = self.page_tokens, self.device
        exact_end = lay.prompt_len if lay.dense else lay.select_start
        exact = self.buffer_rows(row, 0, exact_end)
        if lay.segment_start:  # the suffix's: its local window, then its outliers
            outliers = exact[exact_end - lay.suffix_outlier_rows :]
            exact = torch.cat([exact[: lay.local_len], outliers])
        table, lm_table = self.factor[row].long(), self.landmark[row].long()
        tok = torch.arange(0 if lay.dense else lay.prompt_len, device=dev)
        lm = torch.arange(lay.num_landmarks, device=dev)
        return PrefillPlan(
            rec.basis,
            lay,
            exact_rows=exact,
            factor_rows=table[tok // P] * P + tok % P,
            landmark_rows=lm_table[lm // PAGE_CHUNKS] * PAGE_CHUNKS + lm % PAGE_CHUNKS,
            store_pages=tuple(rec.value_pages),
            value_tier=rec.value_tier,
            suffix_basis=rec.pages[BASIS][1] if lay.segment_start else 0,
            key_pages=tuple(rec.pages.get(KEYS, ())),
        )

    def decode_columns(self, recs: list[ShadowSeq]) -> dict[str, list[int]]:
        """Per-sequence integers of one decode step (``rec.length``: tokens cached before it)."""
        lays = [r.lay for r in recs]
        gen = [lay.gen_start + r.length - lay.prompt_len for lay, r in zip(lays, recs)]
        for r, lay, g in zip(recs, lays, gen):
            if g >= lay.buffer_rows:
                raise CacheCapacityError(
                    f"sequence {r.seq_id} generates past the {lay.max_new_tokens} new tokens "
                    "reserved at admission and by growth (AttentionCache.grow)"
                )
        return {
            "rows": [r.row for r in recs],
            "gen": gen,
            "num_select": [lay.num_select for lay in lays],
            "select_start": [lay.select_start for lay in lays],
            "num_landmarks": [lay.num_landmarks for lay in lays],
            "primed": [r.primed for r in recs],
            "tier": [r.value_tier for r in recs],
        }

    def pad_columns(self) -> dict[str, int]:
        """A padding entry: no prompt rows, nothing selected, its token in the scratch block."""
        cols = dict.fromkeys(("gen", "num_select", "select_start", "num_landmarks", "primed"), 0)
        return {"rows": self.pad_row, **cols, "tier": 0}

    def decode_widths(
        self, recs: list[ShadowSeq], static: bool, tiers: tuple[int, ...]
    ) -> StepWidths:
        """Exact sizes of this batch's plan, or (``static``) sizes fixed for the batch's life:
        each a power of two at least as large, capped by its table; ``tiers`` are the store's
        tiers (a static step gathers from every tier, masked)."""
        lays = [r.lay for r in recs]
        S, P = self.block_rows, self.page_tokens
        if static:
            buffer = bucket(max(cdiv(x.buffer_rows, S) for x in lays), self.buffer.shape[1])
        else:  # up to the new token's row
            buffer = max(
                cdiv(x.gen_start + r.length - x.prompt_len + 1, S) for x, r in zip(lays, recs)
            )
        sparse = [x for x in lays if not x.dense]
        if not sparse:
            return StepWidths(buffer)

        def width(need: int, table: torch.Tensor) -> int:
            need = max(1, need)
            return bucket(need, table.shape[1]) if static else need

        factor = width(max(cdiv(x.prompt_len, P) for x in sparse), self.factor)
        landmark = width(max(cdiv(x.num_landmarks, PAGE_CHUNKS) for x in sparse), self.landmark)
        select = max(x.num_select for x in sparse)
        if static:
            select = min(bucket(select, self.max_select), landmark * PAGE_CHUNKS)
        else:
            tiers = tuple(sorted({r.value_tier for r in recs if not r.lay.dense}))
        return StepWidths(
            buffer,
            factor,
            landmark,
            width(max(cdiv(x.num_chunks, PAGE_CHUNKS) for x in sparse), self.store),
            select,
            tiers,
        )

    def plan_decode(self, cols: dict[str, torch.Tensor], widths: StepWidths) -> DecodePlan:
        """Index tensors of one decode step from its device columns (device ops only)."""
        S = self.block_rows
        rows, gen_t = cols["rows"], cols["gen"]
        tables = self.buffer[rows, : widths.buffer]
        gen_rows = tables.gather(1, (gen_t // S)[:, None]).squeeze(1).long() * S + gen_t % S
        sparse = self._plan_sparse(cols, tables, widths) if widths.sparse else None
        seq_lens = (gen_t + 1).to(torch.int32)
        return DecodePlan(
            rows, self.seg_basis[rows], self.seg_starts[rows], tables, seq_lens, gen_rows, sparse
        )

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
            landmark_tables=self.landmark[rows, : widths.landmark],
            store_tables=self.store[rows, : widths.store],
            num_landmarks=cols["num_landmarks"].to(torch.int32),
            num_select=num_select,
            dst_rows=dst.masked_fill(~used, -1),
            primed=cols["primed"].bool(),
            value_groups=groups,
        )


def segment_pages(
    pages: list[int], lay: SeqLayout, page_tokens: int
) -> tuple[list[int], list[int]]:
    """(factor, landmark) tables of a sequence with a segment 1 from its factor ``pages``:
    ``n/P`` shared, its copy page, then its suffix's. Factor: the shared and suffix pages in
    token order; landmark: the shared pages holding whole pages of segment 0's landmarks
    (``N' // 16``), the copy page (the partial last one, then the suffix's), the suffix's."""
    shared = lay.segment_start // page_tokens
    factor = pages[:shared] + pages[shared + 1 :]
    landmark = pages[: lay.seg0_landmarks // PAGE_CHUNKS] + pages[shared:]
    return factor, landmark
