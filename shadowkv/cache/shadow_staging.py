"""Staging of a ShadowKV prompt that prefills in chunks (token-chunked prefill).

ShadowKV factorises a whole prompt's pre-RoPE keys with one basis, and picks landmarks and
outliers over the whole prompt, so nothing of a sparse sequence can be stored before its last
chunk. Until then each layer's chunks land here: pre-RoPE keys ``[T, Hkv*D]`` and values
``[T, Hkv, D]`` (model dtype), and the fp32 Gram matrix ``KᵀK [Hkv*D, Hkv*D]`` summed chunk by
chunk (the basis needs only it: ``shadow_prefill.lowrank_factors(..., gram=)``). Later chunks
attend exactly over the earlier ones by rotating their staged keys with the model's RoPE op.

Memory: a pool allocated with the cache, inside its device budget (``shadow_sizing.size_staging``:
``ShadowKVConfig.staging_tokens``), of pages of ``P`` staged tokens and of Gram slots, each handed
out by a ``PageAllocator`` registered in ``cache.allocators``. A prompt that will prefill in
chunks takes its pages and a Gram slot at admission (``add_sequence(..., staged=True)``), so a
prompt that cannot have them waits like any other, and gives them back when its last chunk ends
(or when the sequence is freed). Nothing is allocated when a chunk begins.
"""

from __future__ import annotations

import torch

from shadowkv.cache.layout import KVLayout
from shadowkv.cache.pages import PageAllocator
from shadowkv.cache.shadow_layout import cdiv
from shadowkv.cache.shadow_sizing import StagingSize

STAGING, STAGING_GRAM = "staging", "staging gram"  # allocator names


class PromptStaging:
    """The staging pool of one cache: per layer ``k_pre [pages, P, Hkv*D]``, ``v [pages, P, Hkv,
    D]`` and ``gram [slots, Hkv*D, Hkv*D]``. A staged prompt's token ``t`` is row
    ``pages[t // P] * P + t % P`` of the flattened pages (``rows``)."""

    def __init__(
        self, size: StagingSize, layout: KVLayout, page_tokens: int, device: torch.device,
        fix: str,
    ) -> None:
        self.page_tokens = P = page_tokens
        L, Hkv, D, dtype = layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype
        self.pages = PageAllocator(
            "ShadowKV staging pages", size.num_pages, f"{P} staged tokens", fix, size.page_bytes,
            null_page=False,
        )
        self.grams = PageAllocator(
            "ShadowKV staging Gram slots", size.num_grams, "one staged prompt's Gram", fix,
            size.gram_bytes, null_page=False,
        )
        n, W = size.num_pages, layout.kv_dim
        gram_dtype = torch.promote_types(dtype, torch.float32)
        self.k_pre = [torch.empty(n, P, W, dtype=dtype, device=device) for _ in range(L)]
        self.v = [torch.empty(n, P, Hkv, D, dtype=dtype, device=device) for _ in range(L)]
        self.gram = [
            torch.empty(size.num_grams, W, W, dtype=gram_dtype, device=device) for _ in range(L)
        ]

    def needs(self, prompt_len: int) -> tuple[tuple[str, int], ...]:
        """What staging a prompt of ``prompt_len`` tokens takes, per allocator."""
        return (STAGING, cdiv(prompt_len, self.page_tokens)), (STAGING_GRAM, 1)

    def begin(self, gram: int) -> None:
        """A prompt was given Gram slot ``gram``: its sum starts at zero."""
        for g in self.gram:
            g[gram].zero_()

    def rows(self, pages: list[int], num_tokens: int, device: torch.device) -> torch.Tensor:
        """``[num_tokens]`` pool rows of a staged prompt's tokens ``[0, num_tokens)``."""
        P = self.page_tokens
        pos = torch.arange(num_tokens, device=device)
        return torch.tensor(pages, device=device)[pos // P] * P + pos % P

    def add(
        self, layer: int, rows: torch.Tensor, gram: int, k_pre: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Stage one layer of a chunk: ``k_pre, v [T, Hkv, D]`` to pool ``rows [T]``, its keys
        summed into Gram slot ``gram``."""
        T = k_pre.shape[0]
        kp = k_pre.reshape(T, -1)
        self.k_pre[layer].view(-1, kp.shape[1])[rows] = kp
        self.v[layer].view(-1, *v.shape[1:])[rows] = v
        g = self.gram[layer][gram]
        kf = kp.to(g.dtype)
        g.addmm_(kf.T, kf)  # KᵀK summed over chunks

    def read(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Staged ``(k_pre [n, Hkv*D], v [n, Hkv, D])`` of pool ``rows [n]`` (copies)."""
        k_pre, v = self.k_pre[layer], self.v[layer]
        return k_pre.view(-1, k_pre.shape[-1])[rows], v.view(-1, *v.shape[2:])[rows]
