"""Throughput and memory measurement: methods at their largest batch, on real architectures.

``run_throughput(BenchConfig(...))`` is what ``shadowkv bench`` and ``benchmarks/throughput.py``
call; ``shadowkv.bench.models`` names the architectures it can build with random weights.
"""

from __future__ import annotations

from shadowkv.bench.models import ARCHITECTURES, RANDOM_WEIGHTS, arch_config, random_model
from shadowkv.bench.throughput import BenchConfig, run_throughput

__all__ = [
    "ARCHITECTURES",
    "RANDOM_WEIGHTS",
    "BenchConfig",
    "arch_config",
    "random_model",
    "run_throughput",
]
