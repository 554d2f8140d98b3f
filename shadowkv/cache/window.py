"""Sliding-window layers: exact attention over the last ``window`` tokens, kept in a ring.

A layer whose spec has a ``sliding_window`` (Gemma-3's local layers, Mistral's) lets a query at
position ``i`` see keys ``j`` with ``i - window < j <= i``, as transformers masks them. Such a
layer never needs more than ``window`` tokens of a sequence, so ``make_cache`` serves it with a
``WindowCache`` whatever the method (ShadowKV applies to the global layers): the paged dense
cache with each sequence's blocks used as a ring of ``min(window, prompt + max_new)`` slots,
position ``p`` in slot ``p % window``. Decode writes the new token over the one leaving the
window, then attends every filled slot (``min(p + 1, window)``; order does not matter to
attention, and keys are stored rotated). Prefill attends with the sliding mask and stores only
the last ``window`` tokens of each prompt chunk; a later chunk reads the ``window - 1`` tokens
before it back from the ring before storing itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shadowkv.cache.base import CacheOptions, PrefillChunk
from shadowkv.cache.dense import DenseCache
from shadowkv.cache.layout import KVLayout
from shadowkv.cache.methods import CacheConfig
from shadowkv.kernels.varlen_attention.reference import causal_attention


class WindowCache(DenseCache):
    """Per sequence a ring of ``min(window, tokens)`` K/V slots in the dense cache's blocks."""

    # The ring overwrites a prompt's first tokens once it passes the window: no block of it stays
    # read-only, so nothing is shared (the engine keeps host copies of prefixes instead).
    supports_shared_prefix = False

    def __init__(
        self,
        cfg: CacheConfig,
        layout: KVLayout,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        memory_bytes: int,
    ) -> None:
        window = layout.spec.sliding_window
        if window is None:
            raise ValueError("WindowCache serves sliding-window layers; this spec has no window")
        self.window = window
        super().__init__(cfg, layout, device, max_num_seqs, max_model_len, memory_bytes)

    def held_tokens(self, num_tokens: int) -> int:
        return min(num_tokens, self.window)

    def check_options(self, options: CacheOptions) -> None:
        """Every option is honoured: the window is attended exactly whatever the request asks."""

    def _slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Flat pool rows of the ring slots of token positions [start, end)."""
        S = self.block_size
        ring = torch.arange(start, end, device=self.device) % self.window
        table = self.block_tables[self.seqs[seq_id].row].long()
        return table[ring // S] * S + ring % S

    def plan_chunk(self, chunk: PrefillChunk) -> torch.Tensor:
        """The ring slots of the chunk's last ``held_tokens(num_tokens)`` tokens (those stay)."""
        return self._slots(chunk.seq_id, chunk.end - self.held_tokens(chunk.num_tokens), chunk.end)

    def store_prompt(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> None:
        kept = self.held_tokens(self._chunk.num_tokens)
        self._write(layer, self._chunk.detail, k[-kept:], v[-kept:])

    def prompt_attend_from(self, start: int) -> int:
        # The chunk's first query sees the window - 1 tokens before it, all still in the ring
        # (``prefill`` reads them before storing the chunk over them).
        return max(0, start - self.window + 1)

    causal_prefill = False  # the sliding mask: a ragged forward attends each segment alone

    def prompt_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        return sliding_window_attention(q, k, v, self.scale, self.window)

    def plan_decode(self, cols: dict[str, torch.Tensor], widths: int) -> None:
        S = self.block_size
        rows, pos = cols["rows"], cols["pos"]
        ring = pos % self.window
        self._tables = self.block_tables[rows, :widths]  # [B, widths]
        self._seq_lens = torch.clamp(pos + 1, max=self.window).to(torch.int32)
        self._decode_slots = (
            self._tables.gather(1, (ring // S)[:, None]).squeeze(1).long() * S + ring % S
        )


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int
) -> torch.Tensor:
    """Causal attention where a query sees the ``window`` keys ending at its own: ``q [T, H, D]``,
    ``k, v [S >= T, Hkv, D]`` (the last ``T`` keys are the queries' tokens) -> ``[T, H, D]``.

    Queries go in blocks of ``window`` rows, each against the keys its rows can see (at most
    ``2 * window - 1``), so the scores never exceed ``[H, window, 2 * window]``.
    """
    T, S = q.shape[0], k.shape[0]
    if S <= window:
        return causal_attention(q, k, v, scale)
    off = S - T  # key index of query row i is i + off
    out = torch.empty_like(q)
    for s in range(0, T, window):
        e = min(T, s + window)
        lo = max(0, s + off - window + 1)
        i = torch.arange(s + off, e + off, device=q.device)[:, None]
        j = torch.arange(lo, e + off, device=q.device)[None, :]
        mask = (j <= i) & (j > i - window)  # [e - s, e + off - lo]
        out[s:e] = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1)[None],
            k[lo : e + off].transpose(0, 1)[None],
            v[lo : e + off].transpose(0, 1)[None],
            attn_mask=mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )[0].transpose(0, 1)
    return out
