"""One forward over all of a step's prefill chunks, packed along the token dimension.

A step's prefill chunks (short prompts whole, the partial prompt's next chunk, a prefix-shared
prompt's suffix) run as one ragged batch: their token ids and positions are concatenated
(``[sum T_i]``, each segment at its own positions ``start_i .. end_i - 1``), so embedding, norms,
projections, RoPE and MLP run once over every token. Only attention is per sequence:
``RaggedPrefill`` stands in for the cache in that forward's ``ForwardContext`` and splits each
layer's ``q, k, v, k_pre`` at ``cu_seqlens``; per segment it makes that sequence's planned chunk
current (``AttentionCache.select_prefill``) and runs the method's exact chunk prefill (store,
then causal attention over its earlier chunks and itself) through the segment's target — the
cache, or the ``RecordingCache`` recording that prompt — and concatenates the outputs.

The per-segment attention is a loop of exact per-sequence prefills, not one varlen kernel: every
method's ``prefill`` (staging, rings, dense fallback) stays the single path a chunk takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol

import torch

from shadowkv.cache.base import AttentionCache


class PrefillTarget(Protocol):
    """What a segment's layers attend through: the cache itself or a ``RecordingCache``."""

    def prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Segment:
    """One sequence's chunk in a ragged forward: prompt tokens ``[start, start + num_tokens)``
    of ``seq_id``, attended through ``target``."""

    seq_id: int
    start: int
    num_tokens: int
    target: PrefillTarget


@dataclass(frozen=True)
class RaggedPrefill:
    """The ``ForwardContext.cache`` of a packed prefill forward (``phase="prefill"``).

    ``cache`` has every segment's chunk planned (``begin_prefill``) before the forward;
    ``cu_seqlens`` ``(0, T_0, T_0 + T_1, ..., sum T_i)``: the segments' bounds in the packed
    token dimension.
    """

    cache: AttentionCache
    segments: tuple[Segment, ...]
    cu_seqlens: tuple[int, ...]

    @classmethod
    def of(cls, cache: AttentionCache, segments: Sequence[Segment]) -> RaggedPrefill:
        return cls(cache, tuple(segments), (0, *accumulate(s.num_tokens for s in segments)))

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1]

    def positions(self, device: torch.device) -> torch.Tensor:
        """``[sum T_i]`` int64: each segment's own prompt positions, concatenated."""
        return torch.cat(
            [torch.arange(s.start, s.start + s.num_tokens) for s in self.segments]
        ).to(device)

    def last_index(self, device: torch.device) -> torch.Tensor:
        """``[num_segments]``: the packed row of each segment's last token."""
        return torch.tensor(self.cu_seqlens[1:], device=device) - 1

    def prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> torch.Tensor:
        """``q [sum T_i, H, D]``, ``k, v, k_pre [sum T_i, Hkv, D]`` -> attention
        ``[sum T_i, H, D]``, each segment's rows from its own sequence's exact prefill."""
        outs = []
        bounds = zip(self.segments, self.cu_seqlens, self.cu_seqlens[1:])
        for seg, s, e in bounds:
            self.cache.select_prefill(seg.seq_id)
            outs.append(seg.target.prefill(layer, q[s:e], k[s:e], v[s:e], k_pre[s:e]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
