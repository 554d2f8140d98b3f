"""Attention-cache methods. ``make_cache`` builds the caches a model's layers need."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace

import torch

from shadowkv.cache.base import AttentionCache, CacheCapacityError, CacheMemory, CacheOptions
from shadowkv.cache.dense import DenseCache
from shadowkv.cache.layered import LayeredCache
from shadowkv.cache.layout import AttentionSpec, KVLayout
from shadowkv.cache.methods import CacheConfig, get_method
from shadowkv.kernels.rope.tables import RopeTables

__all__ = [
    "AttentionCache",
    "CacheCapacityError",
    "CacheMemory",
    "CacheOptions",
    "DenseCache",
    "LayeredCache",
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

    Layers with equal specs share one cache; a model with several kinds of layers gets a
    ``LayeredCache`` with the device budget split by each group's share of the KV bytes. No
    cache attends within a sliding window yet: windowed layers attend their full context (with
    a warning, since their outputs then differ past the window from the checkpoint's training).
    """
    windows = sorted({s.sliding_window for s in specs if s.sliding_window})
    if windows:
        warnings.warn(
            f"the model declares a sliding window of {', '.join(map(str, windows))} tokens; "
            "shadowkv attends to the full context, so outputs past the window differ from "
            "windowed attention",
            stacklevel=2,
        )
        specs = [replace(s, sliding_window=None) for s in specs]
    groups: dict[AttentionSpec, list[int]] = {}
    for layer, spec in enumerate(specs):
        groups.setdefault(spec, []).append(layer)

    def build(spec: AttentionSpec, layers: list[int], budget: int) -> AttentionCache:
        layout = KVLayout(spec, len(layers), dtype)
        return build_cache(cfg, layout, rope, device, max_num_seqs, max_model_len, budget)

    if len(groups) == 1:
        ((spec, layers),) = groups.items()
        return build(spec, layers, memory_bytes)
    weight = {spec: spec.kv_dim * len(layers) for spec, layers in groups.items()}
    total = sum(weight.values())
    return LayeredCache(
        [
            (build(spec, layers, memory_bytes * weight[spec] // total), layers)
            for spec, layers in groups.items()
        ]
    )
