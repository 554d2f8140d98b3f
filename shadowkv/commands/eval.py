"""``shadowkv eval``: RULER-style tasks and NIAH, method against method at equal budgets.

Example (a 6 % budget on SmolLM2, two tasks, four samples each)::

    shadowkv eval --tasks niah_single_2,niah_multikey_1 --lengths 2048 \\
        --methods dense,shadowkv,quest,loki,streaming,oracle --samples 4 --sparse-budget 128 \\
        --haystack ../shared/data/pg_essays.jsonl --out bench_out/eval.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shadowkv.commands.flags import (
    add_cache_flags,
    add_engine_flags,
    cache_config_from_args,
    engine_config_from_args,
)
from shadowkv.config import ConfigError, parse_budget
from shadowkv.eval.niah import plot_heatmap
from shadowkv.eval.runner import (
    NIAH_TASK,
    EvalConfig,
    plot_budget_sweep,
    run_eval,
    run_label,
    summary_tables,
)


def _csv(kind):
    def parse(text: str) -> tuple:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return tuple(kind(s) for s in items)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--tasks", type=_csv(str), default=("niah_single_1",),
                   help="comma-separated RULER task names, or 'niah' for the depth grid")
    w.add_argument("--lengths", type=_csv(int), default=(4096,),
                   help="comma-separated context lengths in tokens (prompt + generation)")
    w.add_argument("--samples", type=int, default=4, help="samples per task and length")
    w.add_argument("--first-sample", type=int, default=0,
                   help="run only samples with index >= this (0-based): they are the same "
                   "samples as in a full run with the same --samples (extend a table in parts)")
    w.add_argument("--seed", type=int, default=42)
    w.add_argument("--haystack", type=Path, default=None,
                   help="essay corpus (.jsonl/.txt), needed by essay tasks and niah")
    w.add_argument("--qa-file", type=Path, default=None,
                   help="SQuAD v2 / HotpotQA dev JSON (qa_1/2)")
    w.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap generation below each task's length (RULER: niah 128) to save time")
    w.add_argument("--chat-template", default="model",
                   help="'model' (the checkpoint's own), 'base' (none) or a RULER template name")
    m = p.add_argument_group("model and engine")
    m.add_argument("--model", default=None,
                   help="HF checkpoint dir, .gguf or hub id (default: SmolLM2)")
    m.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    m.add_argument("--batch-size", type=int, default=4,
                   help="samples generated together (and saved together; the engine's "
                   "max_num_seqs)")
    m.add_argument("--no-share-prefill", action="store_true",
                   help="prefill every sample once per method instead of replaying one prefill")
    add_engine_flags(m, skip=("max_num_seqs",))
    c = p.add_argument_group("cache methods and their knobs")
    c.add_argument("--budgets", type=_csv(parse_budget), default=None,
                   help="comma-separated budgets for a sweep (overrides --sparse-budget; plots)")
    add_cache_flags(c, multiple=True)
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("results.jsonl"),
                   help="results JSONL; samples already in it are skipped (resume)")
    o.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    o.add_argument("--plot", type=Path, default=None,
                   help="accuracy-vs-budget PNG (default with --budgets: <out>.png)")
    o.add_argument("--heatmaps", type=Path, default=None,
                   help="with task 'niah': write one depth x length heat map PNG per method here "
                   "(default: beside --out)")
    o.add_argument("--metric", choices=["ruler", "shadowkv"], default="ruler",
                   help="which per-sample metric the table and plot show")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    budgets = args.budgets or (args.sparse_budget,)
    # A sparse method's budget is set per run (EvalConfig.cache_for); its config is built at the
    # first budget, so --budgets alone must fit the other knobs (e.g. --chunk-size).
    caches = tuple(
        cache_config_from_args(args, m, sparse_budget=budgets[0]) for m in args.methods
    )
    engine = engine_config_from_args(args, max_num_seqs=max(args.batch_size, 1))
    return EvalConfig(
        tasks=args.tasks, lengths=args.lengths, caches=caches, out=args.out,
        model=args.model, num_samples=args.samples, first_sample=args.first_sample,
        budgets=budgets,
        haystack=args.haystack, qa_file=args.qa_file, chat_template=args.chat_template,
        seed=args.seed, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        engine=engine, device=args.device, share_prefill=not args.no_share_prefill,
    )


def write_heatmaps(records: list[dict], folder: Path, stem: str, metric: str) -> list[Path]:
    """One NIAH heat map per method@budget: ``<folder>/<stem>_niah_<label>.png``."""
    runs: dict[str, list[tuple[int, float, float]]] = {}
    for r in records:
        if r["task"] == NIAH_TASK:
            cell = (int(r["length"]), float(r["depth"]), float(r["score"][metric]))
            runs.setdefault(run_label(r["method"], r["budget"]), []).append(cell)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        plot_heatmap(cells, folder / f"{stem}_niah_{label}.png", title=f"NIAH, {label}")
        for label, cells in runs.items()
    ]


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot {args.plot}: the plot is written as PNG; name it *.png")
    records = run_eval(cfg, progress=not args.quiet)
    table = summary_tables(records, args.metric)
    print(table)
    if args.table is not None:
        args.table.write_text(table + "\n", encoding="utf-8")
    if NIAH_TASK in cfg.tasks:
        heatmap_dir = args.heatmaps or cfg.out.parent
        for path in write_heatmaps(records, heatmap_dir, cfg.out.stem, args.metric):
            print(f"NIAH heat map: {path}", file=sys.stderr)
    sweep = args.budgets is not None and len(args.budgets) > 1
    plot = args.plot or (cfg.out.with_suffix(".png") if sweep else None)
    if plot is not None:
        plot_budget_sweep(records, plot, args.metric)
        print(f"budget plot: {plot}", file=sys.stderr)
    return 0
