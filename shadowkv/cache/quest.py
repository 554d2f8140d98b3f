"""Quest (Tang et al., 2024): query-aware page selection from per-page key bounds.

Each page of ``cfg.page_size`` prompt tokens keeps, per KV head, the element-wise minimum and
maximum of its post-RoPE keys. For a query ``q`` the page's score

    u(q, page) = sum_d max(q_d * min_d, q_d * max_d)

is an upper bound on ``q . k`` for every key in the page. With GQA a KV head's page score is the
**max** over its group's query heads (the bound for the most interested head). Each KV head keeps
its top ``budget // page_size`` pages of the selectable prefix (see ``sparse_base`` for how the
budget and the local window are counted); all keys and values stay exact on the device.
"""

from __future__ import annotations

import torch

from shadowkv.cache.sparse_base import SparseCache


class QuestCache(SparseCache):
    """Pages are the pool's blocks, so bounds live in per-layer pools ``[num_blocks, Hkv, D]``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unit = self.cfg.page_size
        shape = (self.blocks.num_pages, self.layout.num_kv_heads, self.layout.head_dim)
        layers = range(self.num_layers)
        self.page_min = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in layers]
        self.page_max = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in layers]

    def fork_metadata(self, src, dst, src_blocks, dst_blocks) -> None:  # type: ignore[no-untyped-def]
        for layer in range(self.num_layers):
            self.page_min[layer][dst_blocks] = self.page_min[layer][src_blocks]
            self.page_max[layer][dst_blocks] = self.page_max[layer][src_blocks]

    def metadata_bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.layout.kv_dim * self.layout.elem_size

    def summarise(self, layer: int, k: torch.Tensor) -> None:
        rec = self.seqs[self._chunk.seq_id]
        # Blocks of a shared prefix are read-only: the sequence that shared them wrote their
        # bounds, from the same keys. Only the sequence's own blocks get bounds here.
        first = self.shared_blocks(rec)
        S = self.unit
        k = k[first * S :]
        T, Hkv, D = k.shape
        num_pages = -(-T // S)
        pad = num_pages * S - T
        # Padding rows must not widen the bounds: +inf for the min, -inf for the max.
        lo = torch.cat([k, k.new_full((pad, Hkv, D), float("inf"))]).view(num_pages, S, Hkv, D)
        hi = torch.cat([k, k.new_full((pad, Hkv, D), float("-inf"))]).view(num_pages, S, Hkv, D)
        blocks = self.block_tables[rec.row, first : first + num_pages].long()
        self.page_min[layer][blocks] = lo.amin(dim=1)
        self.page_max[layer][blocks] = hi.amax(dim=1)

    def page_scores(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Upper bounds ``[B, H, N]`` of ``q . k`` over each of the first N pages."""
        num_pages = -(-self._max_selectable // self.unit)
        blocks = self._tables[:, :num_pages].long()
        lo = self.page_min[layer][blocks].float()  # [B, N, Hkv, D]
        hi = self.page_max[layer][blocks].float()
        B, H, D = q.shape
        Hkv = self.layout.num_kv_heads
        qf = q.float().view(B, Hkv, H // Hkv, 1, D)
        lo = lo.permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, N, D]
        hi = hi.permute(0, 2, 1, 3)[:, :, None]
        bound = torch.maximum(qf * lo, qf * hi).sum(-1)  # [B, Hkv, G, N]
        return bound.reshape(B, H, num_pages)

    def select(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bound = self.page_scores(layer, q)
        B, H, N = bound.shape
        Hkv = self.layout.num_kv_heads
        grouped = bound.view(B, Hkv, H // Hkv, N).amax(dim=2)
        mask = self.selectable_mask(N, self.unit)
        return self.top_units(grouped.masked_fill(~mask[:, None, :], float("-inf")))
