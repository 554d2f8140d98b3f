"""Load test of the OpenAI-compatible server over loopback: N concurrent streaming clients.

Starts ``shadowkv serve`` in a child process (flags this script does not know go to it) or targets a
running one with ``--url`` (127.0.0.1 / localhost only). Each client sends streamed
``/v1/completions`` with prompts of mixed lengths cut from a text corpus, until ``--max-requests``
have been sent or ``--duration`` seconds have passed; requests still running at the hard limit
(``--duration`` + ``--grace``) are cut and counted. Reports request and token throughput, time
to first token and inter-token latency percentiles, errors, and the server's peak batch and
cache bytes (polled from ``/metrics``), as JSON and a markdown table.

    python benchmarks/load_test.py --cache dense --clients 8 --max-requests 48 --duration 300 \\
        --prompt-lengths 128,512,1536 --max-tokens 32 --out bench_out/load
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

DEMO_TEXT = Path(__file__).resolve().parents[1] / "shadowkv" / "data" / "demo_document.txt"
CHARS_PER_TOKEN = 4  # prompt sizing when the tokenizer is not at hand (--url mode)


@dataclass
class Sample:
    """One request as the client saw it; times are seconds from its send."""

    prompt_chars: int
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)  # between successive content chunks
    latency: float | None = None
    error: str | None = None


def percentiles(values: list[float], ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in ps}
    if len(values) == 1:
        return {f"p{p}": round(values[0] * 1000, 2) for p in ps}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {f"p{p}": round(cuts[p - 1] * 1000, 2) for p in ps}  # milliseconds


def make_prompts(text: str, lengths: list[int], count: int, tokenizer: object | None) -> list[str]:
    """``count`` prompts cycling through ``lengths`` (tokens), each from its own corpus offset."""
    words = text.split()
    prompts = []
    for i in range(count):
        n = lengths[i % len(lengths)]
        start = (i * 7919) % max(1, len(words) - 1)
        chunk = " ".join((words[start:] + words)[: n * 2])  # ~2 words per token is more than enough
        if tokenizer is not None:
            ids = tokenizer.encode(chunk, add_special_tokens=False)[: n - 1]
            chunk = tokenizer.decode(ids)
        else:
            chunk = chunk[: n * CHARS_PER_TOKEN]
        prompts.append(chunk)
    return prompts


async def one_request(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, ignore_eos: bool
) -> Sample:
    s = Sample(len(prompt))
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            s.status = r.status_code
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    s.error = f"stream error: {chunk['error'].get('message')}"
                    return s
                if chunk.get("usage"):
                    s.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    s.completion_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if s.ttft is None:
                        s.ttft = now - t0
                    else:
                        s.gaps.append(now - last)
                    last = now
        s.latency = time.perf_counter() - t0
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        s.error = f"{type(err).__name__}: {err}"
    return s


async def poll_metrics(
    client: httpx.AsyncClient, peaks: dict[str, float], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        try:
            text = (await client.get("/metrics")).text
            for name, value in re.findall(r"^shadowkv_(\w+) (\S+)$", text, re.M):
                peaks[name] = max(peaks.get(name, 0.0), float(value))
        except httpx.HTTPError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def run_load(
    url: str, model: str, prompts: list[str], args: argparse.Namespace, headers: dict[str, str]
) -> tuple[list[Sample], int, float, dict[str, float]]:
    """Samples, requests cut at the hard limit, wall seconds, and server metric peaks."""
    samples: list[Sample] = []
    next_index = 0
    deadline = time.perf_counter() + args.duration
    limits = httpx.Limits(max_connections=args.clients + 2)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=None, limits=limits
    ) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < args.max_requests and time.perf_counter() < deadline:
                prompt = prompts[next_index % len(prompts)]
                next_index += 1
                samples.append(
                    await one_request(client, model, prompt, args.max_tokens, args.ignore_eos)
                )

        peaks: dict[str, float] = {}
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_metrics(client, peaks, stop))
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(args.clients)]
        done, pending = await asyncio.wait(tasks, timeout=args.duration + args.grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
        stop.set()
        await poller
    cut = next_index - len(samples)
    return samples, cut, wall, peaks


def server_summary(peaks: dict[str, float]) -> dict[str, float | None]:
    """What ``/metrics`` said during a level (``poll_metrics``' maxima), under the summary's
    keys: both drivers report them alike."""
    return {
        "server_peak_running": peaks.get("running_requests"),
        "server_peak_queue": peaks.get("queue_length"),
        "server_peak_cache_device_bytes": peaks.get("cache_device_bytes"),
        "server_peak_cache_host_bytes": peaks.get("cache_host_bytes"),
        # cumulative since the server started (prefix sharing: prompt tokens served from the store)
        "server_cached_tokens_total": peaks.get("cached_tokens_total"),
        # cumulative too: optimistic admission (--admission-reserve) preempting requests
        "server_preemptions_total": peaks.get("preemptions_total"),
    }


def summarise(
    samples: list[Sample], cut: int, wall: float, peaks: dict[str, float]
) -> dict[str, object]:
    ok = [s for s in samples if s.error is None]
    out_tokens = sum(s.completion_tokens for s in ok)
    return {
        "requests_sent": len(samples) + cut,
        "requests_ok": len(ok),
        "requests_failed": len(samples) - len(ok),
        "requests_cut_at_time_limit": cut,
        "server_errors_5xx": sum(1 for s in samples if s.status >= 500),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3) if wall else None,
        "output_tokens_per_s": round(out_tokens / wall, 2) if wall else None,
        "prompt_tokens_total": sum(s.prompt_tokens for s in ok),
        "output_tokens_total": out_tokens,
        "ttft_ms": percentiles([s.ttft for s in ok if s.ttft is not None]),
        "itl_ms": percentiles([g for s in ok for g in s.gaps]),
        "latency_ms": percentiles([s.latency for s in ok if s.latency is not None]),
        **server_summary(peaks),
        "errors": sorted({s.error for s in samples if s.error})[:10],
    }


def markdown(summary: dict[str, object], label: str) -> str:
    t, i, lat = summary["ttft_ms"], summary["itl_ms"], summary["latency_ms"]
    rows = [
        (
            "requests ok / failed / cut",
            f"{summary['requests_ok']} / {summary['requests_failed']} / "
            f"{summary['requests_cut_at_time_limit']}",
        ),
        ("5xx responses", summary["server_errors_5xx"]),
        ("wall (s)", summary["wall_s"]),
        ("requests/s", summary["requests_per_s"]),
        ("output tokens/s", summary["output_tokens_per_s"]),
        ("TTFT p50 / p90 / p99 (ms)", f"{t['p50']} / {t['p90']} / {t['p99']}"),  # type: ignore[index]
        ("ITL p50 / p90 / p99 (ms)", f"{i['p50']} / {i['p90']} / {i['p99']}"),  # type: ignore[index]
        ("latency p50 / p90 (ms)", f"{lat['p50']} / {lat['p90']}"),  # type: ignore[index]
        (
            "peak running batch / queue",
            f"{summary['server_peak_running']} / {summary['server_peak_queue']}",
        ),
        (
            "peak cache device / host (MiB)",
            f"{_mib(summary['server_peak_cache_device_bytes'])} / "
            f"{_mib(summary['server_peak_cache_host_bytes'])}",
        ),
    ]
    lines = [f"| {label} | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _mib(value: object) -> str:
    return "n/a" if value is None else f"{float(value) / 2**20:.1f}"  # type: ignore[arg-type]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(
            f"load_test: refusing {url}: only loopback servers (127.0.0.1, localhost) may be loaded"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(serve_args: list[str], name: str, timeout: float) -> tuple[str, subprocess.Popen]:
    """``shadowkv serve`` in a child process on a free loopback port, once ``/health`` answers."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "shadowkv",
        "serve",
        *serve_args,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        name,
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"load_test: the server exited with status {proc.returncode}: {' '.join(cmd)}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"load_test: the server did not answer /health within {timeout} s")


def main(argv: list[str] | None = None) -> int:
    from shadowkv.commands.common import add_model_args

    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other flags (--model, --cache, --sparse-budget, ...) go to `shadowkv serve`.",
    )
    p.add_argument(
        "--url", default=None, help="a running server on loopback (default: start one here)"
    )
    p.add_argument("--served-model-name", default="model", help="the model name to request")
    p.add_argument("--api-key", default=None, help="bearer key for --url servers that want one")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=64)
    p.add_argument(
        "--duration", type=float, default=120.0, help="seconds after which no request is sent"
    )
    p.add_argument(
        "--grace", type=float, default=60.0, help="seconds in-flight requests get past --duration"
    )
    p.add_argument(
        "--prompt-lengths", default="64,256,1024", help="prompt tokens, cycled over requests"
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate exactly --max-tokens per request (default on)",
    )
    p.add_argument(
        "--haystack", type=Path, default=None, help="prompt text corpus (.jsonl/.json/.txt)"
    )
    p.add_argument("--out", type=Path, default=Path("bench_out/load_test"))
    p.add_argument("--startup-timeout", type=float, default=600.0)
    args, serve_args = p.parse_known_args(argv)
    model_parser = argparse.ArgumentParser(prog="load_test (serve flags)", add_help=False)
    add_model_args(model_parser)
    model_args = model_parser.parse_args(
        serve_args
    )  # refuse unknown flags before starting anything
    if args.clients < 1 or args.max_requests < 1 or args.duration <= 0:
        raise SystemExit("load_test: --clients, --max-requests and --duration must be positive")
    lengths = [int(x) for x in args.prompt_lengths.split(",")]

    from shadowkv.eval.haystack import load_corpus_text

    text = load_corpus_text(args.haystack or DEMO_TEXT)
    proc = None
    name = args.served_model_name
    if args.url:
        check_loopback(args.url)
        url, tokenizer, method = args.url.rstrip("/"), None, "external"
    else:
        from shadowkv.models.loader import resolve_model
        from shadowkv.models.tokenizer import Tokenizer

        tokenizer, method = Tokenizer(resolve_model(model_args.model)), model_args.cache
        url, proc = start_server(serve_args, name, args.startup_timeout)
    prompts = make_prompts(text, lengths, min(args.max_requests, 256), tokenizer)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        samples, cut, wall, peaks = asyncio.run(run_load(url, name, prompts, args, headers))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    summary = summarise(samples, cut, wall, peaks)
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "server": url,
        "cache": method,
        "model": model_args.model or "smollm2",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "serve_args": serve_args,
        "summary": summary,
        "samples": [asdict(s) | {"gaps": None} for s in samples],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"load_{method}"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    table = markdown(
        summary,
        f"{method} cache, {args.clients} clients, prompts {args.prompt_lengths}, "
        f"{args.max_tokens} new tokens",
    )
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    print(f"written: {args.out / (stem + '.json')}, {args.out / (stem + '.md')}", file=sys.stderr)
    return (
        0 if summary["requests_failed"] == 0 and summary["requests_cut_at_time_limit"] == 0 else 1
    )


if __name__ == "__main__":
    sys.exit(main())
