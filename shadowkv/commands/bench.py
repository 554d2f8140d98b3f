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
from shadowkv.commands.flags import (
    add_cache_flags,
    add_engine_flags,
    cache_config_from_args,
    engine_config_from_args,
)

_BENCH_DEFAULTS = {f.name: f.default for f in fields(BenchConfig)}
# Set per run by run_throughput: --max-batch, the contexts, whole prompts one per step.
_ENGINE_PER_RUN = (
    "max_num_seqs", "max_model_len", "chunked_prefill", "max_num_batched_tokens"
)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _hit_rates(text: str) -> tuple[float | None, ...]:
    try:
        return tuple(
            None if x.strip() == "query" else float(x) for x in text.split(",") if x.strip()
        )
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
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument(
        "--shared-document",
        type=int,
        default=0,
        metavar="Q",
        help="also time every method with prompts that share one document (context - Q tokens) "
        "and end with their own Q-token question, prefix sharing on: the document is prefilled "
        "once and the largest batch counts its shared pages once (rows '<method>+shared')",
    )
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    add_engine_flags(p.add_argument_group("engine"), skip=_ENGINE_PER_RUN)
    default_methods = tuple(c.method for c in _BENCH_DEFAULTS["caches"])
    c = p.add_argument_group("cache methods and their knobs")
    add_cache_flags(c, multiple=True, default=default_methods)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    caches = tuple(cache_config_from_args(args, m) for m in args.methods)
    return BenchConfig(
        arch=args.arch,
        model_path=args.model,
        contexts=args.contexts,
        caches=caches,
        batches=args.batches,
        decode_steps=args.decode_steps,
        max_batch=args.max_batch,
        device=args.device,
        engine=engine_config_from_args(args),  # _ENGINE_PER_RUN: set by run_throughput
        seed=args.seed,
        prefill=args.prefill,
        hit_rates=args.hit_rates,
        shared_document=args.shared_document,
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
