"""RoPE tables: cos/sin per position and frequency, the form every RoPE consumer reads.

Built by the model (``models/rope.py``: the frequencies its checkpoint asks for) and read by the
model's q/k rotation (``kernels.rope.apply_rope``, rows gathered once per step) and by ShadowKV's
key rebuild (``kernels.reconstruct_keys``, at each rebuilt token's original position).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class RopeTables:
    """``cos, sin [max_position, Dr/2]`` (fp32, one column per frequency, any attention factor
    folded in) and how dims pair up (``style``: neox or interleaved). ``Dr`` = rotary dims.

    ``others``: the tables of layers that rotate differently (Gemma-3's sliding layers use
    another base), by the key their ``AttentionSpec.rope_key`` names; ``table(key)`` picks one.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    style: str = "neox"
    others: Mapping[str, RopeTables] = field(default_factory=dict)

    @property
    def rotary_dims(self) -> int:
        return 2 * self.cos.shape[1]

    @property
    def max_position(self) -> int:
        return self.cos.shape[0]

    def table(self, key: str = "") -> RopeTables:
        """The tables of layers whose ``rope_key`` is ``key`` (``""``: these)."""
        return self if not key else self.others[key]

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` rows ``[T, Dr/2]`` at ``positions [T]``."""
        return self.cos[positions], self.sin[positions]
