"""The tensor-parallel engine's cost per step on CPU (gloo): TP=1 vs TP=2 through ``LLM.generate``.

A batch of 4 prompts of 64 tokens, ``--new-tokens`` greedy tokens each (EOS ignored), after a
warm-up generate; prints the wall time per generated token (prefill included) and whether TP=2's
tokens equal TP=1's. ``--model tiny`` is a random 2-layer Llama (6/2 heads, d=16): almost no
compute, so its TP=2 time is the per-step overhead (the step message, 2 all-reduces per layer,
the ranks waiting for each other). Each rank uses one CPU thread.

    python benchmarks/tp_engine_step.py --model tiny --new-tokens 64
    python benchmarks/tp_engine_step.py --model qwen2.5-coder-0.5b --new-tokens 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from shadowkv import LLM
from shadowkv.config import EngineConfig
from shadowkv.engine.sampling import SamplingParams
from shadowkv.models.loader import resolve_model


def tiny_checkpoint() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(Path(tempfile.mkdtemp()), "llama", num_heads=6, num_kv_heads=2)


def timed(path: Path, tp: int, prompts: list[list[int]], new: int) -> tuple[float, list]:
    engine = EngineConfig(tensor_parallel=tp, max_model_len=1024, cache_memory_gb=0.5)
    with LLM(str(path), device="cpu", engine=engine) as llm:
        llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
        return time.perf_counter() - start, [o.token_ids for o in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    path = tiny_checkpoint() if args.model == "tiny" else resolve_model(args.model)
    prompts = [list(range(10 + i, 74 + i)) for i in range(4)]
    runs = {tp: timed(path, tp, prompts, args.new_tokens) for tp in (1, 2)}
    for tp, (seconds, _) in runs.items():
        print(f"{args.model} TP={tp}: {seconds:.2f} s, "
              f"{seconds / args.new_tokens * 1000:.1f} ms per step (prefill included)")
    print(f"TP=2 tokens equal TP=1's: {runs[2][1] == runs[1][1]}")


if __name__ == "__main__":
    main()
