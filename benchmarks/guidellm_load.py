"""GuideLLM as the load generator of ``serve_load.py`` (``--driver guidellm``).

GuideLLM (vLLM's serving benchmark, ``pip install guidellm``) is kept out of our environment: it
pins its own torch and transformers and adds two dozen packages. Install it into a venv of its
own and point ``--guidellm`` at its executable:

    python -m venv ~/guidellm && ~/guidellm/bin/pip install guidellm==0.8.1
    python benchmarks/serve_load.py --driver guidellm --guidellm ~/guidellm/bin/guidellm ...

One level = one ``guidellm run`` with a ``concurrent`` profile of N streams for ``--duration``
seconds, synthetic prompts of exactly ``--prompt-tokens`` tokens (GuideLLM samples them with the
served model's own tokenizer directory, so no hub access is needed) sent to ``/v1/completions``
with ``ignore_eos``. While it runs we poll the server's ``/metrics`` for the peak running batch
and queue, as the own driver does, and the report's numbers are mapped onto the own driver's
summary keys so both plot on the same axes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import httpx
from load_test import poll_metrics, server_summary

PCTS = ("p50", "p90", "p99")


def guidellm_command(
    exe: str,
    url: str,
    tokenizer_dir: Path,
    streams: int,
    duration: float,
    prompt_tokens: int,
    max_tokens: int,
    report: Path,
) -> list[str]:
    """The ``guidellm run`` command line of one concurrency level."""
    return [
        exe,
        "run",
        "--backend",
        f"kind=openai_http,target={url},request_format=/v1/completions",
        "--profile",
        f"kind=concurrent,streams={streams}",
        "--constraint",
        f"kind=max_duration,seconds={duration:g}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={max_tokens}",
        "--tokenizer",
        f"kind=huggingface_auto,model={tokenizer_dir}",
        "--output",
        f"kind=json,path={report}",
        "--disable-progress",
    ]


def find_guidellm(exe: str | None) -> str:
    """The GuideLLM executable, or a SystemExit that says how to install it."""
    found = shutil.which(exe or "guidellm")
    if found is None:
        raise SystemExit(
            f"serve_load: GuideLLM not found ({exe or 'guidellm'} is not an executable on PATH). "
            "Install it in a venv of its own: python -m venv ~/guidellm && "
            "~/guidellm/bin/pip install guidellm==0.8.1; then pass "
            "--guidellm ~/guidellm/bin/guidellm"
        )
    return found


def _pcts(stat: dict, scale: float = 1.0) -> dict[str, float | None]:
    ok = stat.get("successful") or {}
    cuts = ok.get("percentiles") or {}
    return {p: (round(cuts[p] * scale, 2) if cuts.get(p) is not None else None) for p in PCTS}


def summarise_report(report: dict, peaks: dict[str, float]) -> dict[str, object]:
    """One level's summary from GuideLLM's JSON report (its only benchmark), in the own
    driver's keys (``load_test.summarise``); times in milliseconds, throughput over the
    measured window."""
    (bench,) = report["benchmarks"]
    m = bench["metrics"]
    totals = m["request_totals"]
    wall = float(bench["duration"])
    out_tokens = m["output_token_count"]["successful"]["total_sum"]
    return {
        "driver": "guidellm",
        "requests_sent": totals["total"],
        "requests_ok": totals["successful"],
        "requests_failed": totals["errored"],
        "requests_cut_at_time_limit": totals["incomplete"],
        "server_errors_5xx": 0,  # GuideLLM counts any failed request as errored (above)
        "wall_s": round(wall, 2),
        "requests_per_s": round(totals["successful"] / wall, 3) if wall else None,
        "output_tokens_per_s": round(out_tokens / wall, 2) if wall else None,
        "prompt_tokens_total": m["prompt_token_count"]["successful"]["total_sum"],
        "output_tokens_total": out_tokens,
        "ttft_ms": _pcts(m["time_to_first_token_ms"]),
        "itl_ms": _pcts(m["inter_token_latency_ms"]),
        "latency_ms": _pcts(m["request_latency"], 1000.0),  # GuideLLM reports it in seconds
        **server_summary(peaks),
        "errors": [],
    }


async def run_level(
    exe: str,
    url: str,
    tokenizer_dir: Path,
    streams: int,
    duration: float,
    prompt_tokens: int,
    max_tokens: int,
    report: Path,
    timeout: float,
) -> dict[str, object]:
    """Run GuideLLM for one level while polling ``/metrics``; its summary."""
    cmd = guidellm_command(
        exe, url, tokenizer_dir, streams, duration, prompt_tokens, max_tokens, report
    )
    peaks: dict[str, float] = {}
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        poller = asyncio.create_task(poll_metrics(client, peaks, stop))
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},  # the tokenizer is a local directory
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            raise SystemExit(
                f"serve_load: guidellm ran past {timeout:.0f} s: {' '.join(cmd)}"
            ) from None
        finally:
            stop.set()
            await poller
    if proc.returncode != 0 or not report.exists():
        tail = out.decode(errors="replace")[-3000:]
        raise SystemExit(f"serve_load: guidellm failed ({proc.returncode}):\n{tail}")
    return summarise_report(json.loads(report.read_text()), peaks)
