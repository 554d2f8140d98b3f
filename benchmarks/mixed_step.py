"""Mixed steps: decode rows and prefill chunks in one forward vs two forwards per step.

``R`` requests decode throughout (long ``max_tokens``, EOS ignored) while ``N`` prompts of ``P``
tokens arrive one per step; each step then holds ``R`` decode rows and one prompt. "mixed"
(``EngineConfig.mixed_step``) runs the step as one forward of ``R + P`` rows; "separate" runs the
decode's forward and then the prompt's. Both do the same work in the same steps (tokens equal:
checked); reported is the wall time of the ``N`` steps, best of ``--repeats``, both modes in the
same process on the same weights, alternating. On a GPU the decode forward of a few rows is
launch-bound, which one forward saves; on a CPU the step is compute-bound and both cost about the
same.

    python benchmarks/mixed_step.py --model smollm2 --decodes 8 --prompts 16 --prompt-tokens 256
    python benchmarks/mixed_step.py --arch llama-3.1-8b --out bench_out/mixed     # random weights
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shadowkv import LLM, EngineConfig, SamplingParams, method_config
from shadowkv.bench.harness import build_engine
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
    engine.step()  # the decoders' prefills
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint (e.g. smollm2): real weights")
    src.add_argument("--arch", default="tiny", help="random weights of a named architecture")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--method", default="dense")
    p.add_argument("--decodes", type=int, default=8, help="requests decoding throughout")
    p.add_argument("--prompts", type=int, default=16, help="prompts arriving, one per step")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per mode (after warm-up)")
    p.add_argument("--cache-memory-gb", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path("bench_out/mixed"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    P = args.prompt_tokens
    engine_kw = dict(max_model_len=2048, max_num_seqs=args.decodes + 2,
                     max_num_batched_tokens=args.decodes + P, cache_memory_gb=args.cache_memory_gb)
    knobs = {"sparse_budget": P // 4, "outlier_chunks": 2} if args.method == "shadowkv" else {}
    cache = method_config(args.method, **knobs)
    engines: dict[str, Engine] = {}
    if args.model:
        llm = LLM(args.model, device=str(device))
        cfg, model = llm.engine.model_cfg, llm.engine.model
        for mode in ("mixed", "separate"):
            e = EngineConfig(mixed_step=mode == "mixed", **engine_kw)  # type: ignore[arg-type]
            engines[mode] = Engine(model, cfg, llm.tokenizer, cache, e, device, dtype)
    else:
        cfg = arch_config(args.arch)
        model = random_model(cfg, device, dtype)
        for mode in ("mixed", "separate"):
            e = EngineConfig(mixed_step=mode == "mixed", **engine_kw)  # type: ignore[arg-type]
            engines[mode] = build_engine(model, cfg, cache, e, device, dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, cfg.vocab_size, (P,), generator=gen).tolist()
               for _ in range(args.prompts)]
    best: dict[str, float] = {}
    outputs: dict[str, list[list[int]]] = {}
    for engine in engines.values():  # warm-up
        run(engine, args.decodes, prompts[:2], device)
    for _ in range(args.repeats):
        for mode, engine in engines.items():
            wall, outputs[mode] = run(engine, args.decodes, prompts, device)
            best[mode] = min(best.get(mode, wall), wall)
    same = outputs["mixed"] == outputs["separate"]
    row = {"model": args.model or f"{args.arch} (random)", "device": str(device),
           "method": args.method, "decodes": args.decodes, "prompts": args.prompts,
           "prompt_tokens": P, "mixed_s": round(best["mixed"], 4),
           "separate_s": round(best["separate"], 4),
           "separate_over_mixed": round(best["separate"] / best["mixed"], 3),
           "same_tokens": same, "threads": torch.get_num_threads()}
    print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixed_step.json").write_text(json.dumps(row, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
