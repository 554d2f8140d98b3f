"""ShadowKV rank x sparse-budget study against dense attention on passkey retrieval.

For each model, context length and passkey prompt, dense attention generates 32 greedy tokens
once; every (rank, budget) ShadowKV configuration then decodes the same prompt and is scored
against it. Prefill attention is exact in every method, so the dense prefill's per-layer
``q, k, v, k_pre`` are recorded and replayed into each ShadowKV cache instead of rerunning the
model over the prompt (the decoder's prefill activations do not depend on the cache method).
The first generated token therefore equals dense's for every configuration.

Each configuration decodes two copies of the prompt in one batch:
- free-running: feeds back its own greedy tokens (passkey accuracy, prefix agreement);
- teacher-forced: feeds dense's tokens and checks whether its greedy choice equals dense's next
  token at each of the 32 positions (top-1 agreement; token 1 comes from the exact prefill).
The hit rate reported is the mean over layers of ``cache.hit_rate()`` over both copies.

Rows are appended to a JSONL file as they finish and skipped on rerun, so the study resumes.

    python benchmarks/rank_study.py --model smollm2 --lengths 2048 4096 --ranks 16 32 48 96 192 \
        --budgets 128 256 512 --outliers 8 16
    python benchmarks/rank_study.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from shadowkv.cache import make_cache
from shadowkv.cache.methods import CacheConfig, ShadowKVConfig
from shadowkv.config import EngineConfig
from shadowkv.engine.prompt_kv import PromptKV
from shadowkv.engine.sampling import SamplingParams
from shadowkv.eval.haystack import Haystack
from shadowkv.llm import LLM

REPO = Path(__file__).resolve().parents[1]
PG_ESSAYS = REPO.parent / "shared" / "data" / "pg_essays.jsonl"
NEW_TOKENS = 32
INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it.\n\n"
)
QUESTION = "\n\nWhat is the secret passkey? The secret passkey is"


@dataclass(frozen=True)
class PasskeyPrompt:
    depth: int  # percent of the haystack before the needle
    sample: int
    passkey: str
    ids: list[int]


def passkey_prompt(
    llm: LLM, hay: Haystack, length: int, depth: int, sample: int, seed: str
) -> PasskeyPrompt:
    """A prompt of at most ``length`` tokens with the needle after ``depth``% of the haystack."""
    rng = random.Random(f"{seed}:{length}:{depth}:{sample}")
    passkey = str(rng.randint(10000, 99999))
    needle = f" The secret passkey is {passkey}. "

    def build(num_words: int) -> list[int]:
        words = hay.text(num_words).split(" ")
        cut = int(len(words) * depth / 100)
        # Move the needle to the next sentence end so it does not split a sentence.
        while 0 < cut < len(words) and not re.search(r"[.!?][\"')]*$", words[cut - 1]):
            cut += 1
        text = " ".join(words[:cut]) + needle + " ".join(words[cut:])
        return llm.encode(INSTRUCTION + text.strip() + QUESTION)

    words = length * 3 // 4
    for _ in range(4):  # tokens per word differ by tokenizer: rescale until close below `length`
        n = len(build(words))
        if length - 64 <= n <= length:
            break
        words = int(words * (length - 32) / n)
    ids = build(words)
    while len(ids) > length:
        words -= 16
        ids = build(words)
    return PasskeyPrompt(depth, sample, passkey, ids)


def prompts(
    llm: LLM, hay: Haystack, length: int, depths: list[int], samples: int, seed: str
) -> Iterator[PasskeyPrompt]:
    # Sample-major: every depth gets its first sample before any gets a second.
    for s in range(samples):
        for d in depths:
            yield passkey_prompt(llm, hay, length, d, s, seed)


def run_dense(llm: LLM, ids: list[int]) -> tuple[list[int], PromptKV]:
    """Dense greedy tokens, and the prompt's recorded prefill for the ShadowKV runs to replay."""
    engine = llm.engine
    req = engine.add_request(
        ids, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True), record_prompt_kv=True
    )
    while engine.has_unfinished():
        engine.step()
    assert req.prompt_kv is not None
    return req.output_ids, req.prompt_kv


def run_shadow(
    llm: LLM, cfg: CacheConfig, rec: PromptKV, n: int, dense: list[int]
) -> tuple[list[int], list[bool], list[float]]:
    """Free-running tokens, teacher-forced matches and per-layer hit rates of one configuration."""
    engine = llm.engine
    cache = make_cache(
        engine.model.attention_specs(), cfg, engine.rope, engine.device, engine.dtype, 2,
        engine.max_model_len, 2**30,
    )
    for sid in (0, 1):  # 0 free-running, 1 teacher-forced
        cache.add_sequence(sid, n, NEW_TOKENS)
        cache.begin_prefill(sid, n)
        rec.replay(cache)
        cache.end_prefill()
    free, matches = [dense[0]], [True]
    for t in range(1, NEW_TOKENS):
        cache.begin_decode([0, 1])
        ids = torch.tensor([free[-1], dense[t - 1]], device=engine.device)
        pos = torch.tensor([cache.length(0), cache.length(1)], device=engine.device)
        logits = engine.model(ids, engine.model.context("decode", pos, engine.rope, cache))
        cache.end_decode()
        top = logits.argmax(-1).tolist()
        free.append(top[0])
        matches.append(top[1] == dense[t])
    rates = cache.hit_rate()  # type: ignore[attr-defined]
    for sid in (0, 1):
        cache.free_sequence(sid)
    return free, matches, rates


def prefix_agreement(a: list[int], b: list[int]) -> int:
    """Tokens identical to dense before the first divergence."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def config_key(row: dict) -> tuple:
    return (
        row["model"],
        row["length"],
        row["depth"],
        row["sample"],
        row.get("rank"),
        row.get("budget"),
        row.get("outliers"),
    )


def study(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rows = load_rows(args.out)
    done = {config_key(r) for r in rows}
    llm = LLM(
        args.model_path or args.model,
        engine=EngineConfig(max_num_seqs=1, max_model_len=args.max_model_len),
    )
    kv_dim = llm.model_config.kv_dim
    hay = Haystack.from_path(args.haystack)
    for length, outliers in zip(args.lengths, args.outliers):
        grid = [(r, b) for r in args.ranks for b in args.budgets]
        for p in prompts(llm, hay, length, args.depths, args.samples, args.seed):
            base = {"model": args.model, "length": length, "depth": p.depth, "sample": p.sample}
            todo = [
                (r, b)
                for r, b in grid
                if config_key({**base, "rank": r, "budget": b, "outliers": outliers}) not in done
            ]
            dense_key = config_key({**base})
            if not todo and dense_key in done:
                continue
            t0 = time.perf_counter()
            dense, rec = run_dense(llm, p.ids)
            text = llm.tokenizer.decode(dense)
            common = {**base, "prompt_tokens": len(p.ids), "passkey": p.passkey}
            if dense_key not in done:
                row = {**common, "method": "dense", "tokens": dense, "text": text,
                       "correct": p.passkey in text, "seconds": round(time.perf_counter() - t0, 1)}
                append_row(args.out, row)
                done.add(dense_key)
            print(f"[{args.model} {length} d{p.depth} s{p.sample}] dense {len(p.ids)} tok, "
                  f"{time.perf_counter() - t0:.0f}s: {text!r}", flush=True)
            for rank, budget in todo:
                if rank > kv_dim:
                    continue
                t0 = time.perf_counter()
                cfg = ShadowKVConfig(sparse_budget=budget, rank=rank,
                                  outlier_chunks=outliers, local_chunks=args.local_chunks)
                free, matches, rates = run_shadow(llm, cfg, rec, len(p.ids), dense)
                out_text = llm.tokenizer.decode(free)
                valid = [r for r in rates if not math.isnan(r)]
                row = {
                    **common, "method": "shadowkv", "rank": rank, "budget": budget,
                    "outliers": outliers,
                    "local_chunks": args.local_chunks, "tokens": free, "text": out_text,
                    "correct": p.passkey in out_text,
                    "prefix_agree": prefix_agreement(free, dense) / NEW_TOKENS,
                    "position_agree": sum(x == y for x, y in zip(free, dense)) / NEW_TOKENS,
                    "tf_agree": sum(matches) / NEW_TOKENS,
                    "hit_rate": sum(valid) / len(valid) if valid else None,
                    "hit_rate_layers": [round(r, 4) for r in rates],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                append_row(args.out, row)
                done.add(config_key(row))
                print(
                    f"  r={rank:<3} b={budget:<4} tf={row['tf_agree']:.2f} "
                    f"prefix={row['prefix_agree']:.2f} hit={row['hit_rate'] or 0:.2f} "
                    f"ok={row['correct']} {row['seconds']}s",
                    flush=True,
                )
            del rec


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def report(rows: list[dict]) -> str:
    """Markdown table: one line per (model, length, rank, budget), dense first per model/length."""
    latest = {config_key(r): r for r in rows}  # a configuration rerun counts once
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in latest.values():
        groups[(r["model"], r["length"], r.get("rank") or 0, r.get("budget") or 0)].append(r)
    lines = [
        "| model | ctx | rank | budget | outliers | n | TF top-1 agree | prefix agree "
        "| position agree | passkey acc | hit rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, _length, rank, budget), rs in sorted(groups.items()):
        n = len(rs)
        acc = f"{sum(r['correct'] for r in rs)}/{n}"
        toks = mean([r["prompt_tokens"] for r in rs])
        ctx = f"{toks:.0f}"
        if rs[0]["method"] == "dense":
            lines.append(f"| {model} | {ctx} | dense | - | - | {n} | 1 | 1 | 1 | {acc} | - |")
            continue
        hits = [r["hit_rate"] for r in rs if r["hit_rate"] is not None]
        lines.append(
            f"| {model} | {ctx} | {rank} | {budget} | {rs[0]['outliers']} | {n} | "
            f"{mean([r['tf_agree'] for r in rs]):.3f} | "
            f"{mean([r['prefix_agree'] for r in rs]):.3f} | "
            f"{mean([r['position_agree'] for r in rs]):.3f} | {acc} | {mean(hits):.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default="smollm2",
        help="name recorded in the results (and loaded unless --model-path)",
    )
    ap.add_argument(
        "--model-path",
        default=None,
        help="checkpoint dir or .gguf; 'qwen-coder' assembles the packaged GGUF",
    )
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument(
        "--outliers", type=int, nargs="+", default=[8, 16], help="outlier chunks, one per length"
    )
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 48, 96, 192])
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--local-chunks", type=int, default=4)
    ap.add_argument("--depths", type=int, nargs="+", default=[25, 50, 75])
    ap.add_argument("--samples", type=int, default=1, help="prompts per depth")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", default="rank-study")
    ap.add_argument("--haystack", type=Path, default=PG_ESSAYS)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "rank_study.jsonl")
    ap.add_argument("--report", action="store_true", help="print the table from --out and exit")
    args = ap.parse_args(argv)
    if len(args.outliers) != len(args.lengths):
        ap.error(
            f"--outliers needs one value per length ({len(args.lengths)}), "
            f"got {len(args.outliers)}"
        )
    if args.model_path == "qwen-coder":
        from shadowkv.models.offline import qwen_coder_gguf

        args.model_path = str(qwen_coder_gguf())
    if not args.report:
        study(args)
    print(report(load_rows(args.out)))


if __name__ == "__main__":
    sys.exit(main())
