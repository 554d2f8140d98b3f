"""Oracle top-k: the exact attention scores choose the rows, an upper bound for any selector.

Per decode step and layer, every prompt key of the selectable prefix is scored exactly,
``softmax(q . k * scale)`` per query head, reduced by the max over each GQA group, and each KV head
keeps its top ``budget`` tokens (see ``sparse_base`` for the budget and local-window accounting).
No real system can afford this (it reads every key each step); it tells how much of a gap to
dense attention is the budget's fault rather than the selector's.
"""

from __future__ import annotations

import torch

from shadowkv.cache.sparse_base import SparseCache


class OracleCache(SparseCache):
    """Token-level exact top-k over the dense pool; no metadata."""

    def select(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, D = q.shape
        Hkv, G = self.layout.num_kv_heads, H // self.layout.num_kv_heads
        k = self.gather_prefix(self.k_cache[layer], self._max_selectable).float()  # [B, N, Hkv, D]
        scores = torch.einsum("bhgd,bnhd->bhgn", q.float().view(B, Hkv, G, D), k) * self.scale
        mask = self.selectable_mask(self._max_selectable)
        grouped = self.group_max_softmax(scores.reshape(B, H, -1), mask)
        return self.top_units(grouped)
