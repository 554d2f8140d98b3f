"""ShadowKV (Sun et al., arXiv 2410.21465) as an attention cache: one implementation, CPU and GPU.

Prefill keeps, per layer and sequence: low-rank factors of the pre-RoPE keys (``A [T, R]`` in
paged device memory, ``Wᵀ [R, Hkv*D]`` per sequence slot), one landmark per candidate chunk, the
local window and outlier chunks exact in a paged buffer, and every value in the value store
(host tier first, device tier when the host tier is full; see ``store.py``).
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
import os
from dataclasses import replace

import torch

from shadowkv.cache.base import AttentionCache, CacheCapacityError, CacheMemory, CacheOptions
from shadowkv.cache.shadow_layout import (
    PAGE_CHUNKS,
    PagePool,
    SeqLayout,
    cdiv,
    check_engages,
    plan_sequence,
    reference_layout,
    split_device_pages,
)
from shadowkv.cache.shadow_drive import driven_scores
from shadowkv.cache.shadow_prefill import exact_token_index, lowrank_factors, summarize_chunks
from shadowkv.cache.shadow_tables import (
    DecodePlan,
    PrefillPlan,
    SequenceTables,
    SparsePlan,
    StepWidths,
)
from shadowkv.cache.store import HOST, ValueStore, auto_host_bytes, device_tier_seqs
from shadowkv.cache.timing import SpanTimer
from shadowkv.config import CacheConfig, ConfigError, ModelConfig
from shadowkv.kernels.decode_attention import decode_attention
from shadowkv.kernels.gather_values import gather_values
from shadowkv.kernels.reconstruct_keys import reconstruct_keys
from shadowkv.kernels.score_landmarks import score_landmarks
from shadowkv.kernels.select_chunks import select_chunks
from shadowkv.models.rope import RotaryEmbedding


class ShadowKVCache(AttentionCache):
    """Low-rank pre-RoPE keys and paged exact buffers on ``device``; values in two tiers."""

    def __init__(
        self,
        model: ModelConfig,
        cfg: CacheConfig,
        rope: RotaryEmbedding,
        device: torch.device,
        dtype: torch.dtype,
        max_num_seqs: int,
        max_model_len: int,
        memory_bytes: int,
    ) -> None:
        super().__init__(model, cfg, rope, device, dtype, max_num_seqs, max_model_len)
        L, Hkv, D, C = model.num_layers, model.num_kv_heads, model.head_dim, cfg.chunk_size
        self.rank = R = cfg.rank_for(model.kv_dim)
        check_engages(cfg, max_model_len)
        self.page_tokens = P = PAGE_CHUNKS * C
        self.block_rows = S = cfg.page_size
        self.max_slots = cfg.budget_tokens(max_model_len) // C
        elem = torch.empty((), dtype=dtype).element_size()
        self.slot_bytes = L * (R * model.kv_dim * elem + Hkv * self.max_slots * 4)
        self.factor_page_bytes = L * (P * R * elem + PAGE_CHUNKS * Hkv * (D * elem + 4))
        self.block_bytes = L * 2 * S * model.kv_dim * elem
        # Per-sequence factors and selection state for every slot plus the padding row of
        # fixed-shape steps, and one scratch buffer block that padding entries write to.
        fixed = (max_num_seqs + 1) * self.slot_bytes + self.block_bytes
        least = 2 * (self.factor_page_bytes + self.block_bytes)
        if memory_bytes < fixed + least:
            raise ConfigError(
                f"a device budget of {memory_bytes / 2**20:.1f} MiB cannot hold ShadowKV state for "
                f"max_num_seqs={max_num_seqs} ({fixed / 2**20:.1f} MiB of per-sequence factors); "
                "raise EngineConfig.cache_memory_gb or lower max_num_seqs"
            )
        ref = reference_layout(cfg, max_model_len)
        self.value_page_bytes = L * PAGE_CHUNKS * C * model.kv_dim * elem
        host_bytes, device_value_bytes = self._value_tier_bytes(ref, memory_bytes - fixed - least)
        if memory_bytes - fixed - device_value_bytes < least:
            raise ConfigError(
                f"device_value_memory_gb={cfg.device_value_memory_gb} leaves less than "
                f"{least / 2**20:.2f} MiB of the {memory_bytes / 2**30:.3f} GiB device budget for "
                "ShadowKV's keys and buffers; lower it or raise EngineConfig.cache_memory_gb"
            )
        num_pages, num_blocks = split_device_pages(
            memory_bytes - fixed - device_value_bytes,
            self.factor_page_bytes,
            self.block_bytes,
            P,
            S,
            ref,
        )
        fix = "raise EngineConfig.cache_memory_gb, lower max_tokens, or wait for running requests"
        self.factor_pool = PagePool("ShadowKV factor pages", num_pages, f"{P} tokens", fix)
        self.block_pool = PagePool("ShadowKV buffer blocks", num_blocks, f"{S} rows", fix)

        def alloc(*shape: int, dt: torch.dtype = dtype) -> list[torch.Tensor]:
            return [torch.empty(shape, dtype=dt, device=device) for _ in range(L)]

        self.a_pages = alloc(num_pages, P, R)
        self.landmarks = alloc(num_pages, PAGE_CHUNKS, Hkv, D)
        self.landmark_ids = alloc(num_pages, PAGE_CHUNKS, Hkv, dt=torch.int32)
        self.k_buf = alloc(num_blocks + 1, S, Hkv, D)  # block num_blocks: padding scratch
        self.v_buf = alloc(num_blocks + 1, S, Hkv, D)
        for pool in (self.a_pages, self.landmarks, self.landmark_ids, self.k_buf, self.v_buf):
            for t in pool:
                t[0].zero_()  # the null page
        self.w_t = alloc(max_num_seqs + 1, R, model.kv_dim)
        # Per layer [max_num_seqs + 1, Hkv, max_slots]: the chunk each buffer slot holds, -1 =
        # empty (the last row is the padding row's).
        self.selection = [
            torch.full((max_num_seqs + 1, Hkv, self.max_slots), -1, dtype=torch.int32, device=device)
            for _ in range(L)
        ]
        self.store = ValueStore(
            L, Hkv, D, C, PAGE_CHUNKS, dtype, host_bytes, device_value_bytes, device
        )

        self.tables = SequenceTables(
            max_num_seqs, max_model_len, C, P, S, device, num_blocks, self.max_slots
        )
        self._hits = torch.zeros(L, dtype=torch.int64, device=device)
        self._used = torch.zeros(L, dtype=torch.int64, device=device)
        # On CUDA the value fetch (PCIe-bound) runs on its own stream, overlapping the key rebuild
        # (compute-bound) as in the paper; SHADOWKV_OVERLAP_FETCH=0 keeps both on one stream.
        overlap = device.type == "cuda" and os.environ.get("SHADOWKV_OVERLAP_FETCH", "1") != "0"
        self._fetch_stream = torch.cuda.Stream(device) if overlap else None
        self.time_svd = False  # benchmarks: time the factorisation inside each prefill
        # Benchmarks with random weights: keep this share of chunks from step to step instead of
        # what the query selects (shadow_drive.py; decode outputs are then meaningless).
        self.drive_hit_rate: float | None = None
        self._svd_timer = SpanTimer(device)

    def _value_tier_bytes(self, ref: SeqLayout, spare: int) -> tuple[int, int]:
        """(host, device) bytes of the value tiers; ``spare`` is the device budget the factor
        and buffer pools need not keep. The auto sizes are documented on ``CacheConfig``."""
        cfg, page = self.cfg, self.value_page_bytes
        if not cfg.offload_values:
            host = 0
        elif cfg.host_memory_gb is not None:
            host = int(cfg.host_memory_gb * 2**30)
        else:
            max_pages = cdiv(cdiv(self.max_model_len, cfg.chunk_size), PAGE_CHUNKS)
            host = auto_host_bytes((self.max_num_seqs * max_pages + 1) * page, self.device)
        if cfg.device_value_memory_gb is not None:
            return host, int(cfg.device_value_memory_gb * 2**30)
        if cfg.offload_values and self.device.type != "cuda":
            return host, 0
        ref_pages = cdiv(ref.num_chunks, PAGE_CHUNKS)
        seq_device = (
            cdiv(ref.prompt_len, self.page_tokens) * self.factor_page_bytes
            + cdiv(ref.buffer_rows, self.block_rows) * self.block_bytes
        )
        host_seqs = max(0, host // page - 1) // ref_pages  # page 0 of a tier is the null page
        extra = device_tier_seqs(spare, seq_device, ref_pages * page, host_seqs, self.max_num_seqs)
        return host, (extra * ref_pages + 1) * page if extra else 0

    # lifecycle -------------------------------------------------------------------------------
    def _layout(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions | None
    ) -> SeqLayout:
        """The rows a sequence gets; ``exact`` runs it dense, a request budget may only lower
        ours (ours sizes the selection state)."""
        new = min(max_new_tokens, self.max_model_len - prompt_len)
        if options is not None and options.exact:
            return SeqLayout(prompt_len, new, self.cfg.chunk_size, dense=True)
        cfg = self.cfg
        if options is not None and options.sparse_budget is not None:
            own = cfg.budget_tokens(prompt_len)
            asked = self.seq_config(options).budget_tokens(prompt_len)
            cfg = replace(cfg, sparse_budget=min(own, asked))
        return plan_sequence(cfg, prompt_len, new)

    def _admission_problem(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions | None
    ) -> str | None:
        if prompt_len > self.max_model_len:
            return (
                f"the prompt has {prompt_len} tokens, more than max_model_len={self.max_model_len}"
            )
        if not self.tables.has_free_row:
            return f"all {self.max_num_seqs} sequence slots are in use"
        lay = self._layout(prompt_len, max_new_tokens, options)
        return (
            self.block_pool.shortfall(cdiv(lay.buffer_rows, self.block_rows))
            or self.factor_pool.shortfall(0 if lay.dense else cdiv(prompt_len, self.page_tokens))
            or self.store.shortfall(lay.num_chunks)
        )

    def fits_empty(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions | None = None
    ) -> bool:
        """Whether the sequence would fit with the pools empty (reads only their fixed sizes)."""
        if prompt_len > self.max_model_len:
            return False
        lay = self._layout(prompt_len, max_new_tokens, options)
        return (
            cdiv(lay.buffer_rows, self.block_rows) <= self.block_pool.capacity
            and (lay.dense or cdiv(prompt_len, self.page_tokens) <= self.factor_pool.capacity)
            and self.store.fits_empty(lay.num_chunks)
        )

    def can_add(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions | None = None
    ) -> bool:
        return self._admission_problem(prompt_len, max_new_tokens, options) is None

    def planning(self) -> contextlib.AbstractContextManager[None]:
        return self.store.planning()

    def add_sequence(
        self, seq_id: int, prompt_len: int, max_new_tokens: int, options: CacheOptions | None = None
    ) -> None:
        why = self._admission_problem(prompt_len, max_new_tokens, options)
        if why is not None:
            raise CacheCapacityError(why)
        lay = self._layout(prompt_len, max_new_tokens, options)
        tier, store_pages, factor_pages = HOST, [], []
        if not lay.dense:
            # First: pinning the host tier may fail, and then nothing else is held.
            tier, store_pages = self.store.reserve(seq_id, lay.num_chunks)
            factor_pages = self.factor_pool.reserve(seq_id, cdiv(prompt_len, self.page_tokens))
        blocks = self.block_pool.reserve(seq_id, cdiv(lay.buffer_rows, self.block_rows))
        row = self.tables.admit(seq_id, lay, factor_pages, store_pages, blocks, tier)
        self.lengths[seq_id] = 0
        self.options[seq_id] = options or CacheOptions()
        idx = torch.tensor(blocks, device=self.device)
        for layer in range(self.model.num_layers):
            # Rows past a sequence's length are read (masked) by attention: keep them finite.
            self.k_buf[layer].index_fill_(0, idx, 0)
            self.v_buf[layer].index_fill_(0, idx, 0)
            self.selection[layer][row] = -1

    def free_sequence(self, seq_id: int) -> None:
        if seq_id not in self.tables.rows:
            return
        for pool in (self.factor_pool, self.block_pool, self.store):
            pool.release(seq_id)
        self.tables.release(seq_id)
        self.lengths.pop(seq_id, None)
        self.options.pop(seq_id, None)

    def begin_prefill(self, seq_id: int, num_tokens: int) -> None:
        lay = self.tables.layouts[seq_id]
        if num_tokens != lay.prompt_len:
            raise ValueError(
                f"sequence {seq_id} was admitted with a {lay.prompt_len}-token prompt but prefills "
                f"{num_tokens}; ShadowKV prefills a whole prompt at once"
            )
        super().begin_prefill(seq_id, num_tokens)
        pages = self.store.pages_of(seq_id, self.tables.value_tier[seq_id])
        self._prefill = self.tables.plan_prefill(seq_id, pages)

    supports_static_decode = True

    def decode_columns(self, seq_ids: list[int]) -> dict[str, list[int]]:
        return self.tables.decode_columns(seq_ids, [self.lengths[s] for s in seq_ids])

    def pad_columns(self) -> dict[str, int]:
        return self.tables.pad_columns()

    def decode_widths(self, seq_ids: list[int], static: bool) -> StepWidths:
        lengths = [self.lengths[s] for s in seq_ids]
        tiers = self.store.live_tiers()
        return self.tables.decode_widths(seq_ids, lengths, static, tiers, self.drive_hit_rate)

    def plan_decode(self, cols: dict[str, torch.Tensor], widths: StepWidths) -> None:
        self._decode = self.tables.plan_decode(cols, widths)

    def end_decode(self) -> None:
        super().end_decode()
        self.tables.primed.update(self._decode_seqs)

    # per layer -------------------------------------------------------------------------------
    def store_prompt(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> None:
        plan: PrefillPlan = self._prefill
        if plan.layout.dense:
            self._write_exact(layer, plan.exact_rows, k, v)
            return
        T, Hkv, D = k.shape
        start = self._svd_timer.mark() if self.time_svd else None
        f = lowrank_factors(k_pre.reshape(T, Hkv * D), self.rank)
        if start is not None:
            self._svd_timer.add(start)
        self.a_pages[layer].view(-1, self.rank)[plan.factor_rows] = f.a.to(self.dtype)
        self.w_t[layer][plan.row] = f.w_t.to(self.dtype)
        s = summarize_chunks(k, self.cfg.chunk_size, self.cfg.local_chunks, self.cfg.outlier_chunks)
        self.landmarks[layer].view(-1, Hkv, D)[plan.landmark_rows] = s.landmarks.to(self.dtype)
        self.landmark_ids[layer].view(-1, Hkv)[plan.landmark_rows] = s.landmark_ids.to(torch.int32)
        idx = exact_token_index(T, self.cfg.chunk_size, s.num_candidates, s.outlier_ids)
        idx = idx[..., None].expand(-1, -1, D)  # [E, Hkv, D]
        self._write_exact(layer, plan.exact_rows, k.gather(0, idx), v.gather(0, idx))
        self.store.write(plan.value_tier, layer, plan.store_pages, v)

    def decode(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> torch.Tensor:
        plan: DecodePlan = self._decode
        self._write_exact(layer, plan.gen_rows, k, v)
        if plan.sparse is not None:
            self._refresh_selection(layer, q, plan.rows, plan.sparse)
        return decode_attention(
            q, self.k_buf[layer], self.v_buf[layer], plan.buf_tables, plan.seq_lens, self.scale
        )

    def _write_exact(
        self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        Hkv, D = self.model.num_kv_heads, self.model.head_dim
        self.k_buf[layer].view(-1, Hkv, D)[rows] = k.to(self.dtype)
        self.v_buf[layer].view(-1, Hkv, D)[rows] = v.to(self.dtype)

    def _refresh_selection(
        self, layer: int, q: torch.Tensor, rows: torch.Tensor, sp: SparsePlan
    ) -> None:
        """Select this step's chunks; rebuild keys and fetch values of the slots that changed."""
        scores = score_landmarks(
            q, self.landmarks[layer], sp.landmark_tables, sp.num_landmarks, self.scale
        )
        K = sp.dst_rows.shape[1] // self.cfg.chunk_size
        state = self.selection[layer]
        if sp.drive_hit_rate is not None:  # benchmarks only: see shadow_drive.py
            prev = state[rows, :, :K]
            scores = driven_scores(self.landmark_ids[layer], sp, prev, sp.drive_hit_rate)
        slot_ids, miss = select_chunks(
            scores, self.landmark_ids[layer], sp.landmark_tables, sp.num_select, state[rows, :, :K]
        )
        state[rows, :, :K] = slot_ids
        used = (slot_ids >= 0) & sp.primed[:, None, None]
        self._hits[layer] += (used & ~miss).sum()
        self._used[layer] += used.sum()
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
            rows,
            slot_ids,
            miss,
            self.rope.cos,
            self.rope.sin,
            sp.dst_rows,
            self.cfg.chunk_size,
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
            )

    # accounting ------------------------------------------------------------------------------
    def svd_seconds(self) -> float:
        """Time spent factorising prompt keys since ``time_svd`` was set (syncs on CUDA), and
        starts a new count."""
        return self._svd_timer.take()

    def hit_rate(self) -> list[float]:
        """Per layer: share of selected chunks already in the buffer from the previous step
        (decode steps after each sequence's first; NaN before any)."""
        hits, used = self._hits.tolist(), self._used.tolist()
        return [h / u if u else math.nan for h, u in zip(hits, used)]

    def reset_hit_rate(self) -> None:
        self._hits.zero_()
        self._used.zero_()

    def memory(self, seq_id: int | None = None) -> CacheMemory:
        ids = [seq_id] if seq_id is not None else list(self.tables.rows)
        total = CacheMemory()
        for s in ids:
            if s not in self.tables.rows:
                continue
            device = (
                self.factor_pool.held(s) * self.factor_page_bytes
                + self.block_pool.held(s) * self.block_bytes
                + self.slot_bytes
            )
            dense = self.dense_bytes(self.lengths.get(s, 0))
            total = total + CacheMemory(device, 0, dense) + self.store.memory(s)
        return total
