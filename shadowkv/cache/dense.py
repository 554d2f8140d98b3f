"""Full attention over a paged KV cache: the baseline every sparse method is measured against."""

from __future__ import annotations

import torch

from shadowkv.cache.base import (
    AttentionCache,
    CacheCapacityError,
    CacheMemory,
    CacheOptions,
    CacheOptionsError,
    bucket,
)
from shadowkv.config import CacheConfig, ModelConfig
from shadowkv.kernels.decode_attention import decode_attention
from shadowkv.models.rope import RotaryEmbedding


class BlockPool:
    """A free list of fixed-size blocks; sequences reserve their worst case at admission."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.owned: dict[int, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self.free)

    def reserve(self, seq_id: int, num_tokens: int) -> list[int]:
        need = self.blocks_for(num_tokens)
        if need > len(self.free):
            raise CacheCapacityError(
                f"needs {need} cache blocks of {self.block_size} tokens, {len(self.free)} free of "
                f"{self.num_blocks}; lower max_new_tokens, wait for running requests, or give "
                "the cache more memory (EngineConfig.cache_memory_gb)"
            )
        self.owned[seq_id] = [self.free.pop() for _ in range(need)]
        return self.owned[seq_id]

    def release(self, seq_id: int) -> None:
        self.free.extend(reversed(self.owned.pop(seq_id, [])))


class DenseCache(AttentionCache):
    """Exact K/V for every token, paged: pool ``[num_blocks, S, Hkv, D]`` per layer."""

    def __init__(
        self,
        model: ModelConfig,
        cfg: CacheConfig,
        rope: RotaryEmbedding,
        device: torch.device,
        dtype: torch.dtype,
        max_num_seqs: int,
        max_model_len: int,
        num_blocks: int,
    ) -> None:
        super().__init__(model, cfg, rope, device, dtype, max_num_seqs, max_model_len)
        S = cfg.page_size
        self.pool = BlockPool(num_blocks, S)
        # One block past the pool is scratch: padding entries of fixed-shape steps write there.
        self.k_cache = [self._pool(num_blocks + 1, device, dtype) for _ in range(model.num_layers)]
        self.v_cache = [self._pool(num_blocks + 1, device, dtype) for _ in range(model.num_layers)]
        self.max_blocks = self.pool.blocks_for(max_model_len)
        # Per-sequence block tables live on the device so a decode step only indexes them; the
        # last row is the padding entries', pointing at the scratch block.
        self.block_tables = torch.zeros(
            max_num_seqs + 1, self.max_blocks, dtype=torch.int32, device=device
        )
        self.pad_row = max_num_seqs
        self.block_tables[self.pad_row] = num_blocks
        self.rows: dict[int, int] = {}  # seq id -> row in block_tables
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))

    def _pool(self, num_blocks: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """One layer's pool, seen as ``[num_blocks, S, Hkv, D]`` but stored head-major
        ``[Hkv, num_blocks, S, D]``: a head's rows of consecutive blocks are contiguous, so
        attention reads each head's K/V in place instead of striding over the other heads."""
        Hkv, D, S = self.model.num_kv_heads, self.model.head_dim, self.cfg.page_size
        return torch.empty(Hkv, num_blocks, S, D, device=device, dtype=dtype).permute(1, 2, 0, 3)

    @staticmethod
    def bytes_per_block(model: ModelConfig, cfg: CacheConfig, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * model.num_layers * cfg.page_size * model.kv_dim * elem

    def check_options(self, options: CacheOptions) -> None:
        if options.sparse_budget is not None:
            raise CacheOptionsError(
                "sparse_budget applies to sparse cache methods; this engine runs dense attention, "
                "which attends every token (start it with a sparse method, e.g. --cache shadowkv)"
            )

    def can_add(self, prompt_len: int, max_new_tokens: int, options: CacheOptions | None = None) -> bool:
        return bool(self._free_rows) and self.pool.can_reserve(prompt_len + max_new_tokens)

    def fits_empty(self, prompt_len: int, max_new_tokens: int, options: CacheOptions | None = None) -> bool:
        total = min(prompt_len + max_new_tokens, self.max_model_len)
        return self.pool.blocks_for(total) <= self.pool.num_blocks

    def add_sequence(
        self, seq_id: int, prompt_len: int, max_new_tokens: int, options: CacheOptions | None = None
    ) -> None:
        if not self._free_rows:
            raise CacheCapacityError(f"all {self.max_num_seqs} sequence slots are in use")
        total = min(prompt_len + max_new_tokens, self.max_model_len)
        blocks = self.pool.reserve(seq_id, total)
        row = self._free_rows.pop()
        self.rows[seq_id] = row
        self.block_tables[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.lengths[seq_id] = 0
        self.options[seq_id] = options or CacheOptions()

    def free_sequence(self, seq_id: int) -> None:
        if seq_id not in self.rows:
            return
        self.pool.release(seq_id)
        self._free_rows.append(self.rows.pop(seq_id))
        self.lengths.pop(seq_id, None)
        self.options.pop(seq_id, None)

    def _slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Flat pool rows (block * S + offset) of token positions [start, end)."""
        S = self.pool.block_size
        pos = torch.arange(start, end, device=self.device)
        table = self.block_tables[self.rows[seq_id]].long()
        return table[pos // S] * S + pos % S

    def begin_prefill(self, seq_id: int, num_tokens: int) -> None:
        super().begin_prefill(seq_id, num_tokens)
        self._prefill_slots = self._slots(seq_id, 0, num_tokens)

    supports_static_decode = True

    def decode_columns(self, seq_ids: list[int]) -> dict[str, list[int]]:
        return {"rows": [self.rows[s] for s in seq_ids], "pos": [self.lengths[s] for s in seq_ids]}

    def pad_columns(self) -> dict[str, int]:
        return {"rows": self.pad_row, "pos": 0}

    def decode_widths(self, seq_ids: list[int], static: bool) -> int:
        """Block-table columns: the longest sequence's blocks (static: its reserved blocks, as a
        power of two, so the width holds while the batch does)."""
        if not static:
            return max(self.pool.blocks_for(self.lengths[s] + 1) for s in seq_ids)
        return bucket(max(len(self.pool.owned[s]) for s in seq_ids), self.max_blocks)

    def plan_decode(self, cols: dict[str, torch.Tensor], widths: int) -> None:
        S = self.pool.block_size
        rows, pos = cols["rows"], cols["pos"]
        self._tables = self.block_tables[rows, :widths]  # [B, widths]
        self._seq_lens = (pos + 1).to(torch.int32)
        # Kept apart from the prefill's slots: a sliced prefill runs between decode steps.
        self._decode_slots = (
            self._tables.gather(1, (pos // S)[:, None]).squeeze(1).long() * S + pos % S
        )

    def _write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        Hkv, D = self.model.num_kv_heads, self.model.head_dim
        self.k_cache[layer].view(-1, Hkv, D)[slots] = k.to(self.dtype)
        self.v_cache[layer].view(-1, Hkv, D)[slots] = v.to(self.dtype)

    def store_prompt(self, layer, k, v, k_pre):
        self._write(layer, self._prefill_slots, k, v)

    def decode(self, layer, q, k, v, k_pre):
        self._write(layer, self._decode_slots, k, v)
        return decode_attention(
            q, self.k_cache[layer], self.v_cache[layer], self._tables, self._seq_lens, self.scale
        )

    def memory(self, seq_id: int | None = None) -> CacheMemory:
        ids = [seq_id] if seq_id is not None else list(self.rows)
        block_bytes = self.bytes_per_block(self.model, self.cfg, self.dtype)
        used = sum(len(self.pool.owned.get(s, [])) for s in ids) * block_bytes
        dense = sum(self.dense_bytes(self.lengths.get(s, 0)) for s in ids)
        return CacheMemory(device_bytes=used, host_bytes=0, dense_bytes=dense)
