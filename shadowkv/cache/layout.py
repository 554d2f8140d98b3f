"""The model/cache contract: what a cache is told about the attention it serves.

The model describes each layer's attention with an ``AttentionSpec`` (scalars only); the engine
groups layers with equal specs and gives each group's cache a ``KVLayout``. A cache never sees a
model config and imports nothing from ``shadowkv.models``: head counts, head dim, softmax scale,
rotary dims and style and the storage dtype are all it needs (ShadowKV also gets the RoPE tables,
``kernels.rope.RopeTables``, to rebuild keys at their original positions).

Shapes: ``H`` query heads, ``Hkv`` KV heads, ``D`` head dim, ``Dr`` rotary dims (``<= D``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def elem_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (every byte count in the caches goes through this)."""
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention as the model computes it (this rank's heads).

    ``scale`` multiplies ``q . k`` before the softmax. ``rotary_dims`` of the head dim are rotated
    by RoPE in ``rope_style`` (``neox`` pairs ``i, i + Dr/2``; ``interleaved`` pairs ``2i, 2i+1``);
    0 means no rotary embedding. ``sliding_window``: tokens a query may see, itself included
    (None: global). ``rope_key`` names the model's RoPE tables this layer rotates with
    (``RopeTables.table``; ``""``: the main ones).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    rotary_dims: int
    rope_style: str = "neox"
    sliding_window: int | None = None
    rope_key: str = ""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rotary_dims % 2 or not 0 <= self.rotary_dims <= self.head_dim:
            raise ValueError(
                f"rotary_dims={self.rotary_dims} must be even and in [0, head_dim={self.head_dim}]"
            )

    @staticmethod
    def default_scale(head_dim: int) -> float:
        return 1.0 / math.sqrt(head_dim)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G)."""
        return self.num_heads // self.num_kv_heads

    @property
    def kv_dim(self) -> int:
        """Columns of one token's keys over all KV heads (``Hkv * D``)."""
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class KVLayout:
    """What one cache stores: ``num_layers`` layers that share ``spec``, in ``dtype``.

    The cache's layer indices are its own (``0 .. num_layers-1``); a model whose layers differ
    (sliding-window and global layers) gets one cache per group (``cache.layered``).
    """

    spec: AttentionSpec
    num_layers: int
    dtype: torch.dtype

    @property
    def num_kv_heads(self) -> int:
        return self.spec.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.spec.head_dim

    @property
    def kv_dim(self) -> int:
        return self.spec.kv_dim

    @property
    def elem_size(self) -> int:
        return elem_size(self.dtype)

    def dense_bytes(self, num_tokens: int) -> int:
        """What a full K and V cache of ``num_tokens`` takes over this layout's layers."""
        return 2 * self.num_layers * num_tokens * self.kv_dim * self.elem_size
