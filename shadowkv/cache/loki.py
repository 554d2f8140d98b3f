"""Loki (Singhania et al., 2024): score tokens in a low-dimensional principal subspace of the keys.

At prefill, per layer and KV head, the top ``r = ceil(cfg.loki_rank * D)`` eigenvectors ``W [D, r]``
of the prompt's post-RoPE key second-moment matrix ``K^T K`` are computed (uncentred PCA, so the
keys' mean direction is kept), and every prompt key is stored projected, ``K W [T, r]``. At decode
the approximate scores ``(q W) . (k W)`` go through the same softmax -> max over the GQA group as
ShadowKV's landmark scores (the maintainers' Loki sketch), and each KV head keeps its top
``budget`` tokens of the selectable prefix (see ``sparse_base``). Attention itself uses the exact
keys and values, which stay on the device.
"""

from __future__ import annotations

import math

import torch

from shadowkv.cache.methods import LokiConfig
from shadowkv.cache.sparse_base import SparseCache


def loki_rank(head_dim: int, cfg: LokiConfig) -> int:
    """Dimensions kept per head for scoring."""
    return max(1, math.ceil(cfg.loki_rank * head_dim))


def principal_basis(k: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` eigenvectors of each ``K_h^T K_h``: ``[T, Hkv, D]`` -> ``[Hkv, D, r]``."""
    kf = k.float().transpose(0, 1)  # [Hkv, T, D]
    gram = kf.transpose(1, 2) @ kf  # [Hkv, D, D]
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vecs[..., -rank:].flip(-1).contiguous()


class LokiCache(SparseCache):
    """Projected prompt keys in per-layer pools ``[num_blocks, S, Hkv, r]``; bases per sequence.

    No prefix sharing: a block's projected keys are in its sequence's basis (the whole prompt's
    PCA), which a sequence with another suffix does not share; the engine keeps host copies of
    prefixes for it instead.
    """

    supports_shared_prefix = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rank = loki_rank(self.layout.head_dim, self.cfg)
        Hkv, D = self.layout.num_kv_heads, self.layout.head_dim
        shape = (self.blocks.num_pages, self.block_size, Hkv, self.rank)
        layers = range(self.num_layers)
        self.k_low = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in layers]
        basis = (self.max_num_seqs, Hkv, D, self.rank)
        self.basis = [torch.zeros(basis, device=self.device) for _ in layers]

    def fork_metadata(self, src, dst, src_blocks, dst_blocks) -> None:  # type: ignore[no-untyped-def]
        for layer in range(self.num_layers):
            self.k_low[layer][dst_blocks] = self.k_low[layer][src_blocks]
            self.basis[layer][dst.row] = self.basis[layer][src.row]

    def metadata_bytes_per_block(self) -> int:
        per_token = self.layout.num_kv_heads * loki_rank(self.layout.head_dim, self.cfg)
        return self.num_layers * self.cfg.page_size * per_token * self.layout.elem_size

    def summarise(self, layer: int, k: torch.Tensor) -> None:
        row = self.seqs[self._chunk.seq_id].row
        basis = principal_basis(k, self.rank)  # [Hkv, D, r]
        self.basis[layer][row] = basis
        low = torch.einsum("thd,hdr->thr", k.float(), basis)
        Hkv = self.layout.num_kv_heads
        slots = self._slots(self._chunk.seq_id, 0, k.shape[0])
        self.k_low[layer].view(-1, Hkv, self.rank)[slots] = low.to(self.dtype)

    def select(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, D = q.shape
        Hkv, G = self.layout.num_kv_heads, H // self.layout.num_kv_heads
        basis = self.basis[layer][self._seq_rows]  # [B, Hkv, D, r]
        q_low = torch.einsum("bhgd,bhdr->bhgr", q.float().view(B, Hkv, G, D), basis)
        k_low = self.gather_prefix(self.k_low[layer], self._max_selectable).float()  # [B,N,Hkv,r]
        scores = torch.einsum("bhgr,bnhr->bhgn", q_low, k_low) * self.scale
        mask = self.selectable_mask(self._max_selectable)
        grouped = self.group_max_softmax(scores.reshape(B, H, -1), mask)
        return self.top_units(grouped)
