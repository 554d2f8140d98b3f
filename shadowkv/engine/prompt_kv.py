"""A prompt's prefill, recorded once and replayed into any cache method.

Prefill attention is exact in every method, so the per-layer keys and values a prompt produces
do not depend on the method that will decode it. Recording them once lets an evaluation compare
dense attention, ShadowKV and the baselines on the same prompt for the price of one prefill:
replay hands each layer to ``AttentionCache.store_prompt`` without running the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shadowkv.cache.base import AttentionCache


@dataclass(frozen=True)
class PromptKV:
    """What a prefill leaves behind: per layer ``(k, v, k_pre)`` each ``[T, Hkv, D]`` (``k``
    post-RoPE), and the fp32 logits ``[vocab]`` of the last prompt position."""

    token_ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]
    logits: torch.Tensor

    def replay(self, cache: AttentionCache) -> None:
        """Store every layer into ``cache`` for the sequence it is prefilling."""
        for layer, (k, v, k_pre) in enumerate(self.layers):
            dev = cache.device
            cache.store_prompt(layer, k.to(dev), v.to(dev), k_pre.to(dev))


class RecordingCache:
    """Stands in for a cache during one prompt's prefill (all its chunks) and keeps each layer's
    keys and values.

    Copies go to host memory (a long prompt's full KV would crowd the GPU). Everything else is
    forwarded to the wrapped cache.
    """

    def __init__(self, inner: AttentionCache) -> None:
        self.inner = inner
        # Per layer, the chunks' (k, v, k_pre) in prompt order.
        self.layers: dict[int, list[tuple[torch.Tensor, ...]]] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> torch.Tensor:
        self._record(layer, k, v, k_pre)
        return self.inner.prefill(layer, q, k, v, k_pre)

    def prefill_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._record(layer, k, v, k_pre)
        return self.inner.prefill_kv(layer, k, v, k_pre)

    def _record(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor) -> None:
        chunk = tuple(t.to("cpu", copy=True) for t in (k, v, k_pre))
        self.layers.setdefault(layer, []).append(chunk)

    def result(self, token_ids: list[int], logits: torch.Tensor) -> PromptKV:
        n = len(self.layers)
        if sorted(self.layers) != list(range(n)):
            raise RuntimeError(f"recorded layers {sorted(self.layers)} are not 0..{n - 1}")
        layers = tuple(
            tuple(torch.cat(parts) for parts in zip(*self.layers[i])) for i in range(n)
        )
        if layers[0][0].shape[0] != len(token_ids):
            raise RuntimeError(f"recorded {layers[0][0].shape[0]} of {len(token_ids)} tokens")
        return PromptKV(tuple(token_ids), layers, logits.detach().to("cpu"))  # type: ignore[arg-type]
