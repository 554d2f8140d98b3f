"""Accuracy over a shared prefix: one document, its questions asked as separate requests.

Each document is a RULER ``niah_multiquery`` sample (four key/value needles in an essay
haystack). Instead of one prompt asking for all four values, every key gets its own request:
the same document followed by "What is the special magic number for <key> ...?". With
``EngineConfig.prefix_cache`` on, the first request of a document prefills it and the other three
start from its stored prefix (in ShadowKV: its shared low-rank keys, landmarks and values; the
question is prefilled attending to them); with it off every request prefills its own full prompt
(the baseline). Both runs score every answer with the RULER metric (the value must appear) and
count the answers that are word for word the same. ``--modes own`` runs the baseline alone and
``--own-from FILE`` takes it from such a run (greedy decoding of the same prompts: its answers do
not depend on when it ran, as long as the unshared path is unchanged).

    python benchmarks/prefix_accuracy.py --model qwen2.5-coder-0.5b --length 8192 --docs 4 \\
        --haystack ../shared/data/pg_essays.jsonl --out bench_out/prefix_accuracy.json
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
from shadowkv.eval.haystack import Haystack
from shadowkv.eval.metrics import score
from shadowkv.eval.ruler import generate_samples
from shadowkv.eval.ruler_spec import NIAH_ANSWER_PREFIX, NIAH_TEMPLATE
from shadowkv.eval.ruler_tasks import _fill, _singular

TASK = "niah_multiquery"


def split_questions(sample, keys: list[str]) -> list[tuple[str, str]]:
    """``(prompt, value)`` per key of a multi-query sample: its text with the question about all
    keys replaced by one about that key alone (RULER's singular wording)."""
    query = ", ".join(keys[:-1]) + ", and " + keys[-1]
    tail = NIAH_TEMPLATE.split("{context}")[1]
    asked = _fill(tail, type_needle_v="numbers", query=query)
    if sample.input.count(asked) != 1:
        raise ValueError(f"sample {sample.index}: its question is not where the template puts it")
    out = []
    for key, value in zip(keys, sample.outputs):
        one = _fill(_singular(tail), type_needle_v="number", query=key)
        prefix = _fill(_singular(NIAH_ANSWER_PREFIX), type_needle_v="number", query=key)
        out.append((sample.input.replace(asked, one) + prefix, value))
    return out


def sample_keys(sample) -> list[str]:
    """The queried keys, in the order of ``sample.outputs`` (read back from the answer prefix)."""
    head = _fill(NIAH_ANSWER_PREFIX, type_needle_v="numbers", query="\0").split("\0")
    query = sample.answer_prefix.removeprefix(head[0]).removesuffix(head[1])
    first, last = query.rsplit(", and ", 1)
    return [*first.split(", "), last]


def run(llm: LLM, cache, share: bool, prompts: list[list[int]], new: int, seqs: int) -> dict:
    llm.set_cache(cache, EngineConfig(
        max_model_len=llm.max_model_len, max_num_seqs=seqs, prefix_cache=share,
        cache_memory_gb=4.0,
    ))
    t0 = time.perf_counter()
    results = llm.generate(prompts, SamplingParams(max_tokens=new))
    return {"wall_s": round(time.perf_counter() - t0, 1), "results": results}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M)")
    p.add_argument("--haystack", type=Path, required=True, help="essay corpus")
    p.add_argument("--length", type=int, default=8192, help="tokens per document prompt")
    p.add_argument("--docs", type=int, default=4, help="documents (4 questions each)")
    p.add_argument("--first-doc", type=int, default=0, help="index of the first document")
    p.add_argument("--method", default="shadowkv", help="cache method spec, e.g. shadowkv")
    p.add_argument("--budget", type=float, default=None, help="sparse budget (tokens or fraction)")
    p.add_argument("--outlier-chunks", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seqs", type=int, default=4, help="max_num_seqs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", default="own,shared", help="own (baseline), shared, or both")
    p.add_argument("--own-from", type=Path, default=None,
                   help="the baseline's answers from an earlier --modes own run's --out file")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, device="cpu")
    tok = llm.tokenizer
    chat = (lambda t: tok.apply_chat_template([{"role": "user", "content": t}])) if (
        tok.has_chat_template) else None
    samples = generate_samples(
        TASK, tok, args.length, args.first_doc + args.docs,
        haystack=Haystack.from_path(args.haystack), chat_template=chat,
    )[args.first_doc:]
    special = not tok.has_chat_template
    items = []  # (doc index, key index, prompt ids, value)
    for s in samples:
        for j, (text, value) in enumerate(split_questions(s, sample_keys(s))):
            items.append((s.index, j, tok.encode(text, add_special_tokens=special), value))
    overrides = {}
    if args.budget is not None:
        overrides["sparse_budget"] = args.budget
    if args.outlier_chunks is not None:
        overrides["outlier_chunks"] = args.outlier_chunks
    cache = method_config(args.method, **overrides)
    prompts = [ids for _, _, ids, _ in items]
    modes = args.modes.split(",")
    runs = {share: run(llm, cache, share, prompts, args.max_new_tokens, args.seqs)
            for share in (False, True) if ("shared" if share else "own") in modes}
    earlier = None
    if args.own_from is not None:
        earlier = json.loads(args.own_from.read_text())
        if [(r["doc"], r["key"], r["prompt_tokens"]) for r in earlier["rows"]] != [
            (d, k, len(ids)) for d, k, ids, _ in items
        ]:
            raise SystemExit(f"{args.own_from} holds other prompts than this run's")
    rows = []
    for i, (doc, key, ids, value) in enumerate(items):
        row = {"doc": doc, "key": key, "prompt_tokens": len(ids), "value": value}
        if earlier is not None:
            row.update({k: v for k, v in earlier["rows"][i].items() if k.startswith("own_")})
        for share, r in runs.items():
            res = r["results"][i]
            tag = "shared" if share else "own"
            row[f"{tag}_text"] = res.text
            row[f"{tag}_score"] = 100 * score(TASK, res.text, [value])["ruler"]
            row[f"{tag}_cached_tokens"] = res.metrics["cached_tokens"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if "own_score" not in rows[0] or "shared_score" not in rows[0]:
        if args.out is not None:
            write_rows(args.out, rows, model=str(llm.path), length=args.length,
                       method=args.method, overrides=overrides,
                       wall_s={str(k): r["wall_s"] for k, r in runs.items()})
        return
    wall = {share: runs[share]["wall_s"] if share in runs else None for share in (False, True)}
    if earlier is not None:
        wall[False] = earlier["meta"]["wall_s"].get("False")
    own = statistics.mean(r["own_score"] for r in rows)
    shared = statistics.mean(r["shared_score"] for r in rows)
    same = sum(r["own_text"] == r["shared_text"] for r in rows)
    print(f"\n| model | method | docs x questions | own prompt | shared prefix | same answer "
          "| cached tokens | wall own s | wall shared s |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|\n"
          f"| {Path(str(llm.path)).name} | {args.method} {overrides} | {len(samples)} x 4 | "
          f"{own:.1f} | {shared:.1f} | {same}/{len(rows)} | "
          f"{sum(r['shared_cached_tokens'] for r in rows)} | {wall[False]} | {wall[True]} |")
    if args.out is not None:
        write_rows(args.out, rows, model=str(llm.path), length=args.length, method=args.method,
                   overrides=overrides, own_score=own, shared_score=shared, same=same,
                   wall_s={str(k): v for k, v in wall.items()})


if __name__ == "__main__":
    main()
