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
from dataclasses import replace

import torch

from shadowkv.cache.base import Admission, CacheOptions, SeqRecord
from shadowkv.cache.methods import LokiConfig
from shadowkv.cache.pages import PageAllocator
from shadowkv.cache.sparse_base import SparseCache

LOW = "low"  # the allocator of projected-key pages


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
    """Projected prompt keys in per-layer pools ``[num_pages, S, Hkv, r]``; bases per sequence.

    The projected keys live in pages of their own (allocator ``LOW``, a table row per sequence),
    not beside the K/V blocks: they are in the sequence's basis (the whole prompt's PCA), which
    a sequence with another suffix does not share. So a sequence started from a shared prefix
    holds the prefix's K/V blocks but projects its whole prompt into its own pages. The pool is
    sized as before (a block and a projected page per ``block_bytes``), and a sequence takes
    projected pages for its prompt alone.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rank = loki_rank(self.layout.head_dim, self.cfg)
        Hkv, D = self.layout.num_kv_heads, self.layout.head_dim
        n, S = self.blocks.num_pages, self.block_size
        self.blocks.page_bytes -= self.metadata_bytes_per_block()  # the K/V alone
        self.low_pages = PageAllocator(
            "Loki projected-key pages", n, f"{S} tokens", self.blocks.fix,
            self.metadata_bytes_per_block(), null_page=False,
        )
        self.allocators[LOW] = self.low_pages
        layers = range(self.num_layers)
        shape = (n, S, Hkv, self.rank)
        self.k_low = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in layers]
        # A sequence's projected pages, in prompt order (the padding row is never read).
        self.low_tables = torch.zeros(
            self.max_num_seqs + 1, self.blocks_for(self.max_model_len), dtype=torch.int32,
            device=self.device,
        )
        basis = (self.max_num_seqs, Hkv, D, self.rank)
        self.basis = [torch.zeros(basis, device=self.device) for _ in layers]

    def plan_admission(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions
    ) -> Admission:
        adm = super().plan_admission(prompt_len, max_new_tokens, options)
        return replace(adm, needs=adm.needs + ((LOW, self.blocks_for(prompt_len)),))

    def on_admit(self, rec: SeqRecord) -> None:
        super().on_admit(rec)
        pages = rec.pages[LOW]
        self.low_tables[rec.row, : len(pages)] = torch.tensor(pages, dtype=torch.int32)

    def fork_metadata(self, src, dst, src_blocks, dst_blocks) -> None:  # type: ignore[no-untyped-def]
        src_low = torch.tensor(src.pages[LOW], dtype=torch.long, device=self.device)
        dst_low = torch.tensor(dst.pages[LOW], dtype=torch.long, device=self.device)
        for layer in range(self.num_layers):
            self.k_low[layer][dst_low] = self.k_low[layer][src_low]
            self.basis[layer][dst.row] = self.basis[layer][src.row]

    def metadata_bytes_per_block(self) -> int:
        per_token = self.layout.num_kv_heads * loki_rank(self.layout.head_dim, self.cfg)
        return self.num_layers * self.cfg.page_size * per_token * self.layout.elem_size

    def summarise(self, layer: int, k: torch.Tensor) -> None:
        row = self.seqs[self._chunk.seq_id].row
        basis = principal_basis(k, self.rank)  # [Hkv, D, r]
        self.basis[layer][row] = basis
        low = torch.einsum("thd,hdr->thr", k.float(), basis)
        S, Hkv = self.block_size, self.layout.num_kv_heads
        pos = torch.arange(k.shape[0], device=self.device)
        slots = self.low_tables[row].long()[pos // S] * S + pos % S
        self.k_low[layer].view(-1, Hkv, self.rank)[slots] = low.to(self.dtype)

    def select(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, D = q.shape
        Hkv, G = self.layout.num_kv_heads, H // self.layout.num_kv_heads
        basis = self.basis[layer][self._seq_rows]  # [B, Hkv, D, r]
        q_low = torch.einsum("bhgd,bhdr->bhgr", q.float().view(B, Hkv, G, D), basis)
        k_low = self.gather_prefix(
            self.k_low[layer], self._max_selectable, self.low_tables[self._seq_rows]
        ).float()  # [B, N, Hkv, r]
        scores = torch.einsum("bhgr,bnhr->bhgn", q_low, k_low) * self.scale
        mask = self.selectable_mask(self._max_selectable)
        grouped = self.group_max_softmax(scores.reshape(B, H, -1), mask)
        return self.top_units(grouped)
