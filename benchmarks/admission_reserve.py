"""Optimistic admission on a CPU: worst-case reservation vs ``admission_reserve``.

``N`` short chat questions (answers of a few dozen tokens, ``max_tokens=256``) submitted at once
into a small dense cache: wall time until all are answered, the largest decode batch reached,
preemptions and replayed tokens, per ``EngineConfig.admission_reserve`` (None = reserve all of
``max_tokens`` at admission). Tokens are checked equal across the settings (greedy). All runs
share one process and the same weights.

    python benchmarks/admission_reserve.py --cache-mb 60 --requests 16 --reserves none,32,8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from shadowkv import LLM, DenseConfig, EngineConfig, SamplingParams

QUESTIONS = [
    "What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
    "Which planet is closest to the sun?", "What do bees make?", "Say hello in Spanish.",
    "What is the opposite of hot?", "How many legs does a spider have?",
]


def run(llm: LLM, prompts: list[list[int]], reserve: int | None, cache_mb: float,
        max_tokens: int) -> tuple[dict, list[list[int]]]:
    cfg = EngineConfig(max_num_seqs=len(prompts), cache_memory_gb=cache_mb / 1024,
                       admission_reserve=reserve)
    llm.set_cache(DenseConfig(), cfg)
    engine = llm.engine
    t = time.perf_counter()
    reqs = [engine.add_request(p, SamplingParams(max_tokens=max_tokens)) for p in prompts]
    peak = steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        peak = max(peak, len(engine.running))
    wall = time.perf_counter() - t
    outs = [r.output_ids for r in reqs]
    return {
        "admission_reserve": reserve, "wall_s": round(wall, 2), "steps": steps,
        "peak_batch": peak, "generated": sum(map(len, outs)),
        "preemptions": engine.counters["preemptions"],
        "replayed_tokens": engine.counters["replayed_tokens"],
        "prefill_tokens": engine.counters["prefill_tokens"],
    }, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--cache-mb", type=float, default=60.0)
    ap.add_argument("--reserves", default="none,32,8", help="comma-separated; none = worst case")
    args = ap.parse_args()
    torch.set_num_threads(1)
    llm = LLM(args.model, device="cpu")
    prompts = [llm.encode(QUESTIONS[i % len(QUESTIONS)] + " Answer in a few words.", chat=True)
               for i in range(args.requests)]
    first = None
    for r in args.reserves.split(","):
        row, outs = run(llm, prompts, None if r == "none" else int(r), args.cache_mb,
                        args.max_tokens)
        first = first or outs
        row["same_tokens"] = outs == first
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
