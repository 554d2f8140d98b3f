"""Prefix sharing on a CPU: questions about one document, and a conversation over it.

(a) ``B`` questions (1, 4, 16 by default) about one document, submitted together: wall time until
all are answered, time to first token (mean and max), prompt tokens run through the model, peak
cache bytes (device / host) and what the prefix store holds after — with
``EngineConfig.prefix_cache`` off (the baseline) and on, for each cache method. The cache's bytes
are its pages in use (each once, whoever holds them: requests or, for a cache that shares its own
pages, the store) plus per-sequence state; the store's are its cache pages (device / host) and
its host copies of prefixes' K/V (caches that do not share pages). (b) A 4-turn conversation
over the document, each turn = previous prompt + answer + a new question: time to first token
per turn, off and on.
Every configuration runs in one process on the same weights, so they share the machine's load.

    python benchmarks/prefix_share.py --haystack ../shared/data/pg_essays.jsonl \\
        --doc-tokens 4000 --batches 1,4,16 --methods dense,shadowkv --out bench_out/prefix.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_io import write_rows

from shadowkv import LLM, EngineConfig, SamplingParams, method_config
from shadowkv.cache.methods import CacheConfig
from shadowkv.engine.engine import Engine
from shadowkv.eval.haystack import Haystack

QUESTIONS = [
    "What is the main argument of the text above?",
    "Name one person the author mentions.",
    "Summarise the first paragraph in one sentence.",
    "What advice does the author give?",
    "Which company is discussed?",
    "What does the author say about startups?",
    "What is said about programming languages?",
    "What mistake does the author warn against?",
]


def cache_for(method: str) -> CacheConfig:
    return method_config(method)  # each method's defaults (ShadowKV: the paper's settings)


def engine_for(llm: LLM, share: bool, seqs: int) -> EngineConfig:
    return EngineConfig(
        max_model_len=llm.max_model_len, max_num_seqs=seqs, prefix_cache=share,
        cache_memory_gb=4.0,
    )


def questions(llm: LLM, doc: list[int], n: int) -> list[list[int]]:
    enc = llm.tokenizer.encode
    return [doc + enc(f"\n\nQuestion {i + 1}: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:")
            for i in range(n)]


def cache_bytes(engine: Engine) -> tuple[int, int]:
    """Device and host bytes of the cache's pages in use (each once, whether requests or the
    prefix store hold them) and of its live sequences' fixed state."""
    device = host = 0
    for c in getattr(engine.cache, "parts", [engine.cache]):
        for a in c.allocators.values():
            if a.on_host:
                host += a.num_used * a.page_bytes
            else:
                device += a.num_used * a.page_bytes
        device += sum(c.fixed_bytes(rec) for rec in c.seqs.values())
    return device, host


def run_batch(llm: LLM, method: str, share: bool, prompts: list[list[int]], new: int) -> dict:
    """All ``prompts`` submitted at once; step until every one is answered."""
    llm.set_cache(cache_for(method), engine_for(llm, share, len(prompts)))
    engine = llm.engine
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, SamplingParams(max_tokens=new, ignore_eos=True))
            for p in prompts]
    device = host = 0
    while engine.has_unfinished():
        engine.step()
        now = cache_bytes(engine)
        device, host = max(device, now[0]), max(host, now[1])
    wall = time.perf_counter() - t0
    ttft = [r.first_token - r.arrival for r in reqs]
    store, kept = engine.prefix_store, engine.prefix_memory()
    after = cache_bytes(engine)  # every request ended: the store's pages alone
    engine.clear_prefix_cache()
    assert cache_bytes(engine) == (0, 0), "the cache did not return to idle"
    return {
        "part": "questions", "method": method, "sharing": share, "requests": len(prompts),
        "prompt_tokens": len(prompts[0]),
        "wall_s": round(wall, 2),
        "ttft_mean_s": round(statistics.mean(ttft), 2),
        "ttft_max_s": round(max(ttft), 2),
        "prefilled_tokens": engine.counters["prefill_tokens"],
        "cached_tokens": sum(r.cached_tokens for r in reqs),
        "peak_device_bytes": device,
        "peak_host_bytes": host,
        "idle_device_bytes": after[0],
        "idle_host_bytes": after[1],
        "prefix_shared_device_bytes": kept.device_bytes,
        "prefix_shared_host_bytes": kept.host_bytes,
        "prefix_store_bytes": store.nbytes if store is not None else 0,
    }


def run_conversation(llm: LLM, method: str, share: bool, doc: list[int], turns: int,
                     new: int) -> dict:
    """``turns`` turns, each the previous prompt + its answer + the next question."""
    llm.set_cache(cache_for(method), engine_for(llm, share, 1))
    enc = llm.tokenizer.encode
    prompt, ttft, cached = list(doc), [], []
    for t in range(turns):
        prompt = prompt + enc(f"\n\nQuestion: {QUESTIONS[t % len(QUESTIONS)]}\nAnswer:")
        r = llm.generate(prompt, SamplingParams(max_tokens=new, ignore_eos=True))[0]
        ttft.append(r.metrics["ttft_s"])
        cached.append(r.metrics["cached_tokens"])
        prompt = prompt + r.token_ids
    return {"part": "conversation", "method": method, "sharing": share,
            "ttft_s": [round(x, 2) for x in ttft], "cached_tokens": cached,
            "final_prompt_tokens": len(prompt)}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M)")
    p.add_argument("--haystack", type=Path, required=True, help="essay corpus for the document")
    p.add_argument("--doc-tokens", type=int, default=4000)
    p.add_argument("--batches", default="1,4,16", help="questions submitted together")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=8, help="tokens each answer generates")
    p.add_argument("--methods", default="dense,shadowkv")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, device="cpu")
    words = Haystack.from_path(args.haystack).text(args.doc_tokens)
    doc = llm.tokenizer.encode(words)[: args.doc_tokens]
    rows = []
    for method in args.methods.split(","):
        for b in (int(x) for x in args.batches.split(",")):
            for share in (False, True):
                rows.append(run_batch(llm, method, share, questions(llm, doc, b), args.new_tokens))
                print(json.dumps(rows[-1]), flush=True)
        for share in (False, True):
            rows.append(run_conversation(llm, method, share, doc, args.turns, args.new_tokens))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| method | requests | sharing | wall s | TTFT mean s | TTFT max s | prefilled tokens "
          "| peak device MiB | peak host MiB | store: cache device MiB | store: cache host MiB "
          "| store: host copies MiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    mib = 2**20
    for r in rows:
        if r["part"] != "questions":
            continue
        print(f"| {r['method']} | {r['requests']} | {'on' if r['sharing'] else 'off'} | "
              f"{r['wall_s']} | {r['ttft_mean_s']} | {r['ttft_max_s']} | {r['prefilled_tokens']} "
              f"| {r['peak_device_bytes'] / mib:.1f} | {r['peak_host_bytes'] / mib:.1f} | "
              f"{r['prefix_shared_device_bytes'] / mib:.1f} | "
              f"{r['prefix_shared_host_bytes'] / mib:.1f} | {r['prefix_store_bytes'] / mib:.1f} |")
    print("\n| method | sharing | TTFT per turn s | cached tokens per turn |")
    print("|---|---|---|---|")
    for r in rows:
        if r["part"] == "conversation":
            print(f"| {r['method']} | {'on' if r['sharing'] else 'off'} | "
                  f"{' / '.join(map(str, r['ttft_s']))} | "
                  f"{' / '.join(map(str, r['cached_tokens']))} |")
    if args.out is not None:
        write_rows(args.out, rows, threads=args.threads, doc_tokens=len(doc), model=str(llm.path))


if __name__ == "__main__":
    main()
