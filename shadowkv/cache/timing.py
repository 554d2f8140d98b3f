"""Timing spans of work inside a step without stalling it (benchmarks' SVD share of prefill)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class SpanTimer:
    """Sums marked spans on one device: CUDA events on a GPU (no sync while the work runs; one
    when the total is read), ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._spans: list[tuple[object, object]] = []

    def mark(self) -> object:
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, start: object) -> None:
        """Close a span opened with ``mark()``."""
        self._spans.append((start, self.mark()))

    def take(self) -> float:
        """Seconds in the spans added since the last call (syncs on CUDA), and start over."""
        spans, self._spans = self._spans, []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return sum(a.elapsed_time(b) for a, b in spans) / 1000  # type: ignore[attr-defined]
        return sum(b - a for a, b in spans)  # type: ignore[operator]


@contextlib.contextmanager
def timed(timer: SpanTimer | None) -> Iterator[None]:
    """Add the span of the ``with`` body to ``timer`` (nothing when it is None)."""
    if timer is None:
        yield
        return
    start = timer.mark()
    yield
    timer.add(start)
