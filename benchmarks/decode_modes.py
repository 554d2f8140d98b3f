"""Decode step time with and without CUDA graphs, both measured in one run on one model.

For each cache method and batch size, times full-batch decode steps with ``decode_mode=eager``
(exact shapes, launched op by op) and with the fixed-shape step captured as a CUDA graph
(``graph``; on a CPU, ``static``: the same padded step uncaptured, which shows its padding cost
and nothing about launches). Dense rows also give the step's share of the memory roofline
(weights + K/V bytes over the measured copy bandwidth).

    python benchmarks/decode_modes.py --arch llama-3.1-8b --context 4096 --batches 1,8,32 \\
        --prefill synthetic --host-memory-gb 4 --out bench_out/decode_modes
    python benchmarks/decode_modes.py --arch tiny --device cpu --context 512 --batches 1,4 \\
        --decode-steps 8 --sparse-budget 64 --outlier-chunks 2   # CPU smoke run (eager, static)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from shadowkv.bench.engines import load_model
from shadowkv.bench.harness import build_engine, max_batch, timed_run
from shadowkv.bench.models import ARCHITECTURES
from shadowkv.bench.roofline import copy_bandwidth, dense_step_bytes
from shadowkv.bench.throughput import BenchConfig
from shadowkv.cache.methods import method_config
from shadowkv.config import EngineConfig, parse_budget
from shadowkv.engine.engine import pick_dtype


def measure(args: argparse.Namespace) -> dict:
    knobs = dict(sparse_budget=args.sparse_budget, outlier_chunks=args.outlier_chunks,
                 host_memory_gb=args.host_memory_gb)
    cfg = BenchConfig(
        arch=args.arch, contexts=(args.context,),
        caches=tuple(method_config(m, **knobs) for m in args.methods),
        batches=tuple(args.batches), decode_steps=args.decode_steps, device=args.device,
        engine=EngineConfig(cache_memory_gb=args.cache_memory_gb),
    )
    device = cfg.torch_device
    dtype = pick_dtype(cfg.engine.dtype, device)
    modes = ("eager", "graph" if device.type == "cuda" else "static")
    model_cfg, model, weights = load_model(cfg.arch, cfg.model_path, cfg.seed, device, dtype)
    bandwidth = copy_bandwidth(device)
    rows = []
    for cache_cfg in cfg.caches:
        method = cache_cfg.method
        for mode in modes:
            engine_cfg = EngineConfig(
                max_num_seqs=max(cfg.batches), max_model_len=cfg.max_model_len,
                cache_memory_gb=cfg.engine.cache_memory_gb, chunked_prefill=False,
                decode_mode=mode,
            )
            engine = build_engine(model, model_cfg, cache_cfg, engine_cfg, device, dtype)
            fits = max_batch(engine.cache, args.context, cfg.decode_steps, max(cfg.batches))
            for batch in cfg.batches:
                row = {"method": method, "mode": mode, "batch": batch}
                if batch > fits:
                    row["error"] = f"does not fit (max batch {fits})"
                else:
                    r = timed_run(engine, args.context, batch, cfg.decode_steps, seed=cfg.seed,
                                  prefill=args.prefill)
                    step_s = r.decode_s / r.decode_steps
                    row.update(ms_per_step=round(1000 * step_s, 3),
                               tokens_per_s=round(r.decode_tokens_per_s, 1))
                    if method == "dense":
                        nbytes = dense_step_bytes(
                            model, model_cfg, dtype, args.context, batch, cfg.decode_steps
                        )
                        row["roofline_share"] = round(nbytes / step_s / bandwidth, 4)
                    row["captures"] = engine.runner.captures
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
                if args.out is not None:  # each row as it is measured: a cut-short run keeps them
                    args.out.mkdir(parents=True, exist_ok=True)
                    with open(args.out / "rows.jsonl", "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(row) + "\n")
            engine.cache = engine.runner = None  # type: ignore[assignment]  # free before next
            if device.type == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device_name": name, "arch": args.arch, "weights": weights, "context": args.context,
        "decode_steps": cfg.decode_steps, "dtype": str(dtype).removeprefix("torch."),
        "copy_bandwidth_gbps": round(bandwidth / 1e9, 1), "modes": modes, "rows": rows,
    }


def table(report: dict) -> str:
    """One line per (method, batch): both modes' step times and their ratio."""
    eager_mode, fast_mode = report["modes"]
    by = {(r["method"], r["batch"], r["mode"]): r for r in report["rows"]}
    lines = [
        f"{report['arch']} ({report['weights']}), {report['dtype']}, context {report['context']}, "
        f"{report['decode_steps']} timed steps, {report['device_name']}",
        "",
        f"| method | batch | {eager_mode} ms/step | {fast_mode} ms/step | speedup | "
        f"{fast_mode} tok/s | roofline share ({eager_mode} / {fast_mode}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, batch in dict.fromkeys((r["method"], r["batch"]) for r in report["rows"]):
        a, b = by[(method, batch, eager_mode)], by[(method, batch, fast_mode)]
        if "error" in a or "error" in b:
            lines.append(f"| {method} | {batch} | {a.get('error', '')} {b.get('error', '')} |")
            continue
        share = "-"
        if "roofline_share" in a:
            share = f"{a['roofline_share']:.2f} / {b['roofline_share']:.2f}"
        lines.append(
            f"| {method} | {batch} | {a['ms_per_step']:.2f} | {b['ms_per_step']:.2f} | "
            f"{a['ms_per_step'] / b['ms_per_step']:.2f}x | {b['tokens_per_s']:.1f} | {share} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHITECTURES))
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--methods", type=lambda s: s.split(","), default=["dense", "shadowkv"])
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--sparse-budget", type=parse_budget, default=2048)
    p.add_argument("--outlier-chunks", type=int, default=48)
    p.add_argument("--device", default=None)
    p.add_argument("--cache-memory-gb", type=float, default=None)
    p.add_argument("--host-memory-gb", type=float, default=None,
                   help="ShadowKV's host value tier (default: automatic)")
    p.add_argument("--prefill", choices=["model", "synthetic"], default="model",
                   help="synthetic: store generated K/V instead of prefilling (decode is timed)")
    p.add_argument("--out", type=Path, default=Path("bench_out/decode_modes"))
    args = p.parse_args()
    report = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_modes.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(report)
    (args.out / "decode_modes.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
