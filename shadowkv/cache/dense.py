"""Full attention over a paged KV cache: the baseline every sparse method is measured against."""

from __future__ import annotations

from dataclasses import replace

import torch

from shadowkv.cache.base import (
    Admission,
    AttentionCache,
    CacheOptions,
    CacheOptionsError,
    PrefillChunk,
    SeqRecord,
    SharedPrefix,
    bucket,
)
from shadowkv.cache.layout import KVLayout
from shadowkv.cache.methods import CacheConfig
from shadowkv.cache.pages import PageAllocator
from shadowkv.kernels.decode_attention import decode_attention

BLOCKS = "blocks"  # the allocator of K/V blocks


class DenseCache(AttentionCache):
    """Exact K/V for every token, paged: pool ``[num_blocks, S, Hkv, D]`` per layer.

    A sequence reserves its prompt + the new tokens the engine admits it with (its worst case,
    unless ``EngineConfig.admission_reserve`` admits it optimistically: then it ``grow``s its
    block-table row by blocks before a decode step would pass them).

    A shared prefix (``SharedPrefix``) is the first whole blocks of a prefilled prompt: a
    sequence started from it holds those blocks first in its block-table row and writes only
    its own (its prefill starts after them, its tokens land after its prompt).
    """

    def __init__(
        self,
        cfg: CacheConfig,
        layout: KVLayout,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        memory_bytes: int,
    ) -> None:
        super().__init__(cfg, layout, device, max_num_seqs, max_model_len)
        S = cfg.page_size
        per_block = self.block_bytes()
        num_blocks = max(1, memory_bytes // per_block - 1)  # one block is the padding scratch
        fix = (
            "lower max_new_tokens, wait for running requests, or give the cache more memory "
            "(EngineConfig.cache_memory_gb)"
        )
        self.blocks = PageAllocator(
            "cache blocks", num_blocks, f"{S} tokens", fix, per_block, null_page=False
        )
        self.allocators[BLOCKS] = self.blocks
        self.block_size = S
        self.share_unit = S  # a shared prefix is whole blocks
        # One block past the pool is scratch: padding entries of fixed-shape steps write there.
        L = layout.num_layers
        self.k_cache = [self._pool(num_blocks + 1) for _ in range(L)]
        self.v_cache = [self._pool(num_blocks + 1) for _ in range(L)]
        self.max_blocks = self.blocks_for(self.held_tokens(max_model_len))
        # Per-sequence block tables live on the device so a decode step only indexes them; the
        # last row is the padding entries', pointing at the scratch block.
        self.block_tables = torch.zeros(
            max_num_seqs + 1, self.max_blocks, dtype=torch.int32, device=device
        )
        self.block_tables[self.pad_row] = num_blocks

    def _pool(self, num_blocks: int) -> torch.Tensor:
        """One layer's pool, seen as ``[num_blocks, S, Hkv, D]`` but stored head-major
        ``[Hkv, num_blocks, S, D]``: a head's rows of consecutive blocks are contiguous, so
        attention reads each head's K/V in place instead of striding over the other heads."""
        Hkv, D, S = self.layout.num_kv_heads, self.layout.head_dim, self.cfg.page_size
        t = torch.empty(Hkv, num_blocks, S, D, device=self.device, dtype=self.dtype)
        return t.permute(1, 2, 0, 3)

    def block_bytes(self) -> int:
        """Device bytes of one block over all layers (K and V, plus any per-block metadata)."""
        return 2 * self.num_layers * self.cfg.page_size * self.layout.kv_dim * self.layout.elem_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_options(self, options: CacheOptions) -> None:
        if options.sparse_budget is not None:
            raise CacheOptionsError(
                "sparse_budget applies to sparse cache methods; this engine runs dense attention, "
                "which attends every token (start it with a sparse method, e.g. --cache shadowkv)"
            )

    def plan_admission(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions
    ) -> Admission:
        held = self.held_tokens(prompt_len + max_new_tokens)
        return Admission(((BLOCKS, self.blocks_for(held)),))

    def fits_empty(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions | None = None
    ) -> bool:
        total = min(prompt_len + max_new_tokens, self.max_model_len)
        return self.blocks_for(self.held_tokens(total)) <= self.blocks.capacity

    # prefix sharing: the prefix's whole blocks, read-only -------------------------------------
    supports_shared_prefix = True

    def make_prefix(self, rec: SeqRecord, num_tokens: int) -> SharedPrefix:
        return SharedPrefix(num_tokens, {BLOCKS: rec.pages[BLOCKS][: self.blocks_for(num_tokens)]})

    def plan_shared(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions,
        prefix: SharedPrefix, prefix_tokens: int,
    ) -> tuple[Admission, dict[str, list[int]]]:
        """The prefix's first ``prefix_tokens // S`` blocks, and own blocks for the rest."""
        S = self.block_size
        if prefix_tokens % S or prefix_tokens > prefix.num_tokens or prefix_tokens >= prompt_len:
            raise ValueError(
                f"a sequence of {prompt_len} prompt tokens cannot start from {prefix_tokens} "
                f"tokens of a {prefix.num_tokens}-token prefix: use prefix_start's count"
            )
        adm = self.plan_admission(prompt_len, max_new_tokens, options)
        shared = prefix.pages[BLOCKS][: prefix_tokens // S]
        needs = tuple(
            (name, num - len(shared) if name == BLOCKS else num) for name, num in adm.needs
        )
        return replace(adm, needs=needs), {BLOCKS: shared}

    def shared_blocks(self, rec: SeqRecord) -> int:
        """Leading blocks of ``rec`` that came from a shared prefix (read-only)."""
        return rec.prefix_tokens // self.block_size

    def on_admit(self, rec: SeqRecord) -> None:
        blocks = rec.pages[BLOCKS]
        self.block_tables[rec.row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)

    def on_grow(self, rec: SeqRecord, adm: Admission, added: dict[str, list[int]]) -> None:
        """The new blocks follow the held ones in the sequence's block-table row (a window's
        ring grows the same way, up to its ``window`` slots)."""
        new = added.get(BLOCKS, [])
        if new:
            held = len(rec.pages[BLOCKS])
            self.block_tables[rec.row, held - len(new) : held] = torch.tensor(
                new, dtype=torch.int32
            )

    def _slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Flat pool rows (block * S + offset) of token positions [start, end)."""
        S = self.block_size
        pos = torch.arange(start, end, device=self.device)
        table = self.block_tables[self.seqs[seq_id].row].long()
        return table[pos // S] * S + pos % S

    def plan_chunk(self, chunk: PrefillChunk) -> torch.Tensor:
        """The pool rows the chunk's tokens go to."""
        return self._slots(chunk.seq_id, chunk.start, chunk.end)

    def read_prompt(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        Hkv, D = self.layout.num_kv_heads, self.layout.head_dim
        slots = self._slots(self._chunk.seq_id, start, end)
        k, v = self.k_cache[layer].view(-1, Hkv, D), self.v_cache[layer].view(-1, Hkv, D)
        return k[slots], v[slots]

    supports_static_decode = True

    def decode_columns(self, seq_ids: list[int]) -> dict[str, list[int]]:
        recs = [self.seqs[s] for s in seq_ids]
        return {"rows": [r.row for r in recs], "pos": [r.length for r in recs]}

    def pad_columns(self) -> dict[str, int]:
        return {"rows": self.pad_row, "pos": 0}

    def decode_widths(self, seq_ids: list[int], static: bool) -> int:
        """Block-table columns: the longest sequence's blocks (static: its reserved blocks, as a
        power of two, so the width holds while the batch does)."""
        recs = [self.seqs[s] for s in seq_ids]
        if not static:
            return max(self.blocks_for(self.held_tokens(r.length + 1)) for r in recs)
        return bucket(max(len(r.pages[BLOCKS]) for r in recs), self.max_blocks)

    def plan_decode(self, cols: dict[str, torch.Tensor], widths: int) -> None:
        S = self.block_size
        rows, pos = cols["rows"], cols["pos"]
        self._tables = self.block_tables[rows, :widths]  # [B, widths]
        self._seq_lens = (pos + 1).to(torch.int32)
        # Kept apart from the prefill's slots: a chunked prefill runs between decode steps.
        self._decode_slots = (
            self._tables.gather(1, (pos // S)[:, None]).squeeze(1).long() * S + pos % S
        )

    supports_fork = True

    def fork(self, src_seq: int, dst_seq: int) -> None:
        src, dst = self.seqs[src_seq], self.seqs[dst_seq]
        if dst.prompt_len != src.length:
            raise ValueError(f"fork: sequence {dst_seq} was not admitted for this prompt length")
        n = self.blocks_for(src.length)  # a partial last block is copied whole: rows past the
        # prompt are written before they are read
        # Blocks both hold (a shared prefix both started from) are the same memory: not copied.
        pairs = [(s, d) for s, d in zip(src.pages[BLOCKS][:n], dst.pages[BLOCKS][:n]) if s != d]
        src_blocks = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.device)
        dst_blocks = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.device)
        for layer in range(self.num_layers):
            for pool in (self.k_cache[layer], self.v_cache[layer]):
                pool[dst_blocks] = pool[src_blocks]
        self.fork_metadata(src, dst, src_blocks, dst_blocks)
        dst.length = src.length

    def fork_metadata(
        self, src: SeqRecord, dst: SeqRecord, src_blocks: torch.Tensor, dst_blocks: torch.Tensor
    ) -> None:
        """Copy what a method keeps beside the K/V blocks (per block or per sequence row)."""

    def _write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        Hkv, D = self.layout.num_kv_heads, self.layout.head_dim
        self.k_cache[layer].view(-1, Hkv, D)[slots] = k.to(self.dtype)
        self.v_cache[layer].view(-1, Hkv, D)[slots] = v.to(self.dtype)

    def store_prompt(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> None:
        self._write(layer, self._chunk.detail, k, v)

    def decode(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> torch.Tensor:
        self._write(layer, self._decode_slots, k, v)
        return decode_attention(
            q, self.k_cache[layer], self.v_cache[layer], self._tables, self._seq_lens, self.scale
        )
