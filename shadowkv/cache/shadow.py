"""ShadowKV (Sun et al., arXiv 2410.21465) as an attention cache: one implementation, CPU and GPU.

Prefill keeps, per layer and sequence: low-rank factors of the pre-RoPE keys (``A [T, R]`` in
paged device memory, ``Wᵀ [R, Hkv*D]`` in a basis slot per prompt segment), one landmark per
candidate chunk, the local window and outlier chunks exact in a paged buffer, and every value in
the value store (host tier first, device tier when the host tier is full; see ``store.py``).
Every size comes from ``shadow_sizing.py``.
Decode selects chunks by landmark score, rebuilds the keys and fetches the values of chunks not
already in the buffer, and attends exactly over ``[local | outliers | selected | generated]``.
The four steps are kernel ops (``shadowkv.kernels``) dispatched by device; the buffer is paged
like ``DenseCache`` and read by the same ``decode_attention``.

Shapes: ``T`` prompt tokens, ``B`` decoding sequences, ``H``/``Hkv`` query/KV heads, ``D`` head
dim, ``R`` rank, ``C`` chunk size, ``N`` landmarks and ``K`` selected chunks per KV head.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from shadowkv.cache.base import (
    Admission,
    AttentionCache,
    CacheCapacityError,
    CacheOptions,
    PrefillChunk,
    SeqRecord,
    SharedPrefix,
)
from shadowkv.cache.layout import KVLayout
from shadowkv.cache.methods import ShadowKVConfig
from shadowkv.cache.pages import PageAllocator
from shadowkv.cache.shadow_drive import LandmarkSelection, SelectionPolicy
from shadowkv.cache.shadow_layout import PAGE_CHUNKS, SeqLayout, cdiv, plan_sequence
from shadowkv.cache.shadow_prefill import exact_token_index, lowrank_factors, summarize_chunks
from shadowkv.cache.shadow_share import (
    ShadowPrefix,
    exact_chunks,
    rebuild_keys,
    shared_layout,
    sorted_outliers,
)
from shadowkv.cache.shadow_sizing import size_shadowkv
from shadowkv.cache.shadow_staging import STAGING, STAGING_GRAM, PromptStaging
from shadowkv.cache.shadow_tables import (
    BASIS,
    BLOCKS,
    FACTOR,
    KEYS,
    VALUE_POOLS,
    DecodePlan,
    PrefillPlan,
    SequenceTables,
    ShadowSeq,
    SparsePlan,
    StepWidths,
)
from shadowkv.cache.store import HOST, TierUnavailable, ValueStore
from shadowkv.cache.timing import SpanTimer, timed
from shadowkv.kernels.decode_attention import decode_attention
from shadowkv.kernels.fp8 import CODE_DTYPE, SCALE_DTYPE, quantize_fp8
from shadowkv.kernels.gather_values import gather_values
from shadowkv.kernels.reconstruct_keys import reconstruct_keys
from shadowkv.kernels.rope import apply_rope
from shadowkv.kernels.rope.tables import RopeTables
from shadowkv.kernels.select_chunks import select_chunks_inplace


@dataclass(frozen=True)
class ShadowChunk:
    """ShadowKV's plan of a prefill chunk (``PrefillChunk.detail``): the sequence's row plan,
    and for a prompt that stages its chunks until the last one (a sparse prompt admitted with
    ``staged=True``) the staging pool rows of its tokens ``[0, end)`` and its Gram slot; for a
    sequence started from a shared prefix, the prefix's tokens (its suffix's chunks go to its
    exact rows ``[0, T - prefix_tokens)``, or, a segment 1, are staged: ``stage_rows [end -
    prefix_tokens]`` then hold its suffix's tokens)."""

    plan: PrefillPlan
    stage_rows: torch.Tensor | None  # [end] int64
    gram: int = 0
    prefix_tokens: int = 0

    @property
    def staged(self) -> bool:
        return self.stage_rows is not None


class ShadowKVCache(AttentionCache):
    """Low-rank pre-RoPE keys and paged exact buffers on ``device``; values in two tiers."""

    cfg: ShadowKVConfig
    needs_rope = True  # rebuilt keys are rotated at their original positions
    stages_prompts = True  # shadow_staging.py

    def __init__(
        self,
        cfg: ShadowKVConfig,
        layout: KVLayout,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        memory_bytes: int,
        rope: RopeTables | None = None,
    ) -> None:
        super().__init__(cfg, layout, device, max_num_seqs, max_model_len)
        if rope is None or rope.rotary_dims != layout.spec.rotary_dims:
            raise ValueError(
                f"ShadowKV rebuilds keys with RoPE: it needs the tables of the layers' "
                f"{layout.spec.rotary_dims} rotary dims"
            )
        self.rope = rope
        # Prefix sharing of this cache's own pages (below), or host copies (the engine's store).
        self.supports_shared_prefix = cfg.share_prefix_memory
        sz = size_shadowkv(cfg, layout, device, max_num_seqs, max_model_len, memory_bytes)
        self.sizing = sz
        L, Hkv, D, dtype = layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype
        self.rank = R = sz.rank
        self.page_tokens = P = sz.page_tokens
        self.share_unit = P  # a shared prefix is whole factor (and value) pages
        self.block_rows = S = sz.block_rows
        self.max_slots = sz.max_slots
        fix = "raise EngineConfig.cache_memory_gb, lower max_tokens, or wait for running requests"
        self.allocators[FACTOR] = PageAllocator(
            "ShadowKV factor pages", sz.num_factor_pages, f"{P} tokens", fix, sz.factor_page_bytes
        )
        self.allocators[BLOCKS] = PageAllocator(
            "ShadowKV buffer blocks", sz.num_blocks, f"{S} rows", fix, sz.block_bytes
        )
        # One key basis W^T per prompt segment (today: one per sparse sequence); its memory is
        # counted in slot_bytes, as the selection state is.
        self.allocators[BASIS] = PageAllocator(
            "ShadowKV basis slots", max_num_seqs, "one basis", fix, null_page=False
        )
        self.store = ValueStore(sz.values, sz.host_value_bytes, sz.device_value_bytes, device)
        for tier, name in enumerate(VALUE_POOLS):
            self.allocators[name] = self.store.tiers[tier].pages
        # Exact key copies are host-tier pages too (one pool of host memory): the same allocator
        # under a second name, so a record's key pages are told from its values. Summing
        # over ``allocators.values()`` counts that pool twice: count pages by name.
        self.allocators[KEYS] = self.store.tiers[HOST].pages
        self.keeps_prefix_keys = False  # will_share_prefixes() turns it on
        # Sparse prompts prefilling in chunks, from admission until their last chunk
        # (``shadow_staging.py``).
        self.staging = PromptStaging(
            sz.staging, layout, P, device,
            "wait for the prompt prefilling in chunks to finish, or raise staging_tokens "
            "(ShadowKVConfig) or EngineConfig.max_num_batched_tokens",
        )
        self.allocators[STAGING] = self.staging.pages
        self.allocators[STAGING_GRAM] = self.staging.grams

        def alloc(*shape: int, dt: torch.dtype = dtype) -> list[torch.Tensor]:
            return [torch.empty(shape, dtype=dt, device=device) for _ in range(L)]

        num_pages, num_blocks = sz.num_factor_pages, sz.num_blocks
        self.a_pages = alloc(num_pages, P, R)
        fp8_landmarks = cfg.landmark_dtype == "fp8"
        lm_dtype = CODE_DTYPE if fp8_landmarks else dtype
        self.landmarks = alloc(num_pages, PAGE_CHUNKS, Hkv, D, dt=lm_dtype)
        # fp8 landmarks: e4m3 codes above, one float32 scale per landmark here.
        self.landmark_scales = (
            alloc(num_pages, PAGE_CHUNKS, Hkv, dt=SCALE_DTYPE) if fp8_landmarks else None
        )
        self.landmark_ids = alloc(num_pages, PAGE_CHUNKS, Hkv, dt=torch.int32)
        self.k_buf = alloc(num_blocks + 1, S, Hkv, D)  # block num_blocks: padding scratch
        self.v_buf = alloc(num_blocks + 1, S, Hkv, D)
        pools = [self.a_pages, self.landmarks, self.landmark_ids, self.k_buf, self.v_buf]
        for pool in pools + ([self.landmark_scales] if self.landmark_scales else []):
            for t in pool:
                t[0].zero_()  # the null page
        self.w_t = alloc(max_num_seqs + 1, R, layout.kv_dim)
        # Per layer [max_num_seqs + 1, Hkv, max_slots]: the chunk each buffer slot holds, -1 =
        # empty (the last row is the padding row's).
        self.selection = [
            torch.full((max_num_seqs + 1, Hkv, self.max_slots), -1, dtype=torch.int32,
                       device=device)
            for _ in range(L)
        ]
        self.tables = SequenceTables(
            max_num_seqs, max_model_len, cfg.chunk_size, P, S, device, num_blocks, self.max_slots
        )
        # Per layer (hits, used slots) since the last reset, counted by the selection kernel
        # itself (no launch of their own).
        self._counts = torch.zeros(L, 2, dtype=torch.int64, device=device)
        # On CUDA the value fetch (PCIe-bound) runs on its own stream, overlapping the key rebuild
        # (compute-bound) as in the paper.
        overlap = device.type == "cuda" and cfg.overlap_fetch
        self._fetch_stream = torch.cuda.Stream(device) if overlap else None
        self.selector: SelectionPolicy = LandmarkSelection()
        self.svd_timer: SpanTimer | None = None  # benchmarks: time the prompt factorisations

    def will_share_prefixes(self) -> None:
        """Sparse prompts keep exact key copies for suffix prefills from their prefixes
        (``exact_prefix_keys``; ``_key_needs``)."""
        self.keeps_prefix_keys = self.cfg.exact_prefix_keys and self.supports_shared_prefix

    def set_selection(self, selector: SelectionPolicy) -> None:
        """Swap how chunks are scored (benchmarks: ``shadow_drive.DrivenSelection``)."""
        self.selector = selector
        self.step_epoch += 1

    # admission ---------------------------------------------------------------------------------
    def _layout(self, prompt_len: int, max_new_tokens: int, options: CacheOptions) -> SeqLayout:
        """The rows a sequence gets; ``exact`` runs it dense, a request budget may only lower
        ours (ours sizes the selection state)."""
        if options.exact:
            return SeqLayout(prompt_len, max_new_tokens, self.cfg.chunk_size, dense=True)
        cfg = self.cfg
        if options.sparse_budget is not None:
            own = cfg.budget_tokens(prompt_len)
            asked = self.seq_config(options).budget_tokens(prompt_len)  # type: ignore[attr-defined]
            cfg = replace(cfg, sparse_budget=min(own, asked))
        return plan_sequence(cfg, prompt_len, max_new_tokens)

    def plan_admission(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions
    ) -> Admission:
        lay = self._layout(prompt_len, max_new_tokens, options)
        needs = [(BLOCKS, cdiv(lay.buffer_rows, self.block_rows))]
        if lay.dense:
            return Admission(tuple(needs), (lay, HOST))
        needs += [(FACTOR, cdiv(prompt_len, self.page_tokens)), (BASIS, 1)]
        tier = self.store.placement(lay.num_chunks)
        if tier is None:
            return Admission(tuple(needs), (lay, HOST), self.store.shortfall(lay.num_chunks))
        values = self.store.layout.pages_for(lay.num_chunks)
        needs.append((VALUE_POOLS[tier], values))
        return Admission(tuple(needs) + self._key_needs(lay, tier, values), (lay, tier))

    def _key_needs(self, lay: SeqLayout, tier: int, values: int) -> tuple[tuple[str, int], ...]:
        """Host pages for the exact post-RoPE keys of the prompt's shareable tokens (its
        candidate region's whole pages: a prefix never reaches its local window), when prefixes
        are kept (``will_share_prefixes``) and the values are in the host tier. Best effort:
        none when the host tier lacks room for them beside the values (a prefix of that prompt
        then has its keys rebuilt), and none for values in the device tier (the copy would take
        device memory)."""
        pages = lay.num_candidates * self.cfg.chunk_size // self.page_tokens
        if not self.keeps_prefix_keys or tier != HOST or pages == 0:
            return ()
        if values + pages > self.allocators[KEYS].num_free:
            return ()
        return ((KEYS, pages),)

    def staging_needs(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions
    ) -> tuple[tuple[str, int], ...]:
        """A sparse prompt stages its chunks (``shadow_staging.py``); a dense one stores each
        chunk in its exact buffer rows as it comes."""
        if self._layout(prompt_len, max_new_tokens, options).dense:
            return ()
        return self.staging.needs(prompt_len)

    def fits_empty(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions | None = None
    ) -> bool:
        """Whether the sequence would fit with the pools empty (reads only their fixed sizes)."""
        if prompt_len > self.max_model_len:
            return False
        new = self.new_tokens(prompt_len, max_new_tokens)
        lay = self._layout(prompt_len, new, options or CacheOptions())
        return (
            cdiv(lay.buffer_rows, self.block_rows) <= self.allocators[BLOCKS].capacity
            and (
                lay.dense
                or cdiv(prompt_len, self.page_tokens) <= self.allocators[FACTOR].capacity
            )
            and self.store.fits_empty(lay.num_chunks)
        )

    def planning(self) -> contextlib.AbstractContextManager[None]:
        return self.store.planning_mode()

    def add_sequence(
        self, seq_id: int, prompt_len: int, max_new_tokens: int,
        options: CacheOptions | None = None, staged: bool = False,
        prefix: SharedPrefix | None = None, prefix_tokens: int = 0,
    ) -> None:
        args = (seq_id, prompt_len, max_new_tokens, options, staged, prefix, prefix_tokens)
        try:
            super().add_sequence(*args)
        except TierUnavailable as err:
            # The host arena could not be had (the store turned the host tier off and warned):
            # place the sequence again, in the device tier if it has room.
            try:
                super().add_sequence(*args)
            except CacheCapacityError:
                raise err from None

    def prepare(self, adm: Admission) -> None:
        lay, tier = adm.detail
        if not lay.dense:
            self.store.prepare(tier)

    def new_record(
        self, seq_id: int, row: int, prompt_len: int, max_new_tokens: int,
        options: CacheOptions, adm: Admission,
    ) -> SeqRecord:
        lay, tier = adm.detail
        return ShadowSeq(seq_id, row, prompt_len, max_new_tokens, options, layout=lay,
                         value_tier=tier)

    def on_admit(self, rec: SeqRecord) -> None:
        assert isinstance(rec, ShadowSeq)
        rec.basis = rec.pages[BASIS][0] if BASIS in rec.pages else self.pad_row
        self.tables.admit(rec)
        idx = torch.tensor(rec.pages[BLOCKS], device=self.device)
        for layer in range(self.num_layers):
            # Rows past a sequence's length are read (masked) by attention: keep them finite.
            self.k_buf[layer].index_fill_(0, idx, 0)
            self.v_buf[layer].index_fill_(0, idx, 0)
            self.selection[layer][rec.row] = -1
        if STAGING_GRAM in rec.pages:
            self.staging.begin(rec.pages[STAGING_GRAM][0])
        if rec.prefix is not None and rec.prefix_tokens:
            if rec.lay.segment_start:
                self._copy_landmark_page(rec)
            self._write_shared_exact(rec)

    def plan_growth(self, rec: SeqRecord, max_new_tokens: int) -> Admission:
        """More generated-token rows at the buffer's end: buffer blocks only. The prompt's
        factor, landmark and value pages, its basis and value tier stay as admitted."""
        assert isinstance(rec, ShadowSeq)
        lay = replace(rec.lay, max_new_tokens=max_new_tokens)
        return Admission(((BLOCKS, cdiv(lay.buffer_rows, self.block_rows)),), (lay, rec.value_tier))

    def on_grow(self, rec: SeqRecord, adm: Admission, added: dict[str, list[int]]) -> None:
        assert isinstance(rec, ShadowSeq)
        rec.layout = adm.detail[0]
        new = added.get(BLOCKS, [])
        if not new:
            return
        self.tables.grow(rec)
        idx = torch.tensor(new, device=self.device)
        for layer in range(self.num_layers):  # finite rows past the length, as at admission
            self.k_buf[layer].index_fill_(0, idx, 0)
            self.v_buf[layer].index_fill_(0, idx, 0)

    def on_free(self, rec: SeqRecord) -> None:
        self.tables.release(rec.row)

    def fixed_bytes(self, rec: SeqRecord) -> int:
        return self.sizing.slot_bytes

    def record(self, seq_id: int) -> ShadowSeq:
        rec = self.seqs[seq_id]
        assert isinstance(rec, ShadowSeq)
        return rec

    # prefix sharing (``shadow_share.py``) -------------------------------------------------------
    # A sparse prefilled prompt shares its first ``n`` tokens (whole factor pages inside its
    # candidate region) as segment 0 of later prompts: factor pages (A rows and landmarks),
    # value pages, basis slot, and an exact copy of its outlier chunks there (buffer blocks the
    # prefix holds). A sequence started from it keeps its suffix exact, like generated tokens.
    # A sequence that itself started from a prefix shares nothing (``make_prefix`` says None):
    # its segment 0 is that prefix, which is the one to keep.
    supports_shared_prefix = True

    def make_prefix(self, rec: SeqRecord, num_tokens: int) -> SharedPrefix | None:
        assert isinstance(rec, ShadowSeq)
        lay, C, P = rec.lay, self.cfg.chunk_size, self.page_tokens
        n = min(num_tokens, lay.num_candidates * C) // P * P  # p's local window is not shared
        if lay.dense or rec.prefix is not None or n == 0:
            return None
        layers = [sorted_outliers(rec.outlier_ids[i].cpu(), n // C) for i in range(self.num_layers)]
        ids = torch.stack([x for x, _ in layers])  # [L, O, Hkv]
        Kc = int((ids < n // C).sum(1).max()) if ids.shape[1] else 0
        try:
            blocks = self.allocators[BLOCKS].alloc(cdiv(Kc * C, self.block_rows))
        except CacheCapacityError:
            return None  # no room for the exact copy: nothing to share now
        copy_rows = self._copy_outliers(rec, blocks, [order[:Kc] for _, order in layers])
        pages = {
            FACTOR: rec.pages[FACTOR][: n // P],
            VALUE_POOLS[rec.value_tier]: rec.value_pages[: n // P],
            BASIS: rec.pages[BASIS],
        }
        if KEYS in rec.pages:  # exact keys (released once the sequence decodes: end_decode)
            pages[KEYS] = rec.pages[KEYS][: n // P]
        if blocks:
            pages[BLOCKS] = blocks
        detail = ShadowPrefix(rec.basis, rec.value_tier, ids[:, :Kc].contiguous(), copy_rows)
        return SharedPrefix(n, pages, detail)

    def _copy_outliers(
        self, rec: ShadowSeq, blocks: list[int], orders: list[torch.Tensor]
    ) -> torch.Tensor:
        """Copy ``rec``'s outlier rows into ``blocks``: per layer, slot ``i`` of head ``h`` gets
        the head's outlier chunk ``orders[layer][i, h]`` (an index into its buffer's outlier
        chunks; ``[Kc, Hkv]``). Returns the copy's flat buffer rows ``[Kc*C]``."""
        lay, C, S, dev = rec.lay, self.cfg.chunk_size, self.block_rows, self.device
        pos = torch.arange(orders[0].shape[0] * C, device=dev)
        copy_rows = torch.tensor(blocks, dtype=torch.int64, device=dev)[pos // S] * S + pos % S
        src = self.tables.buffer_rows(rec.row, lay.local_len, lay.select_start).view(-1, C)
        heads = torch.arange(self.layout.num_kv_heads, device=dev)[None, :, None]
        for layer, order in enumerate(orders):
            rows = src[order.to(dev)]  # [Kc, Hkv, C]
            for buf in (self.k_buf[layer], self.v_buf[layer]):
                flat = buf.view(-1, *buf.shape[2:])  # [rows, Hkv, D]
                flat[copy_rows] = flat[rows, heads].transpose(1, 2).flatten(0, 1)
        return copy_rows

    def share_prefix(self, seq_id: int, num_tokens: int) -> SharedPrefix | None:
        prefix = super().share_prefix(seq_id, num_tokens)
        if prefix is not None and BLOCKS in prefix.pages:
            # make_prefix allocated the exact copy (one reference) and the base took the
            # prefix's: the prefix is its only holder.
            self.allocators[BLOCKS].release(prefix.pages[BLOCKS])
        return prefix

    def _shared_layout(
        self, prefix: SharedPrefix, prompt_len: int, max_new_tokens: int,
        options: CacheOptions | None, prefix_tokens: int,
    ) -> SeqLayout | None:
        options = options or CacheOptions()
        if options.exact or not isinstance(prefix.detail, ShadowPrefix):
            return None
        if self.cfg.shared_suffix_tokens == 0:  # never share memory
            return None
        full = self._layout(prompt_len, max_new_tokens, options)
        cfg = self.cfg
        lay = shared_layout(
            full, prefix.detail, prefix_tokens, cfg.shared_suffix_tokens, cfg.local_chunks,
            cfg.outlier_chunks,
        )
        if lay is not None and lay.segment_start:  # its own pages must fit the empty pools
            needs = self._segment_needs(lay, prefix.detail.value_tier)
            if any(num > self.allocators[name].capacity for name, num in needs):
                return None
        return lay

    def prefix_start(
        self, prefix: SharedPrefix, prompt_len: int, max_new_tokens: int,
        options: CacheOptions | None, matched: int,
    ) -> int:
        """Whole factor pages of the prefix, when the sequence would run sparse and keep a
        landmark, with its suffix exact (at most ``shared_suffix_tokens``) or as segment 1 (long
        enough to be sparse on its own, its own pages and staging within the pools' sizes);
        else 0 (it prefills from scratch)."""
        n = super().prefix_start(prefix, prompt_len, max_new_tokens, options, matched)
        new = self.new_tokens(prompt_len, max_new_tokens)
        if n and self._shared_layout(prefix, prompt_len, new, options, n) is not None:
            return n
        return 0

    def plan_shared(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions,
        prefix: SharedPrefix, prefix_tokens: int,
    ) -> tuple[Admission, dict[str, list[int]]]:
        """Its own buffer blocks (suffix, the prefix's extra exact chunks, selection slots,
        generated tokens); it holds the prefix's factor and value pages of its tokens and its
        basis slot. With a segment 1 also (``_segment_needs``): the suffix's factor pages and a
        landmark copy page, a basis slot, value pages in the prefix's tier, and staging."""
        lay = None
        if prefix_tokens <= prefix.num_tokens and prefix_tokens % self.page_tokens == 0:
            lay = self._shared_layout(prefix, prompt_len, max_new_tokens, options, prefix_tokens)
        if lay is None:
            raise ValueError(
                f"a prompt of {prompt_len} tokens cannot start from {prefix_tokens} tokens of "
                f"this {prefix.num_tokens}-token ShadowKV prefix; start it from prefix_start's "
                "count (0: prefill it from scratch)"
            )
        detail: ShadowPrefix = prefix.detail
        pages = prefix_tokens // self.page_tokens
        tier = VALUE_POOLS[detail.value_tier]
        shared = {
            FACTOR: prefix.pages[FACTOR][:pages],
            tier: prefix.pages[tier][:pages],
            BASIS: prefix.pages[BASIS],
        }
        if KEYS in prefix.pages:  # held while its suffix prefills (released in end_decode)
            shared[KEYS] = prefix.pages[KEYS][:pages]
        needs = ((BLOCKS, cdiv(lay.buffer_rows, self.block_rows)),)
        if lay.segment_start:
            needs += self._segment_needs(lay, detail.value_tier)
        return Admission(needs, (lay, detail.value_tier)), shared

    def _segment_needs(self, lay: SeqLayout, tier: int) -> tuple[tuple[str, int], ...]:
        """A segment 1's own pages: factor pages for its suffix's ``A`` rows plus one landmark
        copy page (first), a basis slot, value pages after the shared ones (the prefix's tier:
        a sequence's pages are in one tier), and staging for its suffix's tokens."""
        n, P = lay.segment_start, self.page_tokens
        values = self.store.layout.pages_for(lay.num_chunks) - n // P
        return (
            (FACTOR, 1 + cdiv(lay.prompt_len, P) - n // P),
            (BASIS, 1),
            (VALUE_POOLS[tier], values),
            *self.staging.needs(lay.prompt_len - n),
        )

    def _copy_landmark_page(self, rec: ShadowSeq) -> None:
        """A segment 1's copy page: the partial last page of segment 0's landmarks (``N' % 16``
        of them, with ids and fp8 scales) copied from the shared factor page, which stays
        read-only; the suffix's landmarks follow them there."""
        lay = rec.lay
        src = rec.pages[FACTOR][lay.seg0_landmarks // PAGE_CHUNKS]
        dst = rec.pages[FACTOR][lay.segment_start // self.page_tokens]
        num = lay.seg0_landmarks % PAGE_CHUNKS
        pools = [self.landmarks, self.landmark_ids]
        for pool in pools + ([self.landmark_scales] if self.landmark_scales else []):
            for t in pool:
                t[dst, :num] = t[src, :num]

    def _write_shared_exact(self, rec: ShadowSeq) -> None:
        """A sequence started from a prefix: its ``k`` exact chunks of the prefix
        (``exact_chunks``) into buffer rows ``[local_len, local_len + k*C)``, outliers from the
        prefix's exact copy, the other chunks' keys rebuilt low-rank and their values read from
        the store; with the prefix's key copy (``exact_prefix_keys``) those keys are exact too.
        Landmarks ``[0, N' + k)`` lie in the shared factor pages."""
        assert rec.prefix is not None
        detail: ShadowPrefix = rec.prefix.detail
        lay, C, dev = rec.lay, self.cfg.chunk_size, self.device
        k = (lay.outlier_rows - lay.suffix_outlier_rows) // C
        if k == 0:
            return
        Hkv = self.layout.num_kv_heads
        rows = self.tables.buffer_rows(rec.row, lay.local_len, lay.local_len + k * C)
        table = self.tables.factor[rec.row].long()
        pages = self.tables.store[rec.row].long()
        num_landmarks = lay.seg0_landmarks
        lm = torch.arange(num_landmarks + k, device=dev)
        lm_rows = table[lm // PAGE_CHUNKS] * PAGE_CHUNKS + lm % PAGE_CHUNKS
        P, n = self.page_tokens, rec.prefix_tokens
        copy = detail.copy_rows[: k * C]
        for layer in range(self.num_layers):
            lm_ids = self.landmark_ids[layer].view(-1, Hkv)[lm_rows]  # [N' + k, Hkv]
            outliers = detail.outlier_ids[layer, :k].to(dev)
            chunks, outlier = exact_chunks(outliers, lm_ids, n // C, num_landmarks)
            if KEYS in rec.pages:
                keys = self._stored_keys(layer, rec.pages[KEYS], chunks)  # [k, C, Hkv, D]
            else:
                tok = chunks[:, None, :] * C + torch.arange(C, device=dev)[:, None]  # [k, C, Hkv]
                a = self.a_pages[layer].view(-1, self.rank)[table[tok // P] * P + tok % P]
                cos, sin = self.rope.rows(tok)
                w_t = self.w_t[layer][rec.basis]
                keys = rebuild_keys(a, w_t, Hkv, cos, sin, self.rope.style)  # [k, C, Hkv, D]
            vals = self.store.read(rec.value_tier, layer, pages, chunks, dev)  # [k, C, Hkv, D]
            is_copy = outlier[:, None, :, None]
            keys = torch.where(is_copy, self._exact_rows(self.k_buf[layer], copy), keys)
            vals = torch.where(is_copy, self._exact_rows(self.v_buf[layer], copy), vals)
            self._write_exact(layer, rows, keys.flatten(0, 1), vals.flatten(0, 1))

    def _exact_rows(self, buf: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Buffer ``rows [k*C]`` of one layer's ``buf`` as ``[k, C, Hkv, D]``."""
        return buf.view(-1, *buf.shape[2:])[rows].view(-1, self.cfg.chunk_size, *buf.shape[2:])

    def _read_shared(
        self, layer: int, plan: PrefillPlan, prefix_tokens: int, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens ``[start, end)`` of a sequence started from a prefix: the prefix's
        exact keys from its key copy when it has one (``exact_prefix_keys``), else its keys
        rebuilt low-rank (the method's own representation of them; exact at full rank), and its
        values from the store, then the suffix's exact rows."""
        n, C, dev = prefix_tokens, self.cfg.chunk_size, self.device
        Hkv, D = self.layout.num_kv_heads, self.layout.head_dim
        chunks = torch.arange(n // C, device=dev)[:, None].expand(-1, Hkv)
        if plan.key_pages:
            k = self._stored_keys(layer, plan.key_pages, chunks).reshape(n, Hkv, D)
        else:
            a = self.a_pages[layer].view(-1, self.rank)[plan.factor_rows[:n]]  # [n, R]: seg 0
            cos, sin = self.rope.rows(torch.arange(n, device=dev))
            w_t = self.w_t[layer][plan.basis]
            k = rebuild_keys(a, w_t, Hkv, cos[:, None], sin[:, None], self.rope.style)
        pages = torch.tensor(plan.store_pages, dtype=torch.int64, device=dev)
        v = self.store.read(plan.value_tier, layer, pages, chunks, dev).reshape(n, Hkv, D)
        rest = max(0, end - n)
        if self._chunk.detail.staged:  # a segment 1: its suffix's staged tokens
            k_s, v_s = self._read_staged(layer, n, n + rest, n)
        else:
            rows = plan.exact_rows[:rest]
            k_s = self.k_buf[layer].view(-1, Hkv, D)[rows]
            v_s = self.v_buf[layer].view(-1, Hkv, D)[rows]
        k_all = torch.cat([k.to(self.dtype), k_s.to(self.dtype)])
        v_all = torch.cat([v.to(self.dtype), v_s.to(self.dtype)])
        return k_all[start:end], v_all[start:end]

    def _stored_keys(
        self, layer: int, key_pages: Sequence[int], chunks: torch.Tensor
    ) -> torch.Tensor:
        """Exact post-RoPE keys ``[K, C, Hkv, D]`` of chunk ``chunks[k, h]`` of KV head ``h``
        from a prompt's key copy (``key_pages``, host tier; fp8 decoded, as values are)."""
        pages = torch.tensor(key_pages, dtype=torch.int64, device=self.device)
        return self.store.read(HOST, layer, pages, chunks, self.device)

    # steps -------------------------------------------------------------------------------------
    def plan_chunk(self, chunk: PrefillChunk) -> ShadowChunk:
        rec = self.record(chunk.seq_id)
        plan = self.tables.plan_prefill(rec)
        n = rec.prefix_tokens
        if n and not rec.lay.segment_start:  # its suffix is exact rows, written as it comes
            return ShadowChunk(plan, None, prefix_tokens=n)
        if n:  # a segment 1 stages its suffix's tokens until its last chunk
            rows = self.staging.rows(rec.pages[STAGING], chunk.end - n, self.device)
            return ShadowChunk(plan, rows, rec.pages[STAGING_GRAM][0], n)
        # A sparse prompt admitted to stage keeps its chunks in its staging pages until its last
        # (``shadow_staging.py``); a whole prompt, or one running dense, is stored as it comes.
        if STAGING not in rec.pages:
            if not rec.lay.dense and chunk.num_tokens < rec.prompt_len:
                raise ValueError(
                    f"sequence {chunk.seq_id} was admitted without staging, so its sparse "
                    f"prompt of {rec.prompt_len} tokens cannot prefill in chunks; admit it with "
                    "add_sequence(..., staged=True) or prefill it whole"
                )
            return ShadowChunk(plan, None)
        rows = self.staging.rows(rec.pages[STAGING], chunk.end, self.device)
        return ShadowChunk(plan, rows, rec.pages[STAGING_GRAM][0])

    def end_prefill(self, seq_id: int | None = None) -> None:
        super().end_prefill(seq_id)
        if self.prefill_completes():  # the prompt is stored: its staging goes back to the pool
            rec = self.record(self._chunk.seq_id)
            for name in (STAGING, STAGING_GRAM):
                if name in rec.pages:
                    self.allocators[name].release(rec.pages.pop(name))

    supports_static_decode = True

    def decode_columns(self, seq_ids: list[int]) -> dict[str, list[int]]:
        return self.tables.decode_columns([self.record(s) for s in seq_ids])

    def pad_columns(self) -> dict[str, int]:
        return self.tables.pad_columns()

    def decode_widths(self, seq_ids: list[int], static: bool) -> StepWidths:
        recs = [self.record(s) for s in seq_ids]
        return self.tables.decode_widths(recs, static, self.store.live_tiers())

    def plan_decode(self, cols: dict[str, torch.Tensor], widths: StepWidths) -> None:
        self._decode = self.tables.plan_decode(cols, widths)

    def end_decode(self) -> None:
        super().end_decode()
        for s in self._decode_seqs:
            rec = self.record(s)
            rec.primed = True
            if KEYS in rec.pages:
                # Only a prefill reads key copies: a decoding sequence holds none (a prefix
                # shared from it keeps its own reference; the engine shares at prefill end).
                self.allocators[KEYS].release(rec.pages.pop(KEYS))

    # per layer -------------------------------------------------------------------------------
    def store_prompt(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> None:
        chunk = self._chunk
        plan: PrefillPlan = chunk.detail.plan
        start, end = chunk.start, chunk.end
        if plan.layout.dense:
            self._write_exact(layer, plan.exact_rows[start:end], k, v)
            return
        n = chunk.detail.prefix_tokens
        if n and chunk.detail.staged:
            self._stage_suffix(layer, k, v, k_pre)
            return
        if n:  # suffix token t is exact row t - n
            self._write_exact(layer, plan.exact_rows[start - n : end - n], k, v)
            return
        if not chunk.detail.staged:
            T = k.shape[0]
            self._store_sparse(layer, plan, k, v, k_pre.reshape(T, -1), None)
            return
        rows, gram = chunk.detail.stage_rows, chunk.detail.gram
        self.staging.add(layer, rows[start:end], gram, k_pre, v)
        if self.prefill_completes():  # the whole prompt is here: store it as unchunked would
            k_all = torch.cat([self.read_prompt(layer, 0, start)[0], k]) if start else k
            k_pre_all, v_all = self.staging.read(layer, rows)
            self._store_sparse(layer, plan, k_all, v_all, k_pre_all, self.staging.gram[layer][gram])

    def read_prompt(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        plan: PrefillPlan = self._chunk.detail.plan
        if plan.layout.dense:
            rows = plan.exact_rows[start:end]
            Hkv, D = self.layout.num_kv_heads, self.layout.head_dim
            k, v = self.k_buf[layer].view(-1, Hkv, D), self.v_buf[layer].view(-1, Hkv, D)
            return k[rows], v[rows]
        if self._chunk.detail.prefix_tokens:
            return self._read_shared(layer, plan, self._chunk.detail.prefix_tokens, start, end)
        return self._read_staged(layer, start, end)

    def _read_staged(
        self, layer: int, start: int, end: int, first: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Staged tokens ``[start, end)`` of the current chunk's sequence (its staging row 0 is
        token ``first``: a segment 1 stages its suffix only), keys rotated."""
        rows = self._chunk.detail.stage_rows[start - first : end - first]
        k_pre, v = self.staging.read(layer, rows)
        k_pre = k_pre.view(v.shape)
        # Rotated by the model's own op and table rows: the keys its layer produced, bit for bit.
        cos, sin = self.rope.rows(torch.arange(start, end, device=self.device))
        k = apply_rope(k_pre, k_pre, cos, sin, self.rope.style)[1]
        return k, v

    def _stage_suffix(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> None:
        """Stage a segment 1's chunk; at its last, store its whole suffix (``_store_suffix``)."""
        chunk = self._chunk
        detail: ShadowChunk = chunk.detail
        n, rows = detail.prefix_tokens, detail.stage_rows
        assert rows is not None
        self.staging.add(layer, rows[chunk.start - n : chunk.end - n], detail.gram, k_pre, v)
        if self.prefill_completes():
            k_old = self._read_staged(layer, n, chunk.start, n)[0]
            k_pre_all, v_all = self.staging.read(layer, rows)
            gram = self.staging.gram[layer][detail.gram]
            self._store_suffix(layer, detail.plan, torch.cat([k_old, k]), v_all, k_pre_all, gram)

    def _store_sparse(
        self, layer: int, plan: PrefillPlan, k: torch.Tensor, v: torch.Tensor,
        k_pre: torch.Tensor, gram: torch.Tensor | None,
    ) -> None:
        """Factorise, summarise and store a whole sparse prompt's layer: ``k, v [T, Hkv, D]``,
        ``k_pre [T, Hkv*D]``, ``gram``: its ``KᵀK`` when summed chunk by chunk."""
        T, Hkv, D = k.shape
        self._write_factors(layer, plan.factor_rows, plan.basis, k_pre, gram)
        s = summarize_chunks(k, self.cfg.chunk_size, self.cfg.local_chunks, self.cfg.outlier_chunks)
        self.record(self._chunk.seq_id).outlier_ids[layer] = s.outlier_ids
        self._write_landmarks(layer, plan.landmark_rows, s.landmarks, s.landmark_ids)
        idx = exact_token_index(T, self.cfg.chunk_size, s.num_candidates, s.outlier_ids)
        idx = idx[..., None].expand(-1, -1, D)  # [E, Hkv, D]
        self._write_exact(layer, plan.exact_rows, k.gather(0, idx), v.gather(0, idx))
        self.store.write(plan.value_tier, layer, plan.store_pages, v)
        if plan.key_pages:  # exact keys of the shareable tokens (``_key_needs``)
            num = len(plan.key_pages) * self.page_tokens
            self.store.write(HOST, layer, plan.key_pages, k[:num])

    def _store_suffix(
        self, layer: int, plan: PrefillPlan, k: torch.Tensor, v: torch.Tensor,
        k_pre: torch.Tensor, gram: torch.Tensor,
    ) -> None:
        """Store a segment 1 (suffix ``[n, T)``) as ``_store_sparse`` stores a prompt, in its own
        pages: ``k, v [T - n, Hkv, D]``, ``k_pre [T - n, Hkv*D]`` and its Gram. Its chunk ids
        (landmarks, outliers) count from ``n/C``; its landmarks follow segment 0's ``N'``."""
        lay, C = plan.layout, self.cfg.chunk_size
        n, D = lay.segment_start, k.shape[2]
        self._write_factors(layer, plan.factor_rows[n:], plan.suffix_basis, k_pre, gram)
        s = summarize_chunks(k, C, self.cfg.local_chunks, self.cfg.outlier_chunks)
        self.record(self._chunk.seq_id).outlier_ids[layer] = s.outlier_ids + n // C
        rows = plan.landmark_rows[lay.seg0_landmarks :]
        self._write_landmarks(layer, rows, s.landmarks, s.landmark_ids + n // C)
        idx = exact_token_index(k.shape[0], C, s.num_candidates, s.outlier_ids)
        idx = idx[..., None].expand(-1, -1, D)  # [E, Hkv, D]: local window, then outliers
        self._write_exact(layer, plan.exact_rows, k.gather(0, idx), v.gather(0, idx))
        self.store.write(plan.value_tier, layer, plan.store_pages[n // self.page_tokens :], v)

    def _write_factors(
        self, layer: int, factor_rows: torch.Tensor, basis: int, k_pre: torch.Tensor,
        gram: torch.Tensor | None,
    ) -> None:
        """Factorise one segment's pre-RoPE keys ``[T, Hkv*D]``: ``A`` to ``factor_rows [T]``,
        ``Wᵀ`` to basis slot ``basis``."""
        with timed(self.svd_timer):
            f = lowrank_factors(k_pre, self.rank, gram)
        self.a_pages[layer].view(-1, self.rank)[factor_rows] = f.a.to(self.dtype)
        self.w_t[layer][basis] = f.w_t.to(self.dtype)

    def _write_landmarks(
        self, layer: int, rows: torch.Tensor, landmarks: torch.Tensor, ids: torch.Tensor
    ) -> None:
        """Landmarks ``[N, Hkv, D]`` (fp32 means) and their chunk ids ``[N, Hkv]`` to landmark
        ``rows [N]``."""
        Hkv, D = landmarks.shape[1:]
        if self.landmark_scales is None:
            self.landmarks[layer].view(-1, Hkv, D)[rows] = landmarks.to(self.dtype)
        else:  # quantised from the fp32 means, not from their model-dtype rounding
            codes, scales = quantize_fp8(landmarks)
            self.landmarks[layer].view(-1, Hkv, D)[rows] = codes
            self.landmark_scales[layer].view(-1, Hkv)[rows] = scales
        self.landmark_ids[layer].view(-1, Hkv)[rows] = ids.to(torch.int32)

    def decode(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> torch.Tensor:
        plan: DecodePlan = self._decode
        self._write_exact(layer, plan.gen_rows, k, v)
        if plan.sparse is not None:
            self._refresh_selection(layer, q, plan, plan.sparse)
        return decode_attention(
            q, self.k_buf[layer], self.v_buf[layer], plan.buf_tables, plan.seq_lens, self.scale
        )

    def _write_exact(
        self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        Hkv, D = self.layout.num_kv_heads, self.layout.head_dim
        self.k_buf[layer].view(-1, Hkv, D)[rows] = k.to(self.dtype)
        self.v_buf[layer].view(-1, Hkv, D)[rows] = v.to(self.dtype)

    def _refresh_selection(
        self, layer: int, q: torch.Tensor, plan: DecodePlan, sp: SparsePlan
    ) -> None:
        """Select this step's chunks; rebuild keys and fetch values of the slots that changed."""
        rows = plan.rows
        K = sp.dst_rows.shape[1] // self.cfg.chunk_size
        scores = self.selector.scores(self, layer, q, sp, rows, K)
        # Top-k, then one kernel: hits keep their slots, misses fill the freed ones, the state
        # of these rows is updated in place and the layer's hit counters advance.
        slot_ids, miss = select_chunks_inplace(
            scores, self.landmark_ids[layer], sp.landmark_tables, sp.num_select,
            self.selection[layer], rows, K, sp.primed, self._counts[layer],
        )
        fetch = self._fetch_stream
        if fetch is not None:
            main = torch.cuda.current_stream(self.device)
            fetch.wait_stream(main)  # the selection is ready
            with torch.cuda.stream(fetch):
                self._fetch_values(layer, slot_ids, miss, sp)
        reconstruct_keys(
            self.k_buf[layer],
            self.a_pages[layer],
            sp.factor_tables,
            self.w_t[layer],
            plan.seg_basis,
            plan.seg_starts,
            slot_ids,
            miss,
            self.rope.cos,
            self.rope.sin,
            sp.dst_rows,
            self.cfg.chunk_size,
            self.rope.style,
        )
        if fetch is None:
            self._fetch_values(layer, slot_ids, miss, sp)
        else:
            # Attention reads the values next. Waiting here also orders every later reuse of the
            # tensors the fetch read (freed on the main stream) after the fetch.
            main.wait_stream(fetch)

    def _fetch_values(
        self, layer: int, slot_ids: torch.Tensor, miss: torch.Tensor, sp: SparsePlan
    ) -> None:
        """Missed chunks' values from the store into the buffer, one gather per value tier
        (on the fetch stream when there is one)."""
        for tier, seqs in sp.value_groups:
            tier_miss = miss if seqs is None else miss & seqs[:, None, None]
            gather_values(
                self.v_buf[layer],
                self.store.layer(tier, layer),
                sp.store_tables,
                slot_ids,
                tier_miss,
                sp.dst_rows,
                self.store.scales(tier, layer),
            )

    # accounting ------------------------------------------------------------------------------
    def hit_rate(self) -> list[float]:
        """Per layer: share of selected chunks already in the buffer from the previous step
        (decode steps after each sequence's first; NaN before any)."""
        hits, used = self._counts.T.tolist()
        return [h / u if u else math.nan for h, u in zip(hits, used)]

    def reset_hit_rate(self) -> None:
        self._counts.zero_()
