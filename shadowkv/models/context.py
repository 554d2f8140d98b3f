"""The per-step forward context: what every layer of one forward pass reads besides its input."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from shadowkv.cache.base import AttentionCache

# "mixed": decode rows (one per running sequence) in front of a step's packed prefill chunks;
# the context's cache splits each layer's attention between them (``engine/ragged.py``).
Phase = Literal["prefill", "decode", "mixed"]


@dataclass(frozen=True)
class ForwardContext:
    """Built once per forward by ``LlamaModel.context`` (a decode step, a step's prefill chunks
    packed into one ragged forward — ``positions`` are each chunk's own, concatenated — or a
    mixed step: the decode rows' positions, then the chunks').
    ``cos, sin [T, Dr/2]``: RoPE rows at ``positions [T]``, gathered once for all layers.
    ``cache`` serves every layer (``cache.decode`` in a decode step, else ``cache.prefill``).
    ``mlp_chunk``: tokens per MLP slice in long prefills; ``progress(layer, num_layers)`` is
    called after each layer. ``other_rows``: rows of the other RoPE tables
    (``RopeTables.others``) by key, for layers that rotate differently."""

    phase: Phase
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cache: AttentionCache
    mlp_chunk: int = 4096
    progress: Callable[[int, int], None] | None = None
    other_rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def rotary(self, key: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin) [T, Dr/2]`` of the tables a layer's ``rope_key`` names."""
        return (self.cos, self.sin) if not key else self.other_rows[key]
