"""One forward over all of a step's prefill chunks, packed along the token dimension.

A step's prefill chunks (short prompts whole, the partial prompt's next chunk, a prefix-shared
prompt's suffix) run as one ragged batch: their token ids and positions are concatenated
(``[sum T_i]``, each segment at its own positions ``start_i .. end_i - 1``), so embedding, norms,
projections, RoPE and MLP run once over every token. Only attention is per sequence:
``RaggedPrefill`` stands in for the cache in that forward's ``ForwardContext`` and splits each
layer's ``q, k, v, k_pre`` at ``cu_seqlens``; per segment it makes that sequence's planned chunk
current (``AttentionCache.select_prefill``) and, through the segment's target — the cache, or
the ``RecordingCache`` recording that prompt — stores the chunk and reads back the keys and
values it attends to (``prefill_kv``: the earlier chunks and itself). A layer whose prefill is
plain causal (``AttentionCache.prefill_scale``) then attends every segment in one
``varlen_attention`` call (Triton on CUDA; on the CPU the reference, each segment exactly as a
lone chunk's); other layers (sliding windows) run each segment's own ``prefill``.

A mixed step (``MixedStep``) puts one decode row per running sequence in front of the packed
prompt tokens: the same forward decodes them through ``AttentionCache.decode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol

import torch

from shadowkv.cache.base import AttentionCache
from shadowkv.kernels.varlen_attention import varlen_attention


class PrefillTarget(Protocol):
    """What a segment's layers attend through: the cache itself or a ``RecordingCache``."""

    def prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> torch.Tensor: ...

    def prefill_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


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
    """The ``ForwardContext.cache`` of a packed prefill forward (``phase="prefill"``; in a mixed
    step, behind a ``MixedStep``).

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
        ``[sum T_i, H, D]``, each segment's rows exact causal attention over its own prompt."""
        scale = self.cache.prefill_scale(layer)
        bounds = list(zip(self.segments, self.cu_seqlens, self.cu_seqlens[1:]))
        if scale is None:  # not plain causal (a sliding window): each segment's own prefill
            outs = []
            for seg, s, e in bounds:
                self.cache.select_prefill(seg.seq_id)
                outs.append(seg.target.prefill(layer, q[s:e], k[s:e], v[s:e], k_pre[s:e]))
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        keys, values = [], []  # per segment [S_i >= T_i, Hkv, D]: its earlier tokens, then its own
        for seg, s, e in bounds:
            self.cache.select_prefill(seg.seq_id)
            k_all, v_all = seg.target.prefill_kv(layer, k[s:e], v[s:e], k_pre[s:e])
            keys.append(k_all)
            values.append(v_all)
        cu_k = (0, *accumulate(t.shape[0] for t in keys))
        if len(keys) > 1:
            keys, values = [torch.cat(keys)], [torch.cat(values)]
        return varlen_attention(q, keys[0], values[0], self.cu_seqlens, cu_k, scale)


@dataclass(frozen=True)
class MixedStep:
    """The ``ForwardContext.cache`` of a mixed step (``phase="mixed"``): the first
    ``decode_rows`` packed rows are one token per running sequence, decoded through ``cache``
    (planned by ``begin_decode`` before the forward); the rest are ``ragged``'s prefill chunks."""

    cache: AttentionCache
    decode_rows: int
    ragged: RaggedPrefill

    def prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> torch.Tensor:
        """``[B + sum T_i, H, D]``: the decode rows' attention, then the segments'."""
        B = self.decode_rows
        decoded = self.cache.decode(layer, q[:B], k[:B], v[:B], k_pre[:B])  # [B, H, D]
        prefilled = self.ragged.prefill(layer, q[B:], k[B:], v[B:], k_pre[B:])
        return torch.cat([decoded, prefilled])
