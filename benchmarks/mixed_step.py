"""Mixed steps: decode rows and prefill chunks in one forward vs two forwards per step.

``R`` requests decode throughout (long ``max_tokens``, EOS ignored) while ``N`` prompts of ``P``
tokens arrive one per step; each step then holds ``R`` decode rows and one prompt. "mixed"
(``EngineConfig.mixed_step``) runs the step as one forward of ``R + P`` rows; "separate" runs the
decode's forward (the decode runner: a CUDA graph on a GPU) and then the prompt's. Both do the
same work in the same steps; reported is the wall time of the ``N`` steps, best of ``--repeats``,
both modes in the same process on the same weights, alternating, and whether their tokens are
equal (required in fp32: the exit status; bf16 GEMMs over other row counts may round apart).

    python benchmarks/mixed_step.py --model smollm2 --methods dense,shadowkv --decodes 8 \\
        --prompts 16 --prompt-tokens 256
    python benchmarks/mixed_step.py --arch llama-3.1-8b --cache-memory-gb 8   # random weights
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shadowkv import LLM, EngineConfig, SamplingParams, method_config
from shadowkv.bench.harness import StubTokenizer
from shadowkv.bench.models import arch_config, random_model
from shadowkv.engine.engine import Engine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(engine: Engine, decodes: int, prompts: list[list[int]], device: torch.device
        ) -> tuple[float, list[list[int]]]:
    """Seconds of the steps that each take one prompt beside the decodes, and every output."""
    vocab = engine.model_cfg.vocab_size
    running = [engine.add_request([(7 * i + j) % (vocab - 10) + 10 for j in range(32)],
                                  SamplingParams(max_tokens=len(prompts) + 4, ignore_eos=True))
               for i in range(decodes)]
    while any(not r.output_ids for r in running):  # the decoders' prefills
        engine.step()
    reqs = []
    sync(device)
    t0 = time.perf_counter()
    for prompt in prompts:
        reqs.append(engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True)))
        engine.step()
        assert engine.last_step == "mixed" and not engine.waiting
    sync(device)
    wall = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    return wall, [r.output_ids for r in running + reqs]


def engines_for(args: argparse.Namespace, method: str, model, cfg, tokenizer, device, dtype
                ) -> dict[str, Engine]:
    """A "mixed" and a "separate" engine of ``method`` over one model."""
    P = args.prompt_tokens
    knobs = {"sparse_budget": P // 4, "outlier_chunks": 2} if method == "shadowkv" else {}
    cache = method_config(method, **knobs)
    engines = {}
    for mode in ("mixed", "separate"):
        e = EngineConfig(max_model_len=2048, max_num_seqs=args.decodes + 2,
                         max_num_batched_tokens=args.decodes + P,
                         cache_memory_gb=args.cache_memory_gb, mixed_step=mode == "mixed")
        engines[mode] = Engine(model, cfg, tokenizer, cache, e, device, dtype)
    return engines


def measure(engines: dict[str, Engine], args: argparse.Namespace, prompts: list[list[int]],
            device: torch.device) -> tuple[dict[str, float], bool]:
    """Best seconds per mode (modes alternating) and whether both gave the same tokens."""
    best: dict[str, float] = {}
    outputs: dict[str, list[list[int]]] = {}
    for engine in engines.values():  # warm-up
        run(engine, args.decodes, prompts[:2], device)
    for _ in range(args.repeats):
        for mode, engine in engines.items():
            wall, outputs[mode] = run(engine, args.decodes, prompts, device)
            best[mode] = min(best.get(mode, wall), wall)
    return best, outputs["mixed"] == outputs["separate"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint (e.g. smollm2): real weights")
    src.add_argument("--arch", default="tiny", help="random weights of a named architecture")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default="dense")
    p.add_argument("--decodes", type=int, default=8, help="requests decoding throughout")
    p.add_argument("--prompts", type=int, default=16, help="prompts arriving, one per step")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per mode (after warm-up)")
    p.add_argument("--cache-memory-gb", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path("bench_out/mixed"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model:
        llm = LLM(args.model, device=str(device))
        cfg, model, tokenizer = llm.engine.model_cfg, llm.engine.model, llm.tokenizer
    else:
        cfg = arch_config(args.arch)
        model, tokenizer = random_model(cfg, device, dtype), StubTokenizer()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, cfg.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
               for _ in range(args.prompts)]
    rows = []
    for method in args.methods.split(","):
        engines = engines_for(args, method, model, cfg, tokenizer, device, dtype)
        best, same = measure(engines, args, prompts, device)
        rows.append({
            "model": args.model or f"{args.arch} (random)", "device": str(device),
            "method": method, "decodes": args.decodes, "prompts": args.prompts,
            "prompt_tokens": args.prompt_tokens, "mixed_s": round(best["mixed"], 4),
            "separate_s": round(best["separate"], 4),
            "separate_over_mixed": round(best["separate"] / best["mixed"], 3),
            # fp32: must hold; bf16 (GPU): GEMMs of other row counts may round differently.
            "same_tokens": same, "dtype": str(dtype), "threads": torch.get_num_threads(),
        })
        print(json.dumps(rows[-1]), flush=True)
        del engines
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixed_step.json").write_text(json.dumps(rows, indent=2))
    lines = ["| method | mixed s | separate s | separate / mixed | same tokens |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['mixed_s']} | {r['separate_s']} | "
              f"{r['separate_over_mixed']} | {r['same_tokens']} |" for r in rows]
    (args.out / "mixed_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fp32_differs = dtype == torch.float32 and not all(r["same_tokens"] for r in rows)
    return 1 if fp32_differs else 0


if __name__ == "__main__":
    raise SystemExit(main())
