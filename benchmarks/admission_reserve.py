"""Optimistic admission on a CPU: worst-case reservation vs ``admission_reserve``.

``N`` chat questions (``max_tokens=256``; six of eight ask for a few words, two for a short
story or explanation, so answers run from a few tokens to ~200) submitted at once
into a small dense cache: wall time until all are answered, the largest decode batch reached,
preemptions and replayed tokens, per ``EngineConfig.admission_reserve`` (None = reserve all of
``max_tokens`` at admission). Tokens are checked equal across the settings (greedy). All runs
share one process and the same weights.

    python benchmarks/admission_reserve.py --cache-mb 30 --requests 16 --reserves none,32,8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from shadowkv import LLM, DenseConfig, EngineConfig, SamplingParams

SHORT = " Answer in a few words."
QUESTIONS = [
    "What is the capital of France?" + SHORT, "Write a short story about a cat.",
    "What is 2 + 2?" + SHORT, "Which planet is closest to the sun?" + SHORT,
    "What do bees make?" + SHORT, "Explain how rain forms.",
    "What is the opposite of hot?" + SHORT, "How many legs does a spider have?" + SHORT,
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
    ap.add_argument("--short-only", action="store_true",
                    help="every question asks for a few words (no story, no explanation)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    llm = LLM(args.model, device="cpu")
    qs = [q for q in QUESTIONS if q.endswith(SHORT)] if args.short_only else QUESTIONS
    prompts = [llm.encode(qs[i % len(qs)], chat=True) for i in range(args.requests)]
    first = None
    for r in args.reserves.split(","):
        row, outs = run(llm, prompts, None if r == "none" else int(r), args.cache_mb,
                        args.max_tokens)
        first = first or outs
        row["same_tokens"] = outs == first
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
