"""Throughput benchmark: each cache method at its largest batch, per context length.

For every context, each method's largest batch is found from the cache's own admission
accounting (device pools and the host value store), not by trial allocation. Each method is then
timed at its own largest batch and, where it fits, at every other method's largest batch (dense
at ShadowKV's batch is the equal-batch comparison). A run reports prefill time (ShadowKV's SVD
included), TTFT, decode tokens/s over ``decode_steps`` full-batch steps, hit rate, and device and
host memory.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from shadowkv.bench.engines import LocalEngines, TPEngines, open_engines
from shadowkv.bench.harness import (
    max_batch,
    new_tokens,
    prefill_document,
    timed_run,
)
from shadowkv.bench.models import arch_config, weight_bytes
from shadowkv.bench.report import markdown_table, write_plot
from shadowkv.bench.roofline import copy_bandwidth, dense_step_bytes
from shadowkv.cache.errors import CacheCapacityError
from shadowkv.cache.methods import CacheConfig, DenseConfig, ShadowKVConfig
from shadowkv.cache.shadow_drive import DrivenSelection, LandmarkSelection
from shadowkv.config import ConfigError, EngineConfig
from shadowkv.distributed.engine import TPEngine
from shadowkv.distributed.launch import TPRankError
from shadowkv.engine.engine import Engine, pick_dtype

Log = Callable[[str], None]

# What the report's memory and cache figures mean under tensor parallelism (meta["per_rank"]).
PER_RANK = (
    "tensor parallel: every rank runs the whole batch on 1/N of the heads; cache_memory_gb is "
    "each rank's (per GPU) budget, whose cache holds its Hkv/N KV heads, and the largest batch "
    "is what rank 0's cache admits (every rank admits alike); cache device/host bytes, peak "
    "memory, weight_bytes, hit rate and the roofline share are rank 0's; tokens/s are the "
    "whole engine's"
)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``caches``: one config per method timed (the methods' own knobs);
    ``engine``: the engine settings every run shares (its ``max_num_seqs``, ``max_model_len`` and
    prefill slicing are set per run: ``max_batch``, the contexts, whole prompts).
    ``batches=()`` means each method's largest batch (plus the others')."""

    arch: str | None = "tiny"
    model_path: str | None = None
    contexts: tuple[int, ...] = (32768,)
    caches: tuple[CacheConfig, ...] = (DenseConfig(), ShadowKVConfig())
    batches: tuple[int, ...] = ()
    decode_steps: int = 256
    max_batch: int = 256  # upper bound of the batch search (and the engine's max_num_seqs)
    device: str | None = None  # None: cuda when available
    engine: EngineConfig = field(default_factory=EngineConfig)
    seed: int = 0
    # "model" prefills every prompt; "synthetic" stores generated K/V instead (bench/synthetic.py),
    # so long-context decode can be measured without minutes of prefill per sequence.
    prefill: str = "model"
    # ShadowKV is timed once per entry: None lets the query select chunks; a share in [0, 1]
    # drives the selection to that hit rate (cache/shadow_drive.py), since random weights give
    # hit rates near 0 where real models keep 60-80 % of their chunks from step to step.
    hit_rates: tuple[float | None, ...] = (None,)
    # Shared-document mode: > 0 also times every method with prompts that share one document and
    # end with their own question of this many tokens (engine prefix sharing on): the document is
    # prefilled once by the model (whatever ``prefill`` says: it is for the other runs), every
    # question after it, and the largest batch counts the pages the document shares once.
    shared_document: int = 0

    def __post_init__(self) -> None:
        if (self.arch is None) == (self.model_path is None):
            raise ConfigError(
                "give exactly one of --arch (random weights) and --model (checkpoint)"
            )
        if self.arch is not None:
            arch_config(self.arch)
        if not self.contexts or min(self.contexts) < 1:
            raise ConfigError("contexts must be positive token counts, e.g. --contexts 32768,65536")
        if not self.caches:
            raise ConfigError("name at least one method, e.g. --methods dense,shadowkv")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"each method once, got {', '.join(self.methods)}")
        if self.batches and min(self.batches) < 1:
            raise ConfigError("batch sizes must be >= 1 (or 'auto')")
        if self.decode_steps < 1:
            raise ConfigError("decode_steps must be >= 1")
        if self.max_batch < 1:
            raise ConfigError("max_batch must be >= 1")
        if not self.hit_rates or any(h is not None and not 0 <= h <= 1 for h in self.hit_rates):
            raise ConfigError(
                f"hit_rates must list shares in [0, 1] or None (the query selects), got "
                f"{self.hit_rates!r}"
            )
        if self.prefill not in ("model", "synthetic"):
            raise ConfigError(f"prefill must be 'model' or 'synthetic', got {self.prefill!r}")
        self._check_tensor_parallel()
        if self.shared_document < 0 or self.shared_document >= min(self.contexts):
            raise ConfigError(
                f"shared_document={self.shared_document} question tokens must be >= 0 and "
                f"shorter than the shortest context ({min(self.contexts)})"
            )

    def _check_tensor_parallel(self) -> None:
        """Refuse what drives one engine's cache directly: under tensor parallelism only
        rank 0 would see it (the other ranks follow rank 0's engine calls, nothing else)."""
        n = self.engine.tensor_parallel
        if n == 1:
            return
        refused = {
            "--hit-rates with a share (rank 0's selector only; use --hit-rates query)":
                self.hit_rates != (None,),
            "--prefill synthetic (stores one rank's K/V; use --prefill model)":
                self.prefill != "model",
            "--shared-document (prefills its document on rank 0's engine alone)":
                self.shared_document > 0,
        }
        bad = [what for what, hit in refused.items() if hit]
        if bad:
            raise ConfigError(
                f"--tensor-parallel {n} cannot run {'; '.join(bad)}: drop it, or use "
                "--tensor-parallel 1"
            )

    @property
    def methods(self) -> tuple[str, ...]:
        """The runs' labels: method names, with variant knobs where set
        (``shadowkv:value_dtype=fp8``)."""
        return tuple(c.label for c in self.caches)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def max_model_len(self) -> int:
        """Room for the longest prompt plus the most tokens any request asks for."""
        return max(self.contexts) + self.decode_steps + max(self.max_batch, *self.batches, 1) + 1


def without_staging(cache: CacheConfig) -> CacheConfig:
    """The benchmark prefills whole prompts, so ShadowKV's chunked-prefill staging pool would
    only take budget from the batch: it gets none, unless the user sized it."""
    if isinstance(cache, ShadowKVConfig) and cache.staging_tokens is None:
        return replace(cache, staging_tokens=0)
    return cache

def run_throughput(
    cfg: BenchConfig, out_dir: Path | None = None, log: Log | None = None
) -> dict[str, Any]:
    """Measure every (method, context, batch); write JSON, markdown and a plot to ``out_dir``.
    With ``cfg.engine.tensor_parallel`` > 1 the ranks are spawned here and stopped at the end."""
    say = log or (lambda _: None)
    device = cfg.torch_device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu"
        )
    dtype = pick_dtype(cfg.engine.dtype, device)
    engine_cfg = replace(
        cfg.engine,
        max_num_seqs=cfg.max_batch,
        max_model_len=cfg.max_model_len,
        # Whole-prompt prefills, the paper's protocol; chunking trades throughput for the decode
        # latency of running requests (benchmarks/prefill_stall.py measures that).
        chunked_prefill=False,
        max_num_batched_tokens=1,  # one prefill per step: the harness times each alone
    )
    caches = dict(zip(cfg.methods, map(without_staging, cfg.caches)))
    engines = open_engines(cfg.arch, cfg.model_path, cfg.seed, caches[cfg.methods[0]],
                           engine_cfg, device, dtype)
    try:
        return _measure(cfg, engines, caches, engine_cfg, out_dir, say)
    finally:
        engines.close()


def _measure(
    cfg: BenchConfig, engines: LocalEngines | TPEngines, caches: dict[str, CacheConfig],
    engine_cfg: EngineConfig, out_dir: Path | None, say: Log,
) -> dict[str, Any]:
    model_cfg, model = engines.model_cfg, engines.model
    device, dtype = engines.device, engines.dtype
    if cfg.max_model_len > model_cfg.max_position_embeddings:
        say(
            f"note: contexts reach {cfg.max_model_len} tokens, past the model's "
            f"{model_cfg.max_position_embeddings}-token window (fine for speed, not for quality)"
        )

    def engine_for(method: str) -> Engine | TPEngine:
        return engines.engine_for(caches[method], engine_cfg)

    bandwidth = copy_bandwidth(device)
    say(f"measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s")
    limits: dict[str, dict[int, int]] = {}
    for method in cfg.methods:
        engine = engine_for(method)
        limits[method] = {
            c: max_batch(engine.cache, c, cfg.decode_steps, cfg.max_batch) for c in cfg.contexts
        }
        say(f"{method}: largest batch per context {limits[method]}")
        engines.release(engine)

    report: dict[str, Any] = {
        "meta": {
            **_meta(cfg, engines, device, dtype, engine_cfg),
            "copy_bandwidth_gbps": round(bandwidth / 1e9, 2),
        },
        "max_batch": {m: {str(c): b for c, b in per.items()} for m, per in limits.items()},
        "runs": [],
    }
    for method in cfg.methods:
        engine = engine_for(method)
        for context in cfg.contexts:
            # Re-check on the engine being timed: a cache that sizes a pool from free memory
            # may come out smaller the second time; time what this one admits.
            own = max_batch(engine.cache, context, cfg.decode_steps, cfg.max_batch)
            if own != limits[method][context]:
                say(f"note: {method} @ {context} now admits {own}, not {limits[method][context]}")
                limits[method][context] = own
                report["max_batch"][method][str(context)] = own
            for batch, kind in _plan_batches(cfg, method, context, limits):
                if batch > own:
                    say(f"{method} @ {context}: batch {batch} does not fit (max {own})")
                    continue
                # ShadowKV once per asked hit rate (None: the query selects).
                shadow = caches[method].method == "shadowkv"
                for drive in cfg.hit_rates if shadow else (None,):
                    driven = "" if drive is None else f", selection driven to {drive:.0%} hits"
                    say(f"{method} @ {context} tokens x {batch} ({kind}{driven}) ...")
                    row = {"method": method, "batch_kind": kind, "max_batch": own,
                           "hit_rate_driven": drive}
                    # Under tensor parallelism only the query selects (BenchConfig refuses
                    # driven rates): a selector set here would be rank 0's alone.
                    if shadow and engines.tensor_parallel == 1:
                        engine.cache.set_selection(  # type: ignore[attr-defined]
                            LandmarkSelection() if drive is None else DrivenSelection(drive)
                        )
                    try:
                        result = timed_run(
                            engine, context, batch, cfg.decode_steps, cfg.seed, cfg.prefill
                        )
                        row.update(result.as_dict())
                        if method == "dense":
                            # One rank's bytes (its shard's weights, its KV heads) over its time.
                            step_bytes = dense_step_bytes(
                                model, engines.rank_model_cfg, dtype, context, batch,
                                cfg.decode_steps,
                            )
                            step_s = result.decode_s / result.decode_steps
                            row["roofline_share"] = round(step_bytes / step_s / bandwidth, 4)
                        say(f"  decode {result.decode_tokens_per_s:.1f} tok/s")
                    except TPRankError:
                        raise  # the ranks are gone: nothing else can be measured
                    except Exception as err:  # noqa: BLE001 - keep the other runs' results
                        error = f"{type(err).__name__}: {err}"
                        row.update(context=context, batch=batch, error=error)
                        say(f"  FAILED: {row['error']}")
                    report["runs"].append(row)
                    if "error" in row:  # its requests are mid-flight: start clean (outside the
                        engines.release(engine)  # except block, whose traceback pins the pools)
                        engine = engine_for(method)
                    _write(report, out_dir, final=False)
        engines.release(engine)
        if cfg.shared_document:
            engine = engines.engine_for(caches[method], replace(engine_cfg, prefix_cache=True))
            for context in cfg.contexts:
                report["runs"].append(_shared_run(cfg, engine, method, context, say))
                report["max_batch"].setdefault(f"{method}+shared", {})[str(context)] = (
                    report["runs"][-1].get("max_batch")
                )
                _write(report, out_dir, final=False)
            engines.release(engine)
    _write(report, out_dir, final=True, log=say)
    return report


def _shared_run(
    cfg: BenchConfig, engine: Engine, method: str, context: int, say: Log
) -> dict[str, Any]:
    """One shared-document run: prefill the document once, find the largest batch of prompts
    that start with it (its shared pages counted once), and time that batch. The prefix store
    is emptied afterwards, so the next context starts clean."""
    q = cfg.shared_document
    label = f"{method}+shared"
    row: dict[str, Any] = {"method": label, "batch_kind": "own max", "hit_rate_driven": None,
                           "question_tokens": q}
    try:
        doc_s, prefix = prefill_document(engine, context, q, cfg.seed)
        row["document_prefill_s"] = round(doc_s, 4)
        # What a request starts from: the document's whole shared units (its question differs).
        row["shared_tokens"] = 0 if prefix is None else engine.cache.prefix_start(
            prefix, context, new_tokens(cfg.decode_steps, 1, 0), None, context - q
        )
        if prefix is not None:
            row["shared_prefix_bytes"] = engine.cache.prefix_memory([prefix]).as_dict()
        best = max_batch(engine.cache, context, cfg.decode_steps, cfg.max_batch, prefix)
        batch = max(cfg.batches) if cfg.batches else best
        row["max_batch"] = best
        say(f"{label} @ {context} tokens: document prefill {doc_s:.2f} s, {row['shared_tokens']} "
            f"tokens shared, largest batch {best}; timing {batch} ...")
        if batch > best or batch < 1:
            raise CacheCapacityError(f"batch {batch} does not fit (max {best})")
        result = timed_run(engine, context, batch, cfg.decode_steps, cfg.seed, question=q)
        row.update(result.as_dict())
        say(f"  decode {result.decode_tokens_per_s:.1f} tok/s")
    except Exception as err:  # noqa: BLE001 - keep the other runs' results
        row.update(context=context, batch=row.get("max_batch", 0),
                   error=f"{type(err).__name__}: {err}")
        say(f"  FAILED: {row['error']}")
        for r in list(engine.running) + list(engine.waiting):
            engine.abort(r.request_id)
    engine.clear_prefix_cache()
    return row


def _write(
    report: dict[str, Any], out_dir: Path | None, final: bool, log: Log | None = None
) -> None:
    """Refresh the table; write JSON and markdown (after every run) and the plot (at the end)."""
    report["table"] = markdown_table(report)
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "throughput.md").write_text(report["table"] + "\n")
    if final:
        plot = write_plot(report, out_dir / "throughput.png")
        if log is not None:
            log(
                f"wrote {out_dir / 'throughput.json'}, throughput.md"
                + (", throughput.png" if plot else "")
            )
            if not plot:
                log("no plot: matplotlib is not installed (pip install 'shadowkv[plot]')")


def _plan_batches(
    cfg: BenchConfig, method: str, context: int, limits: dict[str, dict[int, int]]
) -> list[tuple[int, str]]:
    """(batch, why) pairs to time for one method and context, each batch once."""
    if cfg.batches:
        return [(b, "requested") for b in sorted(set(cfg.batches))]
    plan = {limits[method][context]: "own max"}
    for other in cfg.methods:
        b = limits[other][context]
        if other != method and b not in plan:
            plan[b] = f"{other} max"
    return [(b, why) for b, why in sorted(plan.items()) if b > 0]


def _meta(
    cfg: BenchConfig,
    engines: LocalEngines | TPEngines,
    device: torch.device,
    dtype: torch.dtype,
    engine_cfg: EngineConfig,
) -> dict[str, Any]:
    model_cfg, model = engines.model_cfg, engines.model
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    config = asdict(cfg)
    config["caches"] = [{"method": c.method, **asdict(c)} for c in cfg.caches]
    config["engine"] = asdict(engine_cfg)  # as the runs used it (batch limit, context, slicing)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv),
        "model": cfg.arch or cfg.model_path,
        "weights": engines.weights,
        "device": str(device),
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "weight_bytes": weight_bytes(model),
        "tensor_parallel": engines.tensor_parallel,
        "per_rank": PER_RANK if engines.tensor_parallel > 1 else None,
        "host_memory_bytes": _host_bytes("SC_PHYS_PAGES"),
        "host_available_bytes": _host_bytes("SC_AVPHYS_PAGES"),
        "model_config": {k: v for k, v in asdict(model_cfg).items() if k != "rope"},
        "bench_config": config,
    }


def _host_bytes(pages: str) -> int | None:
    try:
        return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
