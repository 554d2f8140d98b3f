"""StreamingLLM (Xiao et al., 2024): attention sinks plus the most recent tokens, query-blind.

Of each sequence's budget, the first ``min(cfg.sink_tokens, budget)`` tokens go to the sinks
(the prompt's first tokens) and the rest to the tokens just before the local window, so with the
local window and the generated tokens the attended rows are one recent window plus the sinks. The
choice is the same for every KV head and layer (see ``sparse_base`` for budget accounting).
"""

from __future__ import annotations

import torch

from shadowkv.cache.sparse_base import SparseCache


class StreamingCache(SparseCache):
    """Sinks + recent window; no metadata and no scoring."""

    def begin_decode(self, seq_ids: list[int]) -> None:
        super().begin_decode(seq_ids)
        budget = self._units  # [B] tokens (unit = 1)
        sinks = budget.clamp(max=self.cfg.sink_tokens)
        k = self._max_units  # the host knows it: no sync
        idx = torch.arange(k, device=self.device)[None, :]  # [1, K]
        # The first `sinks` slots hold positions 0.., the rest the recent tail ending at the window.
        recent_start = self._selectable[:, None] - (budget - sinks)[:, None]
        pos = torch.where(idx < sinks[:, None], idx, recent_start + idx - sinks[:, None])
        valid = idx < budget[:, None]
        Hkv = self.layout.num_kv_heads
        self._stream_pos = pos[:, None, :].expand(-1, Hkv, -1)
        self._stream_valid = valid[:, None, :].expand(-1, Hkv, -1)

    def select(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._stream_pos, self._stream_valid
