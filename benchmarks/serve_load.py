"""Serving benchmark: a concurrency sweep of streaming clients against one ``shadowkv serve``.

Starts the server once (flags this script does not know go to it; or ``--url`` for a running one
on loopback), then for each ``--concurrency`` level runs that many closed-loop clients for
``--duration`` seconds with synthetic prompts of ``--prompt-tokens`` tokens and ``--max-tokens``
new tokens (``benchmarks/load_test.py`` does the requests and the ``/metrics`` polling). Writes
``serve_load_<label>.json`` (one summary per level: tok/s, TTFT / ITL percentiles, peak running
batch and queue, 5xx) and, with matplotlib (the ``plot`` extra), a plot of output tok/s, TTFT p50
and ITL p50 against concurrency; ``--compare other.json`` draws a second sweep (before / after)
on the same axes.

Two load generators: our own closed-loop clients (``load_test.py``, the default) and GuideLLM
(``--driver guidellm --guidellm PATH``; ``guidellm_load.py``), which is not a dependency: it
pins its own torch and transformers and adds two dozen packages, so it lives in a venv of its own.
Both report the same keys, so a sweep of either plots against the other with ``--compare``.

    python benchmarks/serve_load.py --cache dense --concurrency 1,8,32 --duration 60 \\
        --prompt-tokens 256 --max-tokens 16 --label after --out bench_out/serve_load
    python benchmarks/serve_load.py --driver guidellm --guidellm ~/guidellm/bin/guidellm \\
        --cache shadowkv --concurrency 1,4,16,64 --duration 60 --label guidellm
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guidellm_load  # noqa: E402
from load_test import (  # noqa: E402
    DEMO_TEXT,
    check_loopback,
    make_prompts,
    run_load,
    start_server,
    summarise,
)

METRICS = (  # (summary key, percentile or None, axis label)
    ("output_tokens_per_s", None, "output tok/s"),
    ("ttft_ms", "p50", "TTFT p50 (ms)"),
    ("itl_ms", "p50", "ITL p50 (ms)"),
)


def level_args(args: argparse.Namespace, clients: int) -> argparse.Namespace:
    """What ``load_test.run_load`` reads, for one concurrency level."""
    return argparse.Namespace(
        clients=clients, max_requests=10**9, duration=args.duration, grace=args.grace,
        max_tokens=args.max_tokens, ignore_eos=True,
    )


def rss_mib(pid: int | None) -> float | None:
    """A process's resident memory (Linux ``/proc``), MiB; None elsewhere or without a pid."""
    try:
        status = Path(f"/proc/{pid}/status").read_text() if pid else ""
    except OSError:
        return None
    kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")),
              None)
    return None if kb is None else round(kb / 1024, 1)


def run_level(
    url: str, name: str, prompts: list[str], args: argparse.Namespace, clients: int
) -> dict:
    """One level's summary, from the driver ``args.driver`` names."""
    if args.driver == "guidellm":
        report = args.out / f"guidellm_{args.label}_c{clients}.json"
        return asyncio.run(guidellm_load.run_level(
            args.guidellm, url, args.tokenizer_dir, clients, args.duration,
            args.prompt_tokens, args.max_tokens, report, args.duration + args.grace + 120,
        ))
    samples, cut, wall, peaks = asyncio.run(
        run_load(url, name, prompts, level_args(args, clients), {})
    )
    return summarise(samples, cut, wall, peaks) | {"driver": "own"}


def sweep(
    url: str, name: str, prompts: list[str], args: argparse.Namespace, pid: int | None
) -> list[dict]:
    """One summary per level, with the server's resident memory once the level is over (a
    repeated level, e.g. ``--concurrency 32,32,32,32``, is a soak: does it plateau?)."""
    levels = []
    for clients in args.concurrency:
        summary = run_level(url, name, prompts, args, clients) | {
            "concurrency": clients, "server_rss_mib_after": rss_mib(pid)
        }
        t, i = summary["ttft_ms"], summary["itl_ms"]
        print(
            f"c={clients:3d}: {summary['requests_ok']} ok, {summary['requests_failed']} failed, "
            f"{summary['output_tokens_per_s']} tok/s, TTFT p50 {t['p50']} ms, "  # type: ignore[index]
            f"ITL p50 {i['p50']} ms, peak running {summary['server_peak_running']}, "  # type: ignore[index]
            f"peak queue {summary['server_peak_queue']}, "
            f"server RSS after {summary['server_rss_mib_after']} MiB",
            flush=True,
        )
        levels.append(summary)
    return levels


def plot(record: dict, other: dict | None, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (the 'plot' extra): no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    for rec in (r for r in (other, record) if r is not None):
        xs = [lv["concurrency"] for lv in rec["levels"]]
        for ax, (key, pct, label) in zip(axes, METRICS):
            ys = [lv[key] if pct is None else lv[key][pct] for lv in rec["levels"]]
            ax.plot(xs, ys, marker="o", label=rec["label"])
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent streams")
            ax.set_title(label)
    axes[0].legend()
    fig.suptitle(f"{record['cache']} cache, {record['prompt_tokens']}-token prompts, "
                 f"{record['max_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    from shadowkv.commands.common import add_model_args

    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other flags (--model, --cache, --max-num-batched-tokens, ...) go to "
        "`shadowkv serve`.",
    )
    p.add_argument("--url", default=None, help="a running server on loopback (default: start one)")
    p.add_argument("--served-model-name", default="model")
    p.add_argument("--concurrency", default="1,8,32",
                   type=lambda s: [int(x) for x in s.split(",")], help="levels, e.g. 1,8,32,64")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of sending per level")
    p.add_argument("--grace", type=float, default=120.0, help="seconds in flight past --duration")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--label", default="run", help="names this sweep in the files and the plot")
    p.add_argument("--compare", type=Path, default=None, help="another sweep's JSON to plot too")
    p.add_argument("--out", type=Path, default=Path("bench_out/serve_load"))
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--driver", choices=("own", "guidellm"), default="own",
                   help="load generator: our own clients (load_test.py) or GuideLLM")
    p.add_argument("--guidellm", default=None,
                   help="GuideLLM's executable (default: guidellm on PATH)")
    args, serve_args = p.parse_known_args(argv)
    model_parser = argparse.ArgumentParser(prog="serve_load (serve flags)", add_help=False)
    add_model_args(model_parser)
    model_args, _ = model_parser.parse_known_args(serve_args)
    if any(c < 1 for c in args.concurrency) or args.duration <= 0:
        raise SystemExit("serve_load: concurrency levels and --duration must be positive")
    if args.driver == "guidellm":
        from shadowkv.models.loader import resolve_model

        args.guidellm = guidellm_load.find_guidellm(args.guidellm)
        args.tokenizer_dir = resolve_model(model_args.model)  # GuideLLM sizes prompts with it
        args.out.mkdir(parents=True, exist_ok=True)

    from shadowkv.eval.haystack import load_corpus_text

    text = load_corpus_text(DEMO_TEXT)
    proc, name = None, args.served_model_name
    if args.url:
        check_loopback(args.url)
        url, tokenizer = args.url.rstrip("/"), None
    else:
        from shadowkv.models.loader import resolve_model
        from shadowkv.models.tokenizer import Tokenizer

        tokenizer = Tokenizer(resolve_model(model_args.model))
        url, proc = start_server(serve_args, name, args.startup_timeout)
    prompts = make_prompts(text, [args.prompt_tokens], 256, tokenizer)
    pid = proc.pid if proc is not None else None
    idle_rss = rss_mib(pid)
    try:
        levels = sweep(url, name, prompts, args, pid)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}",
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "label": args.label,
        "driver": args.driver,
        "cache": model_args.cache,
        "model": model_args.model or "smollm2",
        "serve_args": serve_args,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "duration_s": args.duration,
        "server_rss_mib_idle": idle_rss,
        "levels": levels,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve_load_{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    other = json.loads(args.compare.read_text()) if args.compare else None
    if plot(record, other, stem.with_suffix(".png")):
        print(f"written: {stem}.json, {stem}.png", file=sys.stderr)
    failed = sum(lv["requests_failed"] + lv["server_errors_5xx"] for lv in levels)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
