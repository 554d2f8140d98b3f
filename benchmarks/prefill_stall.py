"""How long running sequences stall while a long prompt prefills, with and without chunking.

One short request decodes; after its 4th token a long prompt arrives. The script records the
short request's token timestamps and reports its largest and median gap between tokens, and the
long request's time to first token, for each step token budget
(``EngineConfig.max_num_batched_tokens`` with chunked prefill; ``none``: whole-prompt prefill,
``chunked_prefill=False``) and cache method, all in one process on the same weights (so the
settings are compared under the same machine load).

    python benchmarks/prefill_stall.py --haystack ../shared/data/pg_essays.jsonl \\
        --long-tokens 6000 --budgets none,2048,512 --methods dense,shadowkv \\
        --out bench_out/stall.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_io import write_rows

from shadowkv import LLM, DenseConfig, EngineConfig, SamplingParams, method_config
from shadowkv.eval.haystack import Haystack

JOIN_AFTER = 4  # the long prompt arrives after the short request's 4th token


def measure(
    llm: LLM, method: str, budget: int | None, short: list[int], long: list[int], new: int
) -> dict:
    if method == "dense":
        cache = DenseConfig()
    else:
        cache = method_config(method, sparse_budget=256, outlier_chunks=8)
    chunking = {"chunked_prefill": False} if budget is None else {"max_num_batched_tokens": budget}
    cfg = EngineConfig(max_model_len=llm.max_model_len, max_num_seqs=2, **chunking)
    llm.set_cache(cache, cfg)
    engine = llm.engine
    a = engine.add_request(short, SamplingParams(max_tokens=new, ignore_eos=True))
    b = None
    stamps: list[float] = []
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        stamps += [now for o in outs if o.request is a]
        if b is None and len(a.output_ids) == JOIN_AFTER:
            b = engine.add_request(long, SamplingParams(max_tokens=2, ignore_eos=True))
    assert b is not None and b.first_token is not None
    gaps = [y - x for x, y in zip(stamps[JOIN_AFTER - 1 :], stamps[JOIN_AFTER:])]
    return {
        "method": method,
        "step_budget": budget,
        "short_max_gap_s": round(max(gaps), 3),
        "short_median_gap_s": round(statistics.median(gaps), 3),
        "long_ttft_s": round(b.first_token - b.arrival, 3),
        "short_tokens": len(a.output_ids),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M)")
    p.add_argument("--haystack", type=Path, required=True, help="essay corpus for the long prompt")
    p.add_argument("--long-tokens", type=int, default=6000)
    p.add_argument("--short-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=40, help="tokens the short request makes")
    p.add_argument(
        "--budgets", default="none,2048,512",
        help="max_num_batched_tokens values with chunked prefill; none = whole prompts"
    )
    p.add_argument("--methods", default="dense,shadowkv")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, device="cpu")
    ids = llm.tokenizer.encode(Haystack.from_path(args.haystack).text(args.long_tokens))
    long, short = ids[: args.long_tokens], ids[-args.short_tokens :]
    budgets = [None if s.strip() == "none" else int(s) for s in args.budgets.split(",")]
    rows = []
    for method in args.methods.split(","):
        for s in budgets:
            rows.append(measure(llm, method, s, short, long, args.decode_tokens))
            print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| method | step budget (chunked) | short request: max gap s | median gap s "
        "| long prompt TTFT s |"
    )
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['step_budget'] or 'whole'} | {r['short_max_gap_s']} | "
              f"{r['short_median_gap_s']} | {r['long_ttft_s']} |")
    if args.out is not None:
        write_rows(args.out, rows, threads=args.threads, long_tokens=len(long), model=str(llm.path))


if __name__ == "__main__":
    main()
