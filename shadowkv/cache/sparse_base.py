"""Shared machinery for the sparse-attention baselines (Quest, Loki, StreamingLLM, oracle top-k).

Every baseline keeps all keys and values exact on the device in the paged pool of ``DenseCache``
and, at each decode step and layer, attends over a per-KV-head subset of the prompt rows. Prefill
attention is exact for every method (the paper's protocol, section 5.1).

How the budget is counted, identically for every method, so comparisons with ShadowKV are honest:

* The **local window** is the last ``local_chunks * chunk_size + prompt_len % chunk_size`` prompt
  tokens, the same window ShadowKV keeps exact. It is always attended and is not part of the budget.
* **Generated tokens** are always attended and are not part of the budget.
* The **budget** ``cfg.budget_tokens(prompt_len)`` is the most prompt tokens a method may pick, per
  KV head, from the selectable prefix ``[0, prompt_len - local)``. A method that picks whole units
  (Quest's 16-token pages) picks ``budget // unit`` of them, so never more tokens than the budget.
  When the budget covers the whole prefix every prompt row is attended and the method equals dense
  attention.
* ShadowKV additionally keeps its outlier chunks exact; the baselines get no outliers.

Shapes: ``B`` decoding sequences, ``H`` query heads, ``Hkv`` KV heads, ``G = H // Hkv``, ``D`` head
dim, ``S`` rows per pool block, ``K`` selected rows, ``M`` attended rows.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from shadowkv.cache.base import CacheOptions, device_columns
from shadowkv.cache.dense import DenseCache
from shadowkv.cache.methods import SparseConfig


class SparseCache(DenseCache):
    """Dense storage, sparse decode: subclasses implement ``select`` (and optional metadata).

    ``unit`` is how many consecutive tokens one selection unit covers (1 for token-level methods,
    ``page_size`` for Quest).
    """

    cfg: SparseConfig
    unit: int = 1
    # Selection sizes come from the host each step (``top_units``): no fixed-shape step.
    supports_static_decode = False

    def block_bytes(self) -> int:
        return super().block_bytes() + self.metadata_bytes_per_block()

    def metadata_bytes_per_block(self) -> int:
        """Device bytes of per-block selection metadata over all layers (0 when none)."""
        return 0

    def check_options(self, options: CacheOptions) -> None:
        """Every option applies: ``begin_decode`` grants each sequence its own budget."""

    def local_tokens(self, prompt_len: int) -> int:
        """Length of the always-attended local window at the end of the prompt."""
        c = self.cfg.chunk_size
        return min(prompt_len, self.cfg.local_chunks * c + prompt_len % c)

    def store_prompt(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> None:
        super().store_prompt(layer, k, v, k_pre)
        if not self.prefill_completes():
            return  # metadata summarises the whole prompt: built with its last chunk
        start = self._chunk.start
        keys = k
        if start:
            keys = torch.cat([self.read_prompt(layer, 0, start)[0], k.to(self.dtype)])
        self.summarise(layer, keys.to(self.dtype))

    def summarise(self, layer: int, k: torch.Tensor) -> None:
        """Build selection metadata from the whole prompt's post-RoPE keys ``k [T, Hkv, D]``."""

    def begin_decode(self, seq_ids: list[int]) -> None:
        super().begin_decode(seq_ids)
        recs = [self.seqs[s] for s in seq_ids]
        selectable = [r.prompt_len - self.local_tokens(r.prompt_len) for r in recs]
        units = []
        for r, n in zip(recs, selectable):
            cfg = self.seq_config(r.options)
            budget = n if r.options.exact else cfg.budget_tokens(r.prompt_len)  # type: ignore[attr-defined]
            units.append(-(-n // self.unit) if budget >= n else budget // self.unit)
        dev = self.device
        lengths = [r.length for r in recs]
        cols = device_columns(
            {"rows": [r.row for r in recs], "selectable": selectable, "units": units,
             "lengths": lengths},
            dev,
        )
        self._seq_rows = cols["rows"]  # [B]
        self._selectable = cols["selectable"]  # [B]
        self._units = cols["units"]  # [B] selection units granted
        self._max_units = max(units, default=0)  # known on the host: no sync to size the top-k
        self._max_selectable = max(selectable, default=0)
        # Always-attended rows: local window, earlier generated tokens and the new one.
        span = max((n + 1 - s for n, s in zip(lengths, selectable)), default=0)
        offs = torch.arange(span, device=dev)
        start = self._selectable[:, None]
        self._always_pos = start + offs  # [B, A]
        self._always_valid = self._always_pos <= cols["lengths"][:, None]

    @abstractmethod
    def select(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt positions to attend per KV head: ``(pos [B, Hkv, K], valid [B, Hkv, K])``.

        Positions lie in each sequence's selectable prefix; invalid entries are ignored.
        """

    def decode(self, layer, q, k, v, k_pre):
        self._write(layer, self._decode_slots, k, v)
        sel_pos, sel_valid = self.select(layer, q)
        B, Hkv = q.shape[0], self.layout.num_kv_heads
        always = self._always_pos[:, None, :].expand(B, Hkv, -1)
        always_valid = self._always_valid[:, None, :].expand(B, Hkv, -1)
        pos = torch.cat([sel_pos, always], dim=-1)
        valid = torch.cat([sel_valid, always_valid], dim=-1)
        return self.attend(layer, q, pos, valid)

    def attend(
        self, layer: int, q: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Exact attention of ``q [B, H, D]`` over token positions ``pos [B, Hkv, M]``.

        Each query head attends only to its KV head's valid rows; returns ``[B, H, D]``.
        """
        B, H, D = q.shape
        Hkv = self.layout.num_kv_heads
        slots = self.slots_of(torch.where(valid, pos, torch.zeros_like(pos)))  # [B, Hkv, M]
        heads = torch.arange(Hkv, device=q.device)[None, :, None]
        k = self.k_cache[layer].view(-1, Hkv, D)[slots, heads].float()  # [B, Hkv, M, D]
        v = self.v_cache[layer].view(-1, Hkv, D)[slots, heads].float()
        qf = q.float().view(B, Hkv, H // Hkv, D)
        scores = torch.einsum("bhgd,bhmd->bhgm", qf, k) * self.scale
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
        out = torch.einsum("bhgm,bhmd->bhgd", torch.softmax(scores, dim=-1), v)
        return out.reshape(B, H, D).to(q.dtype)

    def slots_of(self, pos: torch.Tensor) -> torch.Tensor:
        """Pool rows (block * S + offset) of the step's token positions ``pos [B, ...]``."""
        S = self.block_size
        flat = pos.reshape(pos.shape[0], -1)
        blocks = self._tables.long().gather(1, flat // S)
        return (blocks * S + flat % S).view_as(pos)

    def gather_prefix(
        self, pool: torch.Tensor, num_tokens: int, tables: torch.Tensor | None = None
    ) -> torch.Tensor:
        """First ``num_tokens`` rows of each sequence from a paged pool ``[pages, S, ...]``
        through ``tables [B, >= pages used]`` (default: the step's block tables)."""
        S = self.block_size
        nb = -(-num_tokens // S)
        tables = self._tables if tables is None else tables
        rows = pool[tables[:, :nb].long()]  # [B, nb, S, ...]
        return rows.flatten(1, 2)[:, :num_tokens]

    def top_units(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top units per KV head from ``scores [B, Hkv, N]`` (``-inf`` = not selectable).

        Returns token positions and validity ``[B, Hkv, K * unit]``; sequence ``b`` keeps its
        ``_units[b]`` best units and only positions inside its selectable prefix.
        """
        B, Hkv, N = scores.shape
        k = min(self._max_units, N)
        top = scores.topk(k, dim=-1)  # [B, Hkv, k]
        rank_ok = torch.arange(k, device=scores.device) < self._units[:, None, None]
        keep = rank_ok & torch.isfinite(top.values)
        offs = torch.arange(self.unit, device=scores.device)
        pos = (top.indices[..., None] * self.unit + offs).flatten(2)  # [B, Hkv, k * unit]
        valid = keep.repeat_interleave(self.unit, dim=-1) & (pos < self._selectable[:, None, None])
        return pos, valid

    def selectable_mask(self, num: int, unit: int = 1) -> torch.Tensor:
        """``[B, num]``: whether unit ``i`` starts inside each sequence's selectable prefix."""
        starts = torch.arange(num, device=self.device) * unit
        return starts[None, :] < self._selectable[:, None]

    def group_max_softmax(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``scores [B, H, N]`` -> softmax per query head, max over GQA group -> ``[B, Hkv, N]``.

        Masked (``mask [B, N]`` False) entries come back as ``-inf``.
        """
        B, H, N = scores.shape
        Hkv = self.layout.num_kv_heads
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with nothing selectable
        grouped = probs.view(B, Hkv, H // Hkv, N).amax(dim=2)
        return grouped.masked_fill(~mask[:, None, :], float("-inf"))
