"""Several caches behind one interface, each serving some of the model's layers.

A model whose layers attend differently (sliding-window and global layers, or layers with other
head shapes) gets one cache per group of alike layers (``cache.make_cache``). The engine talks to
one ``LayeredCache``: lifecycle calls go to every part (admission is all or nothing), per-layer
calls to the part serving that layer, with the layer index translated to the part's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from shadowkv.cache.base import (
    AttentionCache,
    CacheCapacityError,
    CacheMemory,
    CacheOptions,
    SharedPrefix,
)


class LayeredCache:
    """``parts``: ``(cache, layers)`` pairs; each model layer is served by exactly one part."""

    def __init__(self, parts: Sequence[tuple[AttentionCache, Sequence[int]]]) -> None:
        self.parts = [cache for cache, _ in parts]
        self._route: dict[int, tuple[AttentionCache, int]] = {}
        for cache, layers in parts:
            if len(layers) != cache.num_layers:
                raise ValueError(
                    f"a cache of {cache.num_layers} layers cannot serve {list(layers)}"
                )
            for local, layer in enumerate(layers):
                if layer in self._route:
                    raise ValueError(f"layer {layer} is served by two caches")
                self._route[layer] = (cache, local)
        if sorted(self._route) != list(range(len(self._route))):
            raise ValueError(f"layers {sorted(self._route)} are not 0..{len(self._route) - 1}")
        first = self.parts[0]
        self.device, self.dtype = first.device, first.dtype
        self.max_num_seqs, self.max_model_len = first.max_num_seqs, first.max_model_len
        self.num_layers = len(self._route)
        self.supports_static_decode = all(c.supports_static_decode for c in self.parts)
        self.supports_fork = all(c.supports_fork for c in self.parts)
        self.stages_prompts = any(c.stages_prompts for c in self.parts)
        self.supports_shared_prefix = all(c.supports_shared_prefix for c in self.parts)

    @property
    def step_epoch(self) -> int:
        return sum(c.step_epoch for c in self.parts)

    # lifecycle: every part ---------------------------------------------------------------------
    def check_options(self, options: CacheOptions) -> None:
        for c in self.parts:
            c.check_options(options)

    def planning(self) -> contextlib.AbstractContextManager[None]:
        stack = contextlib.ExitStack()
        for c in self.parts:
            stack.enter_context(c.planning())
        return stack

    def can_add(
        self, prompt_len: int, max_new: int, options: CacheOptions | None = None,
        staged: bool = False, prefix: SharedPrefix | None = None, prefix_tokens: int = 0,
    ) -> bool:
        return all(
            c.can_add(prompt_len, max_new, options, staged, part, prefix_tokens)
            for c, part in zip(self.parts, self._split(prefix))
        )

    def can_stage(
        self, prompt_len: int, max_new: int, options: CacheOptions | None = None
    ) -> bool:
        return all(c.can_stage(prompt_len, max_new, options) for c in self.parts)

    def fits_empty(
        self, prompt_len: int, max_new: int, options: CacheOptions | None = None
    ) -> bool:
        return all(c.fits_empty(prompt_len, max_new, options) for c in self.parts)

    def add_sequence(
        self, seq_id: int, prompt_len: int, max_new: int, options: CacheOptions | None = None,
        staged: bool = False, prefix: SharedPrefix | None = None, prefix_tokens: int = 0,
    ) -> None:
        added = []
        try:
            for c, part in zip(self.parts, self._split(prefix)):
                shared = {"prefix": part, "prefix_tokens": prefix_tokens} if part else {}
                c.add_sequence(seq_id, prompt_len, max_new, options, staged, **shared)
                added.append(c)
        except CacheCapacityError:
            for c in added:
                c.free_sequence(seq_id)
            raise

    # prefix sharing: one SharedPrefix per part, bundled in ``detail`` -------------------------
    def _split(self, prefix: SharedPrefix | None) -> list[SharedPrefix | None]:
        """Each part's prefix of a bundle (None for every part when there is none)."""
        if prefix is None:
            return [None] * len(self.parts)
        return list(prefix.detail)

    def will_share_prefixes(self) -> None:
        for c in self.parts:
            c.will_share_prefixes()

    def share_prefix(self, seq_id: int, num_tokens: int) -> SharedPrefix | None:
        """Every part's prefix of ``seq_id``, bundled; None unless every part has one. The
        bundle's ``num_tokens`` is the fewest any part keeps."""
        parts: list[SharedPrefix] = []
        for c in self.parts:
            part = c.share_prefix(seq_id, num_tokens)
            if part is None:
                for done, kept in zip(self.parts, parts):
                    done.release_prefix(kept)
                return None
            parts.append(part)
        return SharedPrefix(min(p.num_tokens for p in parts), {}, tuple(parts))

    def release_prefix(self, prefix: SharedPrefix) -> None:
        if prefix.released:
            return
        prefix.released = True
        for c, part in zip(self.parts, self._split(prefix)):
            c.release_prefix(part)  # type: ignore[arg-type]

    def prefix_start(
        self, prefix: SharedPrefix, prompt_len: int, max_new_tokens: int,
        options: CacheOptions | None, matched: int,
    ) -> int:
        """The most tokens every part may start from: each part's count of the last one's,
        until they agree (counts only fall, so this ends)."""
        if prefix.released:
            return 0
        n = matched
        while True:
            agreed = min(
                c.prefix_start(part, prompt_len, max_new_tokens, options, n)  # type: ignore[arg-type]
                for c, part in zip(self.parts, self._split(prefix))
            )
            if agreed == n or agreed == 0:
                return agreed
            n = agreed

    def prefix_memory(self, prefixes: list[SharedPrefix]) -> CacheMemory:
        total = CacheMemory()
        for i, c in enumerate(self.parts):
            total = total + c.prefix_memory([p.detail[i] for p in prefixes])
        return total

    def reserved_tokens(self, seq_id: int) -> int:
        return min(c.reserved_tokens(seq_id) for c in self.parts)

    def growth_problem(self, seq_id: int, max_new_tokens: int) -> str | None:
        return next(
            (why for c in self.parts if (why := c.growth_problem(seq_id, max_new_tokens))), None
        )

    def can_grow(self, seq_id: int, max_new_tokens: int) -> bool:
        return self.growth_problem(seq_id, max_new_tokens) is None

    def grow(self, seq_id: int, max_new_tokens: int) -> None:
        """Every part or none: each part's growth is checked before any takes a page (the parts
        draw from their own pools, and a checked ``grow`` only takes what its check counted)."""
        why = self.growth_problem(seq_id, max_new_tokens)
        if why is not None:
            raise CacheCapacityError(why)
        for c in self.parts:
            c.grow(seq_id, max_new_tokens)

    def free_sequence(self, seq_id: int) -> None:
        for c in self.parts:
            c.free_sequence(seq_id)

    def length(self, seq_id: int) -> int:
        return self.parts[0].length(seq_id)

    def fork(self, src_seq: int, dst_seq: int) -> None:
        for c in self.parts:
            c.fork(src_seq, dst_seq)

    def begin_prefill(self, seq_id: int, num_tokens: int, start: int = 0) -> None:
        for c in self.parts:
            c.begin_prefill(seq_id, num_tokens, start)

    def select_prefill(self, seq_id: int) -> None:
        for c in self.parts:
            c.select_prefill(seq_id)

    def end_prefill(self, seq_id: int | None = None) -> None:
        for c in self.parts:
            c.end_prefill(seq_id)

    def begin_decode(self, seq_ids: list[int]) -> None:
        for c in self.parts:
            c.begin_decode(seq_ids)

    def end_decode(self) -> None:
        for c in self.parts:
            c.end_decode()

    # fixed-shape steps: each part's columns under its own prefix -------------------------------
    def begin_static_decode(self, seq_ids: list[int]) -> tuple[dict[str, list[int]], object]:
        cols: dict[str, list[int]] = {}
        widths = []
        for i, c in enumerate(self.parts):
            part_cols, part_widths = c.begin_static_decode(seq_ids)
            cols.update({f"{i}.{k}": v for k, v in part_cols.items()})
            widths.append(part_widths)
        return cols, tuple(widths)

    def pad_columns(self) -> dict[str, int]:
        return {f"{i}.{k}": v for i, c in enumerate(self.parts) for k, v in c.pad_columns().items()}

    def plan_decode(self, cols: dict[str, torch.Tensor], widths: object) -> None:
        assert isinstance(widths, tuple)
        for i, (c, w) in enumerate(zip(self.parts, widths)):
            prefix = f"{i}."
            c.plan_decode({k[len(prefix):]: v for k, v in cols.items() if k.startswith(prefix)}, w)

    # per layer: the part serving it ------------------------------------------------------------
    def prefill(self, layer: int, q, k, v, k_pre) -> torch.Tensor:  # type: ignore[no-untyped-def]
        cache, local = self._route[layer]
        return cache.prefill(local, q, k, v, k_pre)

    def prefill_kv(self, layer: int, k, v, k_pre):  # type: ignore[no-untyped-def]
        cache, local = self._route[layer]
        return cache.prefill_kv(local, k, v, k_pre)

    def prefill_scale(self, layer: int) -> float | None:
        cache, local = self._route[layer]
        return cache.prefill_scale(local)

    def store_prompt(self, layer: int, k, v, k_pre) -> None:  # type: ignore[no-untyped-def]
        cache, local = self._route[layer]
        cache.store_prompt(local, k, v, k_pre)

    def decode(self, layer: int, q, k, v, k_pre) -> torch.Tensor:  # type: ignore[no-untyped-def]
        cache, local = self._route[layer]
        return cache.decode(local, q, k, v, k_pre)

    # ShadowKV's benchmark hooks, forwarded to the parts that have them (absent when none has:
    # the harness tests for them with hasattr) ---------------------------------------------------
    def _having(self, name: str) -> list[AttentionCache]:
        parts = [c for c in self.__dict__.get("parts", ()) if hasattr(c, name)]
        if not parts:
            raise AttributeError(f"no part of this LayeredCache has {name!r}")
        return parts

    def __getattr__(self, name: str) -> Any:
        if name == "hit_rate":  # per layer of the parts that select
            parts = self._having(name)
            return lambda: [r for c in parts for r in c.hit_rate()]  # type: ignore[attr-defined]
        if name in ("reset_hit_rate", "set_selection"):
            parts = self._having(name)
            return lambda *args: [getattr(c, name)(*args) for c in parts] and None
        raise AttributeError(name)

    @property
    def svd_timer(self) -> Any:
        return self._having("svd_timer")[0].svd_timer  # type: ignore[attr-defined]

    @svd_timer.setter
    def svd_timer(self, timer: Any) -> None:
        for c in self._having("svd_timer"):
            c.svd_timer = timer  # type: ignore[attr-defined]

    def memory(self, seq_id: int | None = None) -> CacheMemory:
        total = CacheMemory()
        for c in self.parts:
            total = total + c.memory(seq_id)
        return total
