"""ShadowKV's low-rank key basis under tensor parallelism: one basis per rank vs one over all heads.

Under ``tensor_parallel=N`` rank ``r`` owns the contiguous KV heads ``[r Hkv/N, (r+1) Hkv/N)``
(``shadowkv/distributed/shard.py``) and its ShadowKV cache factorises only those heads' pre-RoPE
keys, ``[T, Hkv/N * D]``, so no rank needs another's keys. With ``K [T, Hkv*D]`` one layer's
prompt keys and ``R`` a total rank, this measures the relative error ``||K - K_r||_F / ||K||_F``
of three reconstructions:

(a) ``one``: one rank-``R`` basis over all ``Hkv*D`` columns (what TP=1 builds);
(b) ``split``: ``N`` per-rank bases whose ranks sum to ``R`` (``R/N`` each, the remainder to the
    first ranks), each over its rank's heads: the same factor bytes per token as (a);
(c) ``per_rank``: ``N`` per-rank bases of rank ``R`` each (capped at a rank's ``Hkv/N * D``
    columns, where it is exact): ``N`` times (a)'s factor bytes per token.

Always ``(c) <= (a) <= (b)``: (a) is the best rank-``R`` approximation of ``K`` (Eckart-Young)
and (b)'s block-diagonal reconstruction is one; each column block of (a) has rank ``<= R``, so
(c)'s best rank-``R`` fit of that block is no worse there. The effect on attention: the prompt's
last-position query of every head attends, exactly and over every prompt token (no selection, so
only the basis differs), to the keys rebuilt by (a), (b) and (c) (RoPE applied after the
rebuild) and to the exact keys; the error is the mean over heads of the relative error of the
attention output. ``attn``: every prompt key rebuilt; ``kept``: the tokens a ShadowKV cache keeps
exact anyway (the local window and each head's outlier chunks, default ``ShadowKVConfig``
settings) taken exact, as the cache attends to them. ``attn`` is dominated by the attention-sink
tokens at the start of the prompt, whose chunk ShadowKV mostly keeps exact as an outlier.

The prompt is ``--length`` tokens of the Paul Graham essays. Each ``--ranks`` value is spelled
as ``ShadowKVConfig.rank`` (``default``, a fraction of ``Hkv*D`` or a column count) and resolved
over all ``Hkv*D`` columns for (a); the table also says what an engine at ``tensor_parallel=N``
resolves the same setting to on each rank (``rank_for(Hkv/N * D)``) and which option that is.

    python benchmarks/tp_basis.py --model smollm2 --world 3 --ranks default 0.25 0.5 32
    python benchmarks/tp_basis.py --model qwen2.5-coder-0.5b --world 2 --ranks default 0.25 0.5 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from shadowkv.cache.layout import AttentionSpec
from shadowkv.cache.methods import ShadowKVConfig
from shadowkv.cache.shadow_prefill import exact_token_index, lowrank_factors, summarize_chunks
from shadowkv.config import ConfigError, EngineConfig
from shadowkv.distributed.layers import block_rows
from shadowkv.eval.haystack import Haystack
from shadowkv.kernels.rope.reference import apply_rope
from shadowkv.llm import LLM

REPO = Path(__file__).resolve().parents[1]
PG_ESSAYS = REPO.parent / "shared" / "data" / "pg_essays.jsonl"


# core: reconstructions of one layer's keys ----------------------------------------------------
def split_rank(rank: int, world: int) -> list[int]:
    """``rank`` split over ``world`` ranks as evenly as possible (the first ranks take the rest)."""
    if not 1 <= world <= rank:
        raise ValueError(f"rank={rank} cannot be split over world={world} ranks (need 1 each)")
    base, extra = divmod(rank, world)
    return [base + (r < extra) for r in range(world)]


def head_blocks(num_kv_heads: int, world: int) -> list[torch.Tensor]:
    """Each TP rank's KV head indices: contiguous blocks, as ``shard.py`` splits them."""
    if num_kv_heads % world:
        raise ValueError(f"world={world} does not divide num_kv_heads={num_kv_heads}")
    return [block_rows(0, num_kv_heads, r, world) for r in range(world)]


def rebuild(keys: torch.Tensor, rank: int) -> torch.Tensor:
    """``keys [T, h, D]`` rebuilt from one rank-``rank`` basis over all ``h*D`` columns, with
    ShadowKV's own factorisation (``lowrank_factors``)."""
    T, h, D = keys.shape
    f = lowrank_factors(keys.reshape(T, h * D), min(rank, h * D))
    return (f.a @ f.w_t).view(T, h, D).to(keys.dtype)


def rebuild_per_rank(keys: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """``keys [T, Hkv, D]`` rebuilt by ``len(ranks)`` TP ranks, rank ``r`` from its own basis of
    rank ``ranks[r]`` over its own heads' columns."""
    out = torch.empty_like(keys)
    for heads, r in zip(head_blocks(keys.shape[1], len(ranks)), ranks, strict=True):
        out[:, heads] = rebuild(keys[:, heads], r)
    return out


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``||ref - approx||_F / ||ref||_F``."""
    return float((ref - approx).norm() / ref.norm())


@dataclass(frozen=True)
class Rebuilt:
    """One layer's pre-RoPE keys ``[T, Hkv, D]`` as the three options rebuild them."""

    one: torch.Tensor  # (a) one basis of rank R over all heads
    split: torch.Tensor  # (b) per-rank bases, ranks summing to R
    per_rank: torch.Tensor  # (c) per-rank bases of rank R each


def rebuild_options(keys: torch.Tensor, rank: int, world: int) -> Rebuilt:
    """The three reconstructions of ``keys [T, Hkv, D]`` at total rank ``rank`` over ``world``
    TP ranks."""
    return Rebuilt(
        one=rebuild(keys, rank),
        split=rebuild_per_rank(keys, split_rank(rank, world)),
        per_rank=rebuild_per_rank(keys, [rank] * world),
    )


@dataclass(frozen=True)
class BasisErrors:
    """Relative Frobenius errors of the three options (see ``Rebuilt``)."""

    one: float
    split: float
    per_rank: float


def basis_errors(keys: torch.Tensor, rank: int, world: int) -> BasisErrors:
    """Relative key errors of (a), (b) and (c) for ``keys [T, Hkv, D]``."""
    r = rebuild_options(keys, rank, world)
    return BasisErrors(*(relative_error(keys, x) for x in (r.one, r.split, r.per_rank)))


def attention_error(
    q: torch.Tensor, k: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, scale: float
) -> float:
    """Mean over heads of the relative error of ``softmax(scale q kᵀ) v`` when ``k2`` replaces
    ``k``; ``q [H, D]`` one query per head over all ``T`` keys ``k, k2, v [T, Hkv, D]`` (query
    head ``h`` reads KV head ``h // (H / Hkv)``)."""
    H, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(Hkv, H // Hkv, D)
    outs = [
        torch.einsum("hgt,thd->hgd", torch.einsum("hgd,thd->hgt", qg, kk).mul(scale).softmax(-1), v)
        for kk in (k, k2)
    ]
    err = (outs[1] - outs[0]).norm(dim=-1) / outs[0].norm(dim=-1)  # [Hkv, G]
    return float(err.mean())


# capture: a real model's prompt keys ----------------------------------------------------------
@dataclass(frozen=True)
class LayerKeys:
    """One layer's prompt: pre-RoPE keys and values ``[T, Hkv, D]``, the last position's
    post-RoPE queries ``[H, D]`` (fp64) and the layer's attention spec."""

    k_pre: torch.Tensor
    v: torch.Tensor
    q_last: torch.Tensor
    spec: AttentionSpec


class KeyTap:
    """Stands in for the cache during one whole-prompt forward: exact causal attention, and each
    layer's ``LayerKeys`` kept (fp64, on the host)."""

    def __init__(self, specs: Sequence[AttentionSpec]) -> None:
        self.specs = specs
        self.layers: list[LayerKeys] = []

    def prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> torch.Tensor:
        spec = self.specs[layer]
        G = spec.num_heads // spec.num_kv_heads
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(G, 1).transpose(0, 1),
            v.repeat_interleave(G, 1).transpose(0, 1), is_causal=True, scale=spec.scale,
        )  # [H, T, D]
        self.layers.append(LayerKeys(*(t.double().cpu() for t in (k_pre, v, q[-1])), spec))
        return out.transpose(0, 1)


def capture(llm: LLM, ids: list[int]) -> tuple[list[LayerKeys], torch.Tensor, torch.Tensor]:
    """Every layer's ``LayerKeys`` for prompt ``ids`` and the RoPE rows ``cos, sin`` (fp64) of
    its positions."""
    model, eng = llm.engine.model, llm.engine
    specs = model.attention_specs()
    if any(s.rope_key for s in specs):
        raise ValueError("models with per-layer RoPE tables (Gemma-3) are not supported here")
    tap = KeyTap(specs)
    pos = torch.arange(len(ids), device=eng.device)
    ctx = model.context("prefill", pos, eng.rope, tap)  # type: ignore[arg-type]
    model(torch.tensor(ids, device=eng.device), ctx, torch.tensor([len(ids) - 1]))
    cos, sin = ctx.rotary()
    return tap.layers, cos.double().cpu(), sin.double().cpu()


def exact_tokens(k: torch.Tensor, cfg: ShadowKVConfig) -> torch.Tensor:
    """Token ids ``[E, Hkv]`` a ShadowKV cache keeps exact per KV head for post-RoPE prompt keys
    ``k [T, Hkv, D]``: the local window and the outlier chunks (``summarize_chunks``)."""
    s = summarize_chunks(k, cfg.chunk_size, cfg.local_chunks, cfg.outlier_chunks)
    return exact_token_index(k.shape[0], cfg.chunk_size, s.num_candidates, s.outlier_ids)


def with_exact(rebuilt: torch.Tensor, keys: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``rebuilt [T, Hkv, D]`` with each head's ``exact [E, Hkv]`` tokens taken from ``keys``."""
    out, heads = rebuilt.clone(), torch.arange(keys.shape[1])
    out[exact, heads] = keys[exact, heads]
    return out


def rope(
    k_pre: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: AttentionSpec
) -> torch.Tensor:
    """Post-RoPE keys of pre-RoPE ``k_pre [T, Hkv, D]``."""
    return apply_rope(k_pre, k_pre, cos, sin, spec.rope_style)[1] if spec.rotary_dims else k_pre


# study ----------------------------------------------------------------------------------------
def parse_rank(text: str) -> float | None:
    """A ``--ranks`` value as ``ShadowKVConfig.rank``: ``default`` is None."""
    return None if text == "default" else float(text)


def engine_option(total: int, per_rank: int | None, world: int, width: int) -> str:
    """Which option a TP engine's per-rank rank ``per_rank`` (of ``width`` columns; None: the
    setting is refused there) is."""
    if per_rank is None:
        return f"refused: more than the rank's {width} columns"
    if per_rank == width:
        return "full rank (exact)"
    if per_rank == total:
        return "(c)"
    if per_rank * world == total or split_rank(total, world)[0] == per_rank:
        return "(b)"
    return f"{per_rank}/rank"


def study_rank(
    layers: list[LayerKeys], cos: torch.Tensor, sin: torch.Tensor, setting: str, world: int
) -> dict:
    """Per-layer key and attention errors of (a), (b), (c) for one ``--ranks`` setting."""
    spec = layers[0].spec
    kv_dim = spec.num_kv_heads * spec.head_dim
    cfg = ShadowKVConfig(rank=parse_rank(setting))
    R = cfg.rank_for(kv_dim)
    try:
        R_tp: int | None = cfg.rank_for(kv_dim // world)
    except ConfigError:  # a column count above the rank's width
        R_tp = None
    rows = []
    for i, lay in enumerate(layers):
        rebuilt = rebuild_options(lay.k_pre, R, world)
        k = rope(lay.k_pre, cos, sin, lay.spec)
        exact = exact_tokens(k, cfg)
        opts = {"one": rebuilt.one, "split": rebuilt.split, "per_rank": rebuilt.per_rank}

        def attn(k_pre: torch.Tensor, lay: LayerKeys = lay, k: torch.Tensor = k) -> float:
            k2 = rope(k_pre, cos, sin, lay.spec)
            return attention_error(lay.q_last, k, k2, lay.v, lay.spec.scale)

        rows.append({
            "layer": i,
            **{f"key_{n}": relative_error(lay.k_pre, x) for n, x in opts.items()},
            **{f"attn_{n}": attn(x) for n, x in opts.items()},
            **{f"kept_{n}": attn(with_exact(x, lay.k_pre, exact)) for n, x in opts.items()},
        })
    return {
        "rank_setting": setting,
        "rank": R,
        "split": split_rank(R, world),
        "per_rank_capped": min(R, kv_dim // world),
        "engine_rank_per_rank": R_tp,
        "engine_option": engine_option(R, R_tp, world, kv_dim // world),
        "layers": rows,
    }


def haystack_ids(llm: LLM, path: Path, length: int) -> list[int]:
    """The first ``length`` tokens of the corpus."""
    ids = llm.encode(Haystack.from_path(path).text(length))  # >= 1 token per word
    if len(ids) < length:
        raise ValueError(f"{path} gave {len(ids)} tokens, fewer than --length {length}")
    return ids[:length]


COLUMNS = tuple(f"{m}_{o}" for m in ("key", "attn", "kept") for o in ("one", "split", "per_rank"))


def engine_cell(setting: dict) -> str:
    """The table's "engine TP" cell: the rank each TP rank resolves and which option it is."""
    r = setting["engine_rank_per_rank"]
    return setting["engine_option"] if r is None else f"{r} = {setting['engine_option']}"


def report(result: dict) -> str:
    """Markdown: per rank setting, the mean and max over layers of each error."""
    w = result["world"]
    lines = [
        f"{result['model']}: {result['length']} tokens, Hkv={result['num_kv_heads']} x "
        f"D={result['head_dim']}, TP={w}, {result['num_layers']} layers; mean (max) over layers",
        "",
        "| rank setting | (a) R | (b) ranks | (c) per rank | engine TP: per rank | "
        "key (a) | key (b) | key (c) | attn (a) | attn (b) | attn (c) | "
        "kept (a) | kept (b) | kept (c) |",
        "|---" * 14 + "|",
    ]
    for s in result["settings"]:
        cells = []
        for c in COLUMNS:
            xs = [row[c] for row in s["layers"]]
            cells.append(f"{sum(xs) / len(xs):.4f} ({max(xs):.4f})")
        lines.append(
            f"| {s['rank_setting']} | {s['rank']} | {'+'.join(map(str, s['split']))} | "
            f"{s['per_rank_capped']} | {engine_cell(s)} | "
            + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def study(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    llm = LLM(args.model, device="cpu", engine=EngineConfig(max_model_len=args.length + 64))
    ids = haystack_ids(llm, args.haystack, args.length)
    layers, cos, sin = capture(llm, ids)
    t1 = time.perf_counter()
    spec = layers[0].spec
    head_blocks(spec.num_kv_heads, args.world)  # refuse a world that does not divide the heads
    settings = [study_rank(layers, cos, sin, r, args.world) for r in args.ranks]
    return {
        "model": args.model, "length": len(ids), "world": args.world,
        "num_layers": len(layers), "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "capture_s": round(t1 - t0, 1), "study_s": round(time.perf_counter() - t1, 1),
        "settings": settings,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--world", type=int, required=True, help="tensor-parallel ranks N")
    ap.add_argument("--ranks", nargs="+", default=["default", "0.25", "0.5"],
                    help="ShadowKVConfig.rank values: default, a fraction or a column count")
    ap.add_argument("--length", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--haystack", type=Path, default=PG_ESSAYS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the per-layer rows (JSON)")
    args = ap.parse_args(argv)
    result = study(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(report(result))
    print(f"\ncapture {result['capture_s']} s, study {result['study_s']} s")


if __name__ == "__main__":
    sys.exit(main())
