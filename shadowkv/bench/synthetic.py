"""Synthetic prompt K/V: fill a cache at long context without running the model's prefill.

Decode throughput at 122K tokens needs many sequences' worth of cache, and prefilling each with
the model takes minutes of GPU time per method. A decode step's cost does not depend on what the
cached keys and values are, only on how many there are (and, for ShadowKV, on how many selected
chunks miss the buffer), so the benchmark can instead store generated K/V through the same
``store_prompt`` path a real prefill uses: SVD, landmarks, outliers, value offload all run.

The keys are built like real pre-RoPE keys in one respect that matters to ShadowKV: they have a
low effective rank (a random rank-64 signal plus small noise), so the rank-160 factors fit them.
They are not a model's keys: hit rates measured over them are not a real model's, and reports
label such runs ``prefill: synthetic``. Prefill time and TTFT come from runs that prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shadowkv.cache.base import AttentionCache
from shadowkv.kernels.rope import apply_rope
from shadowkv.kernels.rope.tables import RopeTables

if TYPE_CHECKING:
    from shadowkv.engine.engine import Engine

SIGNAL_RANK = 64
NOISE = 0.05


@dataclass(frozen=True)
class SyntheticPromptKV:
    """Stands in for ``engine.prompt_kv.PromptKV``: ``replay`` stores generated K/V per layer."""

    token_ids: tuple[int, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope: RopeTables  # the engine's: keys are rotated as a prefill's would be
    seed: int
    logits: torch.Tensor  # [vocab] fp32: the first generated token is sampled from these

    def replay(self, cache: AttentionCache) -> None:
        T, dev = len(self.token_ids), cache.device
        Hkv, D = self.num_kv_heads, self.head_dim
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        cos, sin = self.rope.rows(torch.arange(T, device=dev))
        for layer in range(self.num_layers):
            basis = torch.randn(SIGNAL_RANK, Hkv * D, generator=gen, device=dev)
            coeff = torch.randn(T, SIGNAL_RANK, generator=gen, device=dev) / math.sqrt(SIGNAL_RANK)
            k_pre = coeff @ basis + NOISE * torch.randn(T, Hkv * D, generator=gen, device=dev)
            k_pre = k_pre.view(T, Hkv, D)
            k = apply_rope(k_pre[:, :1], k_pre, cos, sin, self.rope.style)[1]
            v = torch.randn(T, Hkv, D, generator=gen, device=dev)
            cache.store_prompt(layer, k.to(cache.dtype), v.to(cache.dtype), k_pre.to(cache.dtype))
            del basis, coeff, k_pre, k, v  # [T, Hkv * D] fp32 each: free before the next layer


def synthetic_prompt(
    token_ids: list[int], engine: Engine, seed: int
) -> SyntheticPromptKV:
    """Generated K/V for a prompt of these tokens, shaped for ``engine``'s model; the first token
    is sampled from zero logits."""
    cfg = engine.model_cfg
    return SyntheticPromptKV(
        tuple(token_ids), cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, engine.rope, seed,
        torch.zeros(cfg.vocab_size),
    )
