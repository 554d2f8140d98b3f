"""Markdown table and throughput-vs-batch plot of a throughput report."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown_table(report: dict[str, Any]) -> str:
    """One row per run, with decode speed relative to dense at its own largest batch."""
    meta = report["meta"]
    dense_best = {
        r["context"]: r["decode_tokens_per_s"]
        for r in report["runs"]
        if r["method"] == "dense" and r["batch_kind"] == "own max" and "error" not in r
    }
    lines = [
        (
            f"{meta['model']} ({meta['weights']}), {meta['dtype']} on {meta['device_name']}, "
            f"{meta['date']}; measured copy bandwidth {meta.get('copy_bandwidth_gbps', '-')} GB/s "
            "('of roofline': a dense step's weight + K/V bytes over that bandwidth)"
        ),
        *_tensor_parallel_note(meta),
        "",
        (
            "| method | context | batch | batch is | prefill s | TTFT s | decode tok/s "
            "| vs dense max | ms/step | of roofline | hit rate | SVD % of prefill "
            "| cache device GiB | cache host GiB | peak device GiB |"
        ),
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        if "error" in r:
            lines.append(
                f"| {r['method']} | {r['context']} | {r['batch']} | {r['batch_kind']} "
                f"| failed: {r['error'][:80]} |"
            )
            continue
        base = dense_best.get(r["context"])
        ratio = f"{r['decode_tokens_per_s'] / base:.2f}x" if base else "-"
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.0%}"
        if r.get("hit_rate_driven") is not None:
            hit += " (driven)"
        svd = r.get("svd_share_of_prefill")
        svd = "-" if svd is None else f"{svd:.1%}"
        roof = r.get("roofline_share")
        roof = "-" if roof is None else f"{roof:.0%}"
        lines.append(
            f"| {r['method']} | {r['context']} | {r['batch']} | {r['batch_kind']} "
            f"| {_secs(r['prefill_s'])} | {_secs(r['ttft_s'])} | {r['decode_tokens_per_s']:.1f} "
            f"| {ratio} "
            f"| {r['decode_ms_per_step']:.1f} | {roof} | {hit} | {svd} "
            f"| {_gib(r['cache_device_bytes'])} "
            f"| {_gib(r['cache_host_bytes'])} | {_gib(r['peak_device_bytes'])} |"
        )
    if any(r.get("hit_rate_driven") is not None for r in report["runs"]):
        lines += [
            "",
            "(driven): ShadowKV's selection kept that share of chunks from step to step "
            "(cache/shadow_drive.py) instead of following the query, to time the work of a "
            "real model's hit rate; the others follow the query.",
        ]
    if any(r.get("prefill") == "synthetic" for r in report["runs"]):
        lines += [
            "",
            "Prefill: synthetic (generated low-rank K/V stored through each cache's prefill "
            "path; no prefill timed; hit rates are not a model's).",
        ]
    shared = [r for r in report["runs"] if "document_prefill_s" in r]
    if shared:
        lines += [
            "",
            "'+shared' rows: every prompt is one document and its own "
            f"{shared[0]['question_tokens']}-token question, the document prefilled once "
            "before the run (prefix sharing); their prefill and TTFT are the questions'.",
            "",
            "| run | context | document prefill s | tokens shared | shared pages device GiB "
            "| shared pages host GiB | largest batch |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in shared:
            mem = r.get("shared_prefix_bytes") or {}
            lines.append(
                f"| {r['method']} | {r['context']} | {_secs(r['document_prefill_s'])} "
                f"| {r['shared_tokens']} | {_gib(mem.get('device_bytes'))} "
                f"| {_gib(mem.get('host_bytes'))} | {r.get('max_batch', '-')} |"
            )
    if meta["weights"].startswith("random"):
        lines += ["", "Random weights: the timings are real, the generated tokens are meaningless."]
    if meta["device"] == "cpu":
        lines += ["", "On CPU, 'peak device' is the process's peak resident memory."]
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: Path) -> bool:
    """Decode tokens/s against batch, one line per (method, context); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in report["runs"]:
        if "error" in r:
            continue
        series.setdefault((r["method"], r["context"]), []).append(
            (r["batch"], r["decode_tokens_per_s"])
        )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, context), points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(
            xs,
            ys,
            marker="o",
            label=f"{method}, {context // 1024}K" if context >= 1024 else f"{method}, {context}",
        )
    meta = report["meta"]
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(
        f"{meta['model']} ({meta['weights']}), {meta['dtype']}, {meta['device_name']}", fontsize=9
    )
    ax.grid(alpha=0.3)
    if series:  # every run may have failed; their errors are in the table
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _tensor_parallel_note(meta: dict[str, Any]) -> list[str]:
    """Under tensor parallelism, a line saying whose memory the columns are."""
    n = meta.get("tensor_parallel", 1)
    return [] if n == 1 else ["", f"Tensor parallel {n} ranks: {meta['per_rank']}."]
