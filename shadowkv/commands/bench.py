"""``shadowkv bench``: decode throughput and memory of cache methods at their largest batch.

    shadowkv bench --arch llama-3.1-8b --contexts 32768,65536 --methods dense,shadowkv \\
        --batch auto --decode-steps 256 --out bench_out/llama31
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from shadowkv.bench.models import ARCHITECTURES
from shadowkv.bench.throughput import BenchConfig, run_throughput
from shadowkv.commands.common import (
    add_decode_mode_arg,
    add_value_memory_args,
    budget_or_fraction,
    cache_config_from_args,
)
from shadowkv.config import CACHE_METHODS, CacheConfig, ConfigError

_CACHE_DEFAULTS = {f.name: f.default for f in fields(CacheConfig)}
_BENCH_DEFAULTS = {f.name: f.default for f in fields(BenchConfig)}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _hit_rates(text: str) -> tuple[float | None, ...]:
    try:
        return tuple(None if x.strip() == "query" else float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'query' or shares in [0, 1], comma-separated, got {text!r}"
        ) from None


def _batch(text: str) -> tuple[int, ...]:
    return () if text.strip() == "auto" else _int_list(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--arch",
        choices=sorted(ARCHITECTURES),
        help="a named architecture built with random weights (no checkpoint needed)",
    )
    what.add_argument("--model", help="a checkpoint directory, .gguf file or hub id (real weights)")
    p.add_argument(
        "--contexts",
        type=_int_list,
        default=_BENCH_DEFAULTS["contexts"],
        help="prompt lengths in tokens, comma-separated (default: 32768)",
    )
    p.add_argument(
        "--methods",
        type=lambda s: tuple(x for x in s.split(",") if x),
        default=_BENCH_DEFAULTS["methods"],
        help=f"cache methods, comma-separated, from {', '.join(CACHE_METHODS)}",
    )
    p.add_argument(
        "--batch",
        type=_batch,
        default=(),
        dest="batches",
        help="'auto' (each method's largest batch, plus the others') or sizes N[,N...]",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=_BENCH_DEFAULTS["decode_steps"],
        help="timed decode steps at the full batch",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=_BENCH_DEFAULTS["max_batch"],
        help="upper bound of the batch search",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench_out") / "throughput",
        help="directory for throughput.json, throughput.md and throughput.png",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--cache-memory-gb",
        type=float,
        default=None,
        help="device memory for the cache (default: 85%% of free GPU memory, 4 GiB on CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    add_decode_mode_arg(p)
    p.add_argument(
        "--hit-rates",
        type=_hit_rates,
        default=_BENCH_DEFAULTS["hit_rates"],
        help="time ShadowKV once per entry, comma-separated: 'query' (the query selects) or a "
        "share in [0, 1] its selection is driven to keep from step to step (random weights "
        "give hit rates near 0; real models 0.6-0.8); default: query",
    )
    p.add_argument(
        "--prefill",
        choices=["model", "synthetic"],
        default=_BENCH_DEFAULTS["prefill"],
        help="model: prefill every prompt (timed); synthetic: store generated low-rank K/V "
        "instead, to time decode at long context without the prefills (hit rates then are "
        "not a model's)",
    )
    c = p.add_argument_group("shadowkv knobs (shared by all methods)")
    c.add_argument("--sparse-budget", type=budget_or_fraction, default=_CACHE_DEFAULTS["sparse_budget"])
    c.add_argument("--rank", type=budget_or_fraction, default=None)
    c.add_argument("--chunk-size", type=int, default=_CACHE_DEFAULTS["chunk_size"])
    c.add_argument("--outlier-chunks", type=int, default=_CACHE_DEFAULTS["outlier_chunks"])
    c.add_argument("--local-chunks", type=int, default=_CACHE_DEFAULTS["local_chunks"])
    add_value_memory_args(c)
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    for m in args.methods:
        if m not in CACHE_METHODS:
            raise ConfigError(f"unknown method {m!r}; choose from {', '.join(CACHE_METHODS)}")
    cache = cache_config_from_args(args, method="dense")  # BenchConfig sets each method
    return BenchConfig(
        arch=args.arch,
        model_path=args.model,
        contexts=args.contexts,
        methods=args.methods,
        batches=args.batches,
        decode_steps=args.decode_steps,
        max_batch=args.max_batch,
        device=args.device,
        dtype=args.dtype,
        cache_memory_gb=args.cache_memory_gb,
        cache=cache,
        seed=args.seed,
        decode_mode=args.decode_mode,
        prefill=args.prefill,
        hit_rates=args.hit_rates,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    report = run_throughput(cfg, args.out, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(report["table"])
    return 0
