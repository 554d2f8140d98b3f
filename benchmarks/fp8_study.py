"""fp8 values and landmarks on a real model: scale granularity, selection changes, logit cosine.

Passkey prompts (the rank study's) on SmolLM2 (or ``--model``). Dense attention generates 32
greedy tokens once and records the prefill; ShadowKV at the given budget then replays it and
decodes teacher-forced on dense's tokens, once with values and landmarks in the model dtype
(``auto``) and once per fp8 variant. Measured:

1. Scale granularity of fp8 values: the decode queries ShadowKV ``auto`` saw attend (exactly, over
   every prompt token) to the prompt's values, exact vs fp8 with one scale per token and KV head
   vs one per chunk (8 tokens) and KV head; relative error of the attention output.
2. fp8 landmarks: for the same queries, the share of selected chunks (top ``budget / 8`` by the
   landmark score) that change when the landmarks are fp8.
3. Logit cosine and top-1 agreement of each fp8 variant against ``auto`` (exact values) at every
   teacher-forced step, and whether its free-running answer holds the passkey.

    python benchmarks/fp8_study.py --lengths 2048 4096 --budget 512 --out bench_out/fp8_study.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rank_study import NEW_TOKENS, PG_ESSAYS, passkey_prompt, run_dense  # noqa: E402

from shadowkv.cache import make_cache  # noqa: E402
from shadowkv.cache.methods import ShadowKVConfig  # noqa: E402
from shadowkv.cache.shadow_prefill import summarize_chunks  # noqa: E402
from shadowkv.config import EngineConfig  # noqa: E402
from shadowkv.eval.haystack import Haystack  # noqa: E402
from shadowkv.kernels.fp8 import fp8_round_trip  # noqa: E402
from shadowkv.kernels.score_landmarks import score_landmarks_ref  # noqa: E402
from shadowkv.llm import LLM  # noqa: E402

VARIANTS = {
    "auto": {},
    "fp8 values": {"value_dtype": "fp8"},
    "fp8 values + landmarks": {"value_dtype": "fp8", "landmark_dtype": "fp8"},
}


class QueryTap:
    """Forwards to a cache and keeps every decode query ``[B, H, D]`` per layer."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.queries: dict[int, list[torch.Tensor]] = {}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def decode(self, layer, q, k, v, k_pre):
        self.queries.setdefault(layer, []).append(q.detach().float().cpu())
        return self.inner.decode(layer, q, k, v, k_pre)


def run_variant(llm: LLM, cfg: ShadowKVConfig, rec, n: int, dense: list[int], tap: bool):
    """Teacher-forced logits ``[steps, V]``, free-running tokens, and (``tap``) the queries."""
    engine = llm.engine
    cache = make_cache(engine.model.attention_specs(), cfg, engine.rope, engine.device,
                       engine.dtype, 2, engine.max_model_len, 2**30)
    for sid in (0, 1):  # 0 free-running, 1 teacher-forced
        cache.add_sequence(sid, n, NEW_TOKENS)
        cache.begin_prefill(sid, n)
        rec.replay(cache)
        cache.end_prefill()
    seen = QueryTap(cache) if tap else cache
    free, forced = [dense[0]], []
    for t in range(1, NEW_TOKENS):
        cache.begin_decode([0, 1])
        ids = torch.tensor([free[-1], dense[t - 1]], device=engine.device)
        pos = torch.tensor([cache.length(0), cache.length(1)], device=engine.device)
        logits = engine.model(ids, engine.model.context("decode", pos, engine.rope, seen))
        cache.end_decode()
        free.append(int(logits[0].argmax()))
        forced.append(logits[1].float().cpu())
    for sid in (0, 1):
        cache.free_sequence(sid)
    queries = {k: torch.stack(v)[:, 1] for k, v in seen.queries.items()} if tap else {}
    return torch.stack(forced), free, queries  # queries: layer -> [steps, H, D]


def chunk_round_trip(v: torch.Tensor, C: int) -> torch.Tensor:
    """fp8 with one scale per chunk of ``C`` tokens and KV head (the alternative measured)."""
    T, Hkv, D = v.shape
    n = T // C
    head = v[: n * C].view(n, C, Hkv, D).transpose(1, 2).reshape(n, Hkv, C * D)
    back = fp8_round_trip(head).view(n, Hkv, C, D).transpose(1, 2).reshape(n * C, Hkv, D)
    return torch.cat([back, fp8_round_trip(v[n * C :])])  # the tail: per token


def attention_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v2: torch.Tensor) -> float:
    """Relative error of ``softmax(q k^T) v`` when ``v2`` replaces ``v`` (all prompt tokens)."""
    S, H, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(S, Hkv, H // Hkv, D).double()
    p = torch.einsum("shgd,thd->shgt", qg, k.double()).mul(D**-0.5).softmax(-1)
    o = torch.einsum("shgt,thd->shgd", p, v.double())
    o2 = torch.einsum("shgt,thd->shgd", p, v2.double())
    return float((o2 - o).norm() / o.norm())


def selection_change(q: torch.Tensor, k: torch.Tensor, cfg: ShadowKVConfig, K: int) -> float:
    """Share of the top-``K`` landmark chunks that differ with fp8 landmarks."""
    s = summarize_chunks(k.float(), cfg.chunk_size, cfg.local_chunks, cfg.outlier_chunks)
    N, Hkv, D = s.landmarks.shape
    table = torch.zeros(q.shape[0], 1, dtype=torch.int32)
    count = torch.full((q.shape[0],), N, dtype=torch.int32)
    picks = []
    for lm in (s.landmarks, fp8_round_trip(s.landmarks)):
        scores = score_landmarks_ref(q, lm[None], table, count, D**-0.5)  # [S, Hkv, N]
        picks.append(scores.topk(min(K, N), dim=-1).indices)
    same = (picks[0][..., :, None] == picks[1][..., None, :]).any(-1).float().mean()
    return float(1 - same)


def study(args: argparse.Namespace) -> list[dict]:
    llm = LLM(args.model, device="cpu", engine=EngineConfig(max_model_len=max(args.lengths) + 64))
    hay = Haystack.from_path(args.haystack)
    rows = []
    for length in args.lengths:
        for depth in args.depths:
            p = passkey_prompt(llm, hay, length, depth, 0, "fp8")
            t0 = time.perf_counter()
            dense, rec = run_dense(llm, p.ids)
            base = dict(sparse_budget=args.budget, outlier_chunks=args.outliers)
            runs = {name: run_variant(llm, ShadowKVConfig(**base, **kw), rec, len(p.ids), dense,
                                      tap=name == "auto")
                    for name, kw in VARIANTS.items()}
            auto_logits, _, queries = runs["auto"]
            row = {"length": length, "depth": depth, "tokens": len(p.ids),
                   "budget": args.budget, "passkey": p.passkey,
                   "dense_finds": p.passkey in llm.tokenizer.decode(dense)}
            for name, (logits, free, _) in runs.items():
                cos = torch.nn.functional.cosine_similarity(logits, auto_logits, dim=-1)
                row[name] = {
                    "finds": p.passkey in llm.tokenizer.decode(free),
                    "cos_min": round(float(cos.min()), 6), "cos_mean": round(float(cos.mean()), 6),
                    "top1_vs_auto": round(float((logits.argmax(-1) == auto_logits.argmax(-1))
                                                .float().mean()), 4),
                }
            err_tok, err_chunk, changed = [], [], {}
            cfg = ShadowKVConfig(**base)
            for layer, (k, v, _) in enumerate(rec.layers):
                q = queries[layer]
                err_tok.append(attention_error(q, k, v, fp8_round_trip(v.float())))
                err_chunk.append(attention_error(q, k, v, chunk_round_trip(v.float(), 8)))
                for frac in args.select_fractions:
                    K = max(1, int(frac * len(p.ids)) // 8)
                    changed.setdefault(frac, []).append(selection_change(q, k, cfg, K))
            row["attn_err_token_scale"] = sum(err_tok) / len(err_tok)
            row["attn_err_chunk_scale"] = sum(err_chunk) / len(err_chunk)
            row["selection_changed"] = {str(f): sum(c) / len(c) for f, c in changed.items()}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def report(rows: list[dict]) -> str:
    names = list(VARIANTS)[1:]
    fr = list(rows[0]["selection_changed"])
    out = [
        "| context | depth | attn err, scale/token | attn err, scale/chunk | "
        + " | ".join(f"selection changed @{float(f):.1%}" for f in fr) + " | "
        + " | ".join(f"{n}: cos min / mean, top-1" for n in names)
        + " | passkey (dense / auto / " + " / ".join(names) + ") |",
        "|" + "---|" * (5 + len(fr) + len(names)),
    ]
    for r in rows:
        cells = [f"{r['length']}", f"{r['depth']}%", f"{r['attn_err_token_scale']:.4f}",
                 f"{r['attn_err_chunk_scale']:.4f}"]
        cells += [f"{100 * r['selection_changed'][f]:.1f}%" for f in fr]
        cells += [f"{r[n]['cos_min']:.5f} / {r[n]['cos_mean']:.5f}, {r[n]['top1_vs_auto']:.2f}"
                  for n in names]
        finds = [r["dense_finds"], r["auto"]["finds"], *(r[n]["finds"] for n in names)]
        cells.append(" / ".join("yes" if f else "no" for f in finds))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--depths", type=int, nargs="+", default=[25, 50, 75])
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--outliers", type=int, default=16)
    p.add_argument("--select-fractions", type=float, nargs="+", default=[0.015, 0.06])
    p.add_argument("--haystack", type=Path, default=PG_ESSAYS)
    p.add_argument("--out", type=Path, default=Path("bench_out/fp8_study.json"))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = study(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(report(rows))


if __name__ == "__main__":
    main()
