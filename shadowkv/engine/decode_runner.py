"""Decode steps, run eagerly or as CUDA graphs captured per padded batch size and plan widths.

A decode step of a few sequences launches thousands of small kernels (per layer: projections,
RoPE, the cache's planning and attention ops), so at small batch the GPU waits on the launches
and not on memory. A CUDA graph replays the whole step as one launch. A graph fixes every
shape and address, so a step runs "static": the batch is padded to a size in ``batch_sizes``
with entries that touch only scratch rows (``AttentionCache.pad_columns``), the cache's plan
widths are rounded up to buckets that hold while the batch's sequences do, and every
per-sequence input (token id, position, the cache's columns) reaches the device in one copy
into a buffer the graph reads. Inside the step nothing syncs with the host or allocates outside
the graph's memory pool.

Modes (``EngineConfig.decode_mode``): ``eager`` plans exact shapes each step; ``static`` runs the
fixed-shape step without capturing it (any device: how CPU tests check padding and bucketing);
``graph`` captures it (CUDA only); ``auto`` is ``graph`` on CUDA for caches that support a
static step (dense, ShadowKV), else ``eager``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from shadowkv.cache.base import AttentionCache
from shadowkv.config import ConfigError
from shadowkv.kernels.rope.tables import RopeTables
from shadowkv.models.llama import LlamaModel

MAX_GRAPHS = 64  # captured steps kept; the least recently used is dropped past this


def batch_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then multiples of 8, and ``max_num_seqs`` itself."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += range(8, max_num_seqs, 8)
    return sizes + [max_num_seqs]


def resolve_mode(mode: str, cache: AttentionCache, device: torch.device) -> str:
    """The mode a step runs in for ``EngineConfig.decode_mode`` (validated there)."""
    if mode == "auto":
        return "graph" if device.type == "cuda" and cache.supports_static_decode else "eager"
    if mode in ("static", "graph") and not cache.supports_static_decode:
        raise ConfigError(
            f"decode_mode={mode!r} needs a cache with a fixed-shape decode step (dense, shadowkv); "
            f"{type(cache).__name__} plans from the host each step: use decode_mode='eager'"
        )
    if mode == "graph" and device.type != "cuda":
        raise ConfigError(
            f"decode_mode='graph' captures CUDA graphs, but the engine runs on {device}; use "
            "'static' (the same fixed-shape step without capture) or 'eager'"
        )
    return mode


@dataclass
class _Step:
    """One fixed-shape step: its static input view, and its graph and output once captured."""

    cols: torch.Tensor  # [num columns, padded B] view of the runner's input buffer
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [padded B, vocab], written by each replay


class DecodeRunner:
    """Runs the engine's decode steps; returns logits ``[B, vocab]`` (fp32) per step."""

    def __init__(
        self,
        model: LlamaModel,
        rope: RopeTables,
        cache: AttentionCache,
        device: torch.device,
        max_num_seqs: int,
        mode: str = "auto",
    ) -> None:
        self.model, self.rope, self.cache, self.device = model, rope, cache, device
        self.requested = mode
        self.mode = resolve_mode(mode, cache, device)
        self.sizes = batch_sizes(max_num_seqs)
        self._steps: OrderedDict[Hashable, _Step] = OrderedDict()
        self._names: list[str] | None = None  # column order, fixed by the first static step
        self._inputs: torch.Tensor | None = None  # [num columns, max_num_seqs] on the device
        self._staging: torch.Tensor | None = None  # the same in (pinned, on CUDA) host memory
        self._copied: torch.cuda.Event | None = None  # the last staging -> device copy is done
        self._pool = None  # one memory pool shared by all graphs (they never run at once)
        self.captures = 0  # graphs captured so far (benchmarks report it)
        self._epoch = cache.step_epoch

    def step(self, seq_ids: list[int], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        if self.mode == "eager":
            self.cache.begin_decode(seq_ids)
            ids = torch.tensor(token_ids, device=self.device)
            pos = torch.tensor(positions, device=self.device)
            return self.model(ids, self.model.context("decode", pos, self.rope, self.cache))
        if self.cache.step_epoch != self._epoch:  # what the captured steps baked in changed
            self._steps.clear()
            self._epoch = self.cache.step_epoch
        cols, widths = self.cache.begin_static_decode(seq_ids)
        cols = {"input_ids": token_ids, "positions": positions, **cols}
        B = len(seq_ids)
        size = next(s for s in self.sizes if s >= B)
        step = self._get_step(size, widths, cols)
        if step is None:  # capture failed under "auto": this and later steps run eagerly
            return self.step(seq_ids, token_ids, positions)
        self._load(cols, B, size)
        if step.graph is not None:
            step.graph.replay()
        else:
            step.logits = self._forward(step.cols, widths)
        assert step.logits is not None
        return step.logits[:B]

    # the fixed-shape step ------------------------------------------------------------------
    def _forward(self, cols: torch.Tensor, widths: object) -> torch.Tensor:
        """Plan and run one step from the device inputs (device ops only: what a graph holds)."""
        assert self._names is not None
        named = dict(zip(self._names, cols.unbind(0)))
        self.cache.plan_decode(named, widths)
        ctx = self.model.context("decode", named["positions"], self.rope, self.cache)
        return self.model(named["input_ids"], ctx)

    def _load(self, cols: dict[str, list[int]], B: int, size: int) -> None:
        """Copy a step's columns, padded to ``size``, into the device inputs (one transfer)."""
        assert self._staging is not None and self._inputs is not None
        pad = {"input_ids": 0, "positions": 0, **self.cache.pad_columns()}
        rows = [vals + [pad[name]] * (size - B) for name, vals in cols.items()]
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has left the staging buffer
        self._staging[:, :size] = torch.tensor(rows, dtype=torch.int64)
        # The whole buffer (a few KiB): a contiguous pinned source copies without blocking.
        self._inputs.copy_(self._staging, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = self._copied or torch.cuda.Event()
            self._copied.record()

    def _get_step(self, size: int, widths: object, cols: dict[str, list[int]]) -> _Step | None:
        if self._names is None:
            self._names = list(cols)
            shape = (len(self._names), self.sizes[-1])
            self._inputs = torch.zeros(shape, dtype=torch.int64, device=self.device)
            pin = self.device.type == "cuda"
            self._staging = torch.zeros(shape, dtype=torch.int64, pin_memory=pin)
        assert list(cols) == self._names, "a cache's decode columns keep their names and order"
        key = (size, widths)
        step = self._steps.get(key)
        if step is not None:
            self._steps.move_to_end(key)
            return step
        assert self._inputs is not None
        step = _Step(self._inputs[:, :size])
        if self.mode == "graph":
            try:
                self._capture(step, size, widths)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                if self.requested == "graph":
                    raise
                warnings.warn(
                    f"capturing the decode step as a CUDA graph failed ({type(err).__name__}: "
                    f"{err}); decoding eagerly from now on (decode_mode='eager' skips the try)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.mode, self._pool = "eager", None
                self._steps.clear()
                return None
        self._steps[key] = step
        if len(self._steps) > MAX_GRAPHS:
            self._steps.popitem(last=False)
        return step

    def _capture(self, step: _Step, size: int, widths: object) -> None:
        """Capture the step; warm-up runs on padding entries only, so no sequence is touched."""
        assert self._names is not None
        self._load({n: [] for n in self._names}, 0, size)  # all padding
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # first runs compile kernels and set up library handles
            for _ in range(2):
                self._forward(step.cols, widths)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server thread touching CUDA meanwhile does not break the capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            step.logits = self._forward(step.cols, widths)
        self._pool = graph.pool()
        step.graph = graph
        self.captures += 1
