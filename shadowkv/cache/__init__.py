"""Attention-cache methods. ``make_cache`` builds the caches a model's layers need."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from shadowkv.cache.base import AttentionCache, CacheCapacityError, CacheMemory, CacheOptions
from shadowkv.cache.dense import DenseCache
from shadowkv.cache.layered import LayeredCache
from shadowkv.cache.layout import AttentionSpec, KVLayout
from shadowkv.cache.methods import CacheConfig, DenseConfig, get_method
from shadowkv.cache.window import WindowCache
from shadowkv.kernels.rope.tables import RopeTables

__all__ = [
    "AttentionCache",
    "CacheCapacityError",
    "CacheMemory",
    "CacheOptions",
    "DenseCache",
    "LayeredCache",
    "WindowCache",
    "build_cache",
    "make_cache",
]


def build_cache(
    cfg: CacheConfig,
    layout: KVLayout,
    rope: RopeTables | None,
    device: torch.device,
    max_num_seqs: int,
    max_model_len: int,
    memory_bytes: int,
) -> AttentionCache:
    """One cache of ``cfg.method`` for the layers of ``layout``, in ``memory_bytes`` of device
    memory. Methods that rebuild rotated keys (ShadowKV) take the RoPE tables."""
    cls = get_method(cfg.method).cache_class()
    args = (cfg, layout, device, max_num_seqs, max_model_len, memory_bytes)
    if getattr(cls, "needs_rope", False):
        return cls(*args, rope=rope)
    return cls(*args)


def make_cache(
    specs: Sequence[AttentionSpec],
    cfg: CacheConfig,
    rope: RopeTables | None,
    device: torch.device,
    dtype: torch.dtype,
    max_num_seqs: int,
    max_model_len: int,
    memory_bytes: int,
) -> AttentionCache | LayeredCache:
    """The cache serving a model whose layer ``i`` attends as ``specs[i]``.

    Layers with equal specs share one cache. Sliding-window layers get a ``WindowCache`` (exact
    attention over the window, in a per-sequence ring) whatever ``cfg`` asks for; the method
    serves the global layers, with the RoPE tables their ``rope_key`` names. A window as long as
    the context is no window. A model with several kinds of layers gets a ``LayeredCache``, the
    device budget split so that every group holds the same number of full-context sequences at
    dense cost: a group's weight is its KV bytes per token times the tokens it keeps of one
    (``max_model_len``, or the window). With ShadowKV the global groups then hold more such
    sequences than the window groups; the window groups decide the batch.
    """
    specs = [
        replace(s, sliding_window=None)
        if s.sliding_window is not None and s.sliding_window >= max_model_len
        else s
        for s in specs
    ]
    groups: dict[AttentionSpec, list[int]] = {}
    for layer, spec in enumerate(specs):
        groups.setdefault(spec, []).append(layer)

    def build(spec: AttentionSpec, layers: list[int], budget: int) -> AttentionCache:
        layout = KVLayout(spec, len(layers), dtype)
        if spec.sliding_window is not None:
            window_cfg = DenseConfig(page_size=cfg.page_size)
            return WindowCache(window_cfg, layout, device, max_num_seqs, max_model_len, budget)
        tables = rope.table(spec.rope_key) if rope is not None else None
        return build_cache(cfg, layout, tables, device, max_num_seqs, max_model_len, budget)

    if len(groups) == 1:
        ((spec, layers),) = groups.items()
        return build(spec, layers, memory_bytes)

    def kept(spec: AttentionSpec) -> int:
        return min(spec.sliding_window or max_model_len, max_model_len)

    weight = {spec: spec.kv_dim * len(layers) * kept(spec) for spec, layers in groups.items()}
    total = sum(weight.values())
    return LayeredCache(
        [
            (build(spec, layers, memory_bytes * weight[spec] // total), layers)
            for spec, layers in groups.items()
        ]
    )
