"""Prefill packing: k prompts in one ragged forward vs one forward per prompt (random weights).

``k`` prompts of ``P`` tokens arrive together. "packed": one engine step prefills them all in one
ragged forward (``engine/ragged.py``; the budget fits them). "one by one": the step budget is one
prompt (``max_num_batched_tokens=P``), so each prompt gets a step and a forward of its own — what
the engine did before the ragged forward, measured in the same process on the same weights.
Reports the wall time of the prefills (first tokens of all k) and the ratio, per cache method.
On a GPU a short prefill is launch-bound, which packing is for; on a CPU both cost about the same.

    python benchmarks/prefill_pack.py --arch llama-3.1-8b --prompts 16 --prompt-tokens 512 \\
        --methods dense,shadowkv --out bench_out/pack
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shadowkv import EngineConfig, SamplingParams, method_config
from shadowkv.bench.harness import build_engine
from shadowkv.bench.models import arch_config, random_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_time(engine, prompts: list[list[int]], device: torch.device) -> tuple[float, int]:
    """Seconds until every prompt has its first token, and the engine steps it took."""
    reqs = [engine.add_request(p, SamplingParams(max_tokens=1, ignore_eos=True)) for p in prompts]
    sync(device)
    t0, steps = time.perf_counter(), 0
    while any(r.first_token is None for r in reqs):
        engine.step()
        steps += 1
    sync(device)
    wall = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    return wall, steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama-3.1-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, default=16, help="k prompts arriving together")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--methods", default="dense,shadowkv")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up)")
    p.add_argument("--cache-memory-gb", type=float, default=None)
    p.add_argument("--out", type=Path, default=Path("bench_out/pack"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = arch_config(args.arch)
    model = random_model(cfg, device, dtype)
    gen = torch.Generator().manual_seed(0)
    k, P = args.prompts, args.prompt_tokens
    prompts = [torch.randint(10, cfg.vocab_size, (P,), generator=gen).tolist() for _ in range(k)]
    rows = []
    for method in args.methods.split(","):
        # ShadowKV engages above its sparse budget: a budget under the prompt keeps it sparse.
        knobs = {"sparse_budget": P // 4, "outlier_chunks": 2} if method == "shadowkv" else {}
        times = {}
        for label, budget in (("packed", k * P + 64), ("one_by_one", P)):
            engine = build_engine(
                model, cfg, method_config(method, **knobs),
                EngineConfig(max_model_len=P + 64, max_num_seqs=k, max_num_batched_tokens=budget,
                             cache_memory_gb=args.cache_memory_gb),
                device, dtype,
            )
            prefill_time(engine, prompts, device)  # warm-up (allocator, Triton compiles)
            runs = [prefill_time(engine, prompts, device) for _ in range(args.repeats)]
            times[label] = min(w for w, _ in runs)
            rows.append({"method": method, "mode": label, "prompts": k, "prompt_tokens": P,
                         "best_s": round(times[label], 4), "steps": runs[0][1]})
            print(json.dumps(rows[-1]), flush=True)
            del engine
        rows.append({"method": method, "mode": "speedup",
                     "one_by_one_over_packed": round(times["one_by_one"] / times["packed"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"arch": args.arch, "weights": "random", "device": str(device),
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype), "rows": rows}
    (args.out / "prefill_pack.json").write_text(json.dumps(meta, indent=2))
    lines = ["| method | packed s | one by one s | ratio |", "|---|---|---|---|"]
    for m in args.methods.split(","):
        r = {x["mode"]: x for x in rows if x["method"] == m}
        lines.append(f"| {m} | {r['packed']['best_s']} | {r['one_by_one']['best_s']} | "
                     f"{r['speedup']['one_by_one_over_packed']} |")
    (args.out / "prefill_pack.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
