"""Our engine vs Hugging Face transformers ``generate`` on the same model, side by side.

Both run the same checkpoint (SmolLM2-135M by default) in fp32 on the CPU, on the same prompts
(PG-essay text cut to exactly ``--prompt-tokens`` ids), greedy, with EOS ignored so both make
exactly ``--new-tokens`` (N) tokens per sequence. For each batch size B and prompt length T:

- prefill tokens/s = B * T / time(generate 1 token)
- decode tokens/s  = B * N / (time(generate N + 1 tokens) - time(generate 1 token))
- step decode tokens/s = B / (mean wall time of one decode step with all B sequences decoding),
  from per-step timestamps of the (N + 1)-token run (an HF streamer; our engine's step loop).
  It does not subtract two long, noisy times, so it is the steadier figure on a busy machine.

Every figure is also given in CPU seconds of this process (``time.process_time``), which other
processes on a shared machine disturb far less than wall time; use ``--threads 1`` for that.
HF batches are left-padded with an attention mask. Our engine is driven through its public step
loop (``Engine.add_request`` + ``Engine.step``, what ``LLM.generate`` does); it interleaves
prefills with decode steps, which the end-to-end decode figure includes.

    .venv/bin/python benchmarks/bench_hf.py --batches 1,8 --new-tokens 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "pg_essays.jsonl"
SYNTHETIC_SENTENCE = (
    "The river kept its own counsel through the long valley, and every town along it told a "
    "different story about where the water came from and where it meant to go. "
)
CLOCKS = ("wall", "cpu")


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


@dataclass
class Run:
    """One generate call: total (wall, cpu) seconds, full-batch decode step times, tokens."""

    total: tuple[float, float]
    steps: list[tuple[float, float]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)

    def step_mean(self, clock: int) -> float | None:
        return statistics.mean(s[clock] for s in self.steps) if self.steps else None


class StepClock:
    """An HF streamer that timestamps every ``put`` (the prompt, then one per generated token)."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(now())

    def end(self) -> None:
        pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="checkpoint dir / .gguf / 'smollm2'")
    p.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_CORPUS,
        help="prompt text (.jsonl with 'text' fields); synthetic text when absent",
    )
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=32, help="decode tokens per sequence (N)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per figure (fastest kept)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=REPO / "bench_out" / "bench_hf.json")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not args.batches or min(args.batches) < 1:
        p.error("--batches needs positive integers, e.g. 1,8")
    if args.prompt_tokens < 2 or args.new_tokens < 1 or args.repeats < 1:
        p.error("--prompt-tokens must be >= 2, --new-tokens and --repeats >= 1")
    return args


def make_prompts(
    tokenizer: Any, corpus: Path, num: int, length: int
) -> tuple[list[list[int]], str]:
    """``num`` disjoint windows of ``length`` ids (BOS first) from the corpus, and its label."""
    need_chars = num * length * 8  # ~4 characters per token, with a 2x margin
    if corpus.is_file():
        from shadowkv.eval.haystack import load_corpus_text

        text, source = load_corpus_text(corpus)[:need_chars], str(corpus)
    else:
        print(f"note: {corpus} not found; using synthetic text", file=sys.stderr)
        text, source = "", "synthetic"
    while len(text) < need_chars:
        text += SYNTHETIC_SENTENCE
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = length - len(bos)
    if len(ids) < num * body:
        raise ValueError(f"the corpus gives {len(ids)} tokens, {num * body} are needed")
    return [bos + ids[i * body : (i + 1) * body] for i in range(num)], source


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids, attention_mask [B, max_len]`` with padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def hf_run(hf: Any, prompts: list[list[int]], new_tokens: int, pad_id: int) -> Run:
    ids, mask = left_pad(prompts, pad_id)
    clock = StepClock()
    start = now()
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            streamer=clock,
        )
    end = now()
    gen = out[:, ids.shape[1] :]
    if gen.shape[1] != new_tokens:
        raise RuntimeError(f"HF made {gen.shape[1]} tokens, {new_tokens} were asked for")
    # stamps: [prompt, token 1 (after prefill), token 2, ...]; decode steps are 2..N.
    s = clock.stamps
    steps = [(s[i][0] - s[i - 1][0], s[i][1] - s[i - 1][1]) for i in range(2, len(s))]
    return Run((end[0] - start[0], end[1] - start[1]), steps, gen.tolist())


def ours_run(engine: Any, prompts: list[list[int]], new_tokens: int) -> Run:
    from shadowkv.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    start = now()
    reqs = [engine.add_request(p, params) for p in prompts]
    steps = []
    while any(r.finish_reason is None for r in reqs):
        t0 = now()
        outs = engine.step()
        t1 = now()
        if len(outs) == len(prompts) and all(len(o.request.output_ids) > 1 for o in outs):
            steps.append((t1[0] - t0[0], t1[1] - t0[1]))
    end = now()
    made = [r.output_ids for r in reqs]
    if any(len(m) != new_tokens for m in made):
        raise RuntimeError(
            f"our engine made {[len(m) for m in made]} tokens, {new_tokens} were asked for"
        )
    return Run((end[0] - start[0], end[1] - start[1]), steps, made)


def fastest(runs: list[Run], clock: int) -> Run:
    return min(runs, key=lambda r: r.total[clock])


def bench_batch(
    hf: Any, engine: Any, prompts: list[list[int]], n: int, pad_id: int, repeats: int
) -> dict[str, Any]:
    """Time both sides, alternating HF and ours; keep each figure's fastest of ``repeats`` runs.

    The fastest run is the one least disturbed by other processes on a shared machine.
    """
    B, T = len(prompts), len(prompts[0])
    runs: dict[str, list[Run]] = {"hf1": [], "us1": [], "hfn": [], "usn": []}
    for _ in range(repeats):
        runs["hf1"].append(hf_run(hf, prompts, 1, pad_id))
        runs["us1"].append(ours_run(engine, prompts, 1))
        runs["hfn"].append(hf_run(hf, prompts, n + 1, pad_id))
        runs["usn"].append(ours_run(engine, prompts, n + 1))
    row: dict[str, Any] = {"batch": B, "prompt_tokens": T, "new_tokens": n}
    for c, clock in enumerate(CLOCKS):
        for side, one, full in (("hf", "hf1", "hfn"), ("ours", "us1", "usn")):
            first, whole = fastest(runs[one], c), fastest(runs[full], c)
            step = min(s for r in runs[full] if (s := r.step_mean(c)) is not None)
            row[f"{side}_{clock}"] = {
                "time_1_token_s": round(first.total[c], 3),
                "time_n_plus_1_tokens_s": round(whole.total[c], 3),
                "prefill_tokens_per_s": round(B * T / first.total[c], 2),
                "decode_tokens_per_s": round(B * n / max(whole.total[c] - first.total[c], 1e-9), 2),
                "step_decode_tokens_per_s": round(B / step, 2),
            }
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "step_decode_tokens_per_s"):
            ratio = row[f"ours_{clock}"][key] / row[f"hf_{clock}"][key]
            row[f"{clock}_{key.removesuffix('_tokens_per_s')}_ratio"] = round(ratio, 3)
    row["greedy_prefix_agreement"] = round(
        prefix_agreement(runs["hfn"][0].tokens, runs["usn"][0].tokens), 4
    )
    return row


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each sequence's tokens before the first HF/ours difference."""
    fracs = []
    for x, y in zip(a, b):
        same = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
        fracs.append(same / len(x))
    return statistics.mean(fracs)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| batch | clock | HF prefill tok/s | ours | ratio | HF decode tok/s | ours | ratio "
            "| HF step decode tok/s | ours | ratio | greedy prefix agreement |"
        ),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for clock in CLOCKS:
            hf, us = r[f"hf_{clock}"], r[f"ours_{clock}"]
            cells = [f"{r['batch']}", clock]
            for key in ("prefill", "decode", "step_decode"):
                cells += [
                    f"{hf[key + '_tokens_per_s']:.1f}",
                    f"{us[key + '_tokens_per_s']:.1f}",
                    f"**{r[f'{clock}_{key}_ratio']:.2f}x**",
                ]
            cells.append(f"{r['greedy_prefix_agreement']:.0%}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from shadowkv import LLM
    from shadowkv.config import EngineConfig
    from shadowkv.models.loader import read_config, resolve_model

    path = resolve_model(args.model)
    max_batch = max(args.batches)
    T, n = args.prompt_tokens, args.new_tokens
    cfg = read_config(path)
    kv_bytes = 2 * cfg.num_layers * cfg.kv_dim * 4 * (T + n + 64) * max_batch  # fp32 K and V
    llm = LLM(
        str(path),
        device="cpu",
        engine=EngineConfig(
            max_num_seqs=max_batch,
            dtype="float32",
            cache_memory_gb=kv_bytes / 2**30,
        ),
    )
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    pad_id = hf.config.pad_token_id
    pad_id = pad_id if pad_id is not None else (llm.tokenizer.eos_token_id or 0)
    prompts, source = make_prompts(llm.tokenizer, args.corpus, max_batch, T)

    warm = [p[:64] for p in prompts[:2]]
    hf_run(hf, warm, 2, pad_id)
    ours_run(llm.engine, warm, 2)

    load_before = os.getloadavg()
    rows = []
    for B in args.batches:
        print(f"batch {B}: timing HF and ours ...", file=sys.stderr, flush=True)
        rows.append(bench_batch(hf, llm.engine, prompts[:B], n, pad_id, args.repeats))
    load_after = os.getloadavg()

    table = markdown(rows)
    print(table)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": str(path),
        "dtype": "float32",
        "device": "cpu",
        "prompt_source": source,
        "prompt_tokens": T,
        "new_tokens": n,
        "repeats": args.repeats,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        **machine_info(),
    }
    print(
        f"\nload average (1/5/15 min) before {meta['load_average_before']}, "
        f"after {meta['load_average_after']}; {meta['cpu']}, {meta['torch_threads']} threads"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
