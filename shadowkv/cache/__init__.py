"""Attention-cache methods. ``make_cache`` builds the one a ``CacheConfig`` names."""

from __future__ import annotations

import importlib

import torch

from shadowkv.cache.base import AttentionCache, CacheCapacityError, CacheMemory
from shadowkv.cache.dense import DenseCache
from shadowkv.config import CacheConfig, ModelConfig
from shadowkv.models.rope import RotaryEmbedding

__all__ = ["AttentionCache", "CacheCapacityError", "CacheMemory", "DenseCache", "make_cache"]


def make_cache(
    model: ModelConfig,
    cfg: CacheConfig,
    rope: RotaryEmbedding,
    device: torch.device,
    dtype: torch.dtype,
    max_num_seqs: int,
    max_model_len: int,
    memory_bytes: int,
) -> AttentionCache:
    """The cache for ``cfg.method`` sized to ``memory_bytes`` of device memory."""
    args = (model, cfg, rope, device, dtype, max_num_seqs, max_model_len)
    if cfg.method == "dense":
        per_block = DenseCache.bytes_per_block(model, cfg, dtype)
        num_blocks = max(1, memory_bytes // per_block - 1)  # one block is the padding scratch
        return DenseCache(*args, num_blocks=num_blocks)
    module, cls = _SPARSE_METHODS[cfg.method]
    impl = getattr(importlib.import_module(f"shadowkv.cache.{module}"), cls)
    return impl(*args, memory_bytes=memory_bytes)


# method -> (module under shadowkv.cache, class); imported lazily so each method stays optional.
_SPARSE_METHODS = {
    "shadowkv": ("shadow", "ShadowKVCache"),
    "quest": ("quest", "QuestCache"),
    "loki": ("loki", "LokiCache"),
    "streaming": ("streaming", "StreamingCache"),
    "oracle": ("oracle", "OracleCache"),
}
