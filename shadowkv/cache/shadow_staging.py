"""Staging of a ShadowKV prompt that prefills in chunks (token-chunked prefill).

ShadowKV factorises a whole prompt's pre-RoPE keys with one basis, and picks landmarks and
outliers over the whole prompt, so nothing of a sparse sequence can be stored before its last
chunk. Until then each layer's chunks land here: pre-RoPE keys ``[T, Hkv*D]`` and values
``[T, Hkv, D]`` (model dtype), and the fp32 Gram matrix ``KᵀK [Hkv*D, Hkv*D]`` summed chunk by
chunk (the basis needs only it: ``shadow_prefill.lowrank_factors(..., gram=)``). Later chunks
attend exactly over the earlier ones by rotating their staged keys with the model's RoPE op.

Memory: a staged prompt holds its dense K/V (``layout.dense_bytes(T)``) plus one Gram per layer,
on the compute device, allocated at its first chunk and freed after its last (or when the
sequence is freed). It is transient and outside the page pools sized from
``EngineConfig.cache_memory_gb``; ``AttentionCache.memory`` counts it for the sequence, and at most
``MAX_STAGED`` prompts stage at once. The engine chunks one prompt at a time and runs a step's
chunks in one forward, so a step stages at most the partial prompt that ends in it, the one that
starts, and one prompt that starts from a stored prefix (replayed as its first chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shadowkv.cache.errors import CacheCapacityError

MAX_STAGED = 3  # prompts staged at once (see above)


@dataclass
class StagedPrompt:
    """One prompt's chunks so far, per layer: ``k_pre [T, Hkv*D]``, ``v [T, Hkv, D]`` (rows past
    the prefilled tokens unset) and ``gram [Hkv*D, Hkv*D]`` (fp32, fp64 for fp64 keys)."""

    k_pre: list[torch.Tensor]
    v: list[torch.Tensor]
    gram: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k_pre, *self.v, *self.gram))

    def add(self, layer: int, start: int, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        """Stage one layer of the chunk of tokens ``[start, start + T)``: ``k_pre, v``
        ``[T, Hkv, D]``."""
        T = k_pre.shape[0]
        kp = k_pre.reshape(T, -1)
        self.k_pre[layer][start : start + T] = kp
        self.v[layer][start : start + T] = v
        g = self.gram[layer]
        kf = kp.to(g.dtype)
        g.addmm_(kf.T, kf)  # KᵀK summed over chunks


class PromptStaging:
    """The staged prompts of one cache, by sequence id."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.device = device
        self.staged: dict[int, StagedPrompt] = {}

    def begin(
        self, seq_id: int, prompt_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> StagedPrompt:
        if len(self.staged) >= MAX_STAGED:
            raise CacheCapacityError(
                f"{MAX_STAGED} ShadowKV prompts are already prefilling in chunks"
            )
        width, L, dev = num_kv_heads * head_dim, self.num_layers, self.device
        gram_dtype = torch.promote_types(dtype, torch.float32)
        staged = StagedPrompt(
            [torch.empty(prompt_len, width, dtype=dtype, device=dev) for _ in range(L)],
            [torch.empty(prompt_len, num_kv_heads, head_dim, dtype=dtype, device=dev)
             for _ in range(L)],
            [torch.zeros(width, width, dtype=gram_dtype, device=dev) for _ in range(L)],
        )
        self.staged[seq_id] = staged
        return staged

    def get(self, seq_id: int) -> StagedPrompt:
        return self.staged[seq_id]

    def drop(self, seq_id: int) -> None:
        self.staged.pop(seq_id, None)

    def nbytes(self, seq_id: int) -> int:
        staged = self.staged.get(seq_id)
        return staged.nbytes if staged is not None else 0
