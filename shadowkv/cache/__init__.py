"""Attention-cache methods. ``make_cache`` builds the caches a model's layers need."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from shadowkv.cache.base import AttentionCache, CacheCapacityError, CacheMemory, CacheOptions
from shadowkv.cache.dense import DenseCache
from shadowkv.cache.layered import LayeredCache
from shadowkv.cache.layout import AttentionSpec, KVLayout
from shadowkv.cache.methods import CacheConfig, DenseConfig, ShadowKVConfig, get_method
from shadowkv.cache.shadow_layout import PAGE_CHUNKS, cdiv
from shadowkv.cache.shadow_sizing import reference_layout, size_shadowkv
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
    device budget split so that every group holds the same number of full-context sequences:
    each group gets its fixed bytes and what that many sequences cost it (``group_cost``).
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

    costs = {
        spec: group_cost(cfg, KVLayout(spec, len(layers), dtype), device, max_num_seqs,
                         max_model_len, memory_bytes)
        for spec, layers in groups.items()
    }
    budgets = split_budget(memory_bytes, costs)
    return LayeredCache(
        [
            (build(spec, layers, budgets[spec]), layers)
            for spec, layers in groups.items()
        ]
    )


def group_cost(
    cfg: CacheConfig,
    layout: KVLayout,
    device: torch.device,
    max_num_seqs: int,
    max_model_len: int,
    memory_bytes: int,
) -> tuple[int, int]:
    """``(fixed, per_sequence)`` device bytes of the layers of ``layout`` under ``cfg``: what
    the cache takes whatever it holds, and what one full-context sequence adds (how
    ``make_cache`` splits the budget). Paged K/V (dense, the sparse baselines, a window): one
    scratch block, and the blocks of ``max_model_len`` tokens (a window: of the window).
    ShadowKV: its slot state for every sequence slot, a scratch block, the null pages and the
    chunked-prefill staging pool, and per sequence the factor pages (with landmarks) and buffer
    blocks of the sequence its pools are sized for (``shadow_sizing.reference_layout``), plus
    its values when they stay on the device."""
    spec, page = layout.spec, cfg.page_size
    block = 2 * layout.num_layers * page * layout.kv_dim * layout.elem_size
    if spec.sliding_window is not None:
        return block, cdiv(min(spec.sliding_window, max_model_len), page) * block
    if not isinstance(cfg, ShadowKVConfig):
        return block, cdiv(max_model_len, page) * block
    sz = size_shadowkv(cfg, layout, device, max_num_seqs, max_model_len, memory_bytes)
    ref = reference_layout(cfg, max_model_len)
    fixed = (
        (max_num_seqs + 1) * sz.slot_bytes + 2 * sz.block_bytes + sz.factor_page_bytes
        + sz.staging.nbytes
    )
    per_seq = (
        cdiv(ref.prompt_len, sz.page_tokens) * sz.factor_page_bytes
        + cdiv(ref.buffer_rows, sz.block_rows) * sz.block_bytes
    )
    if not cfg.offload_values:
        per_seq += cdiv(ref.num_chunks, PAGE_CHUNKS) * sz.values.page_bytes
    return fixed, per_seq


def split_budget(memory_bytes: int, costs: dict[AttentionSpec, tuple[int, int]]) -> dict:
    """Per group ``fixed + n * per_sequence`` bytes, with the one ``n`` that spends the budget
    (by per-sequence cost alone when the fixed costs do not fit: the caches then say why)."""
    fixed = sum(f for f, _ in costs.values())
    per_seq = sum(p for _, p in costs.values())
    if fixed >= memory_bytes:
        return {spec: memory_bytes * p // per_seq for spec, (_, p) in costs.items()}
    left = memory_bytes - fixed
    return {spec: f + left * p // per_seq for spec, (f, p) in costs.items()}
