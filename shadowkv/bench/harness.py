"""Driving an ``Engine`` with random token ids: engine construction, batch sizing, one timed run.

``LLM`` needs a checkpoint directory and a tokenizer; a throughput run needs neither (prompts are
random ids of an exact length), so it builds the ``Engine`` directly with ``StubTokenizer``.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from shadowkv.bench.synthetic import synthetic_prompt
from shadowkv.cache import AttentionCache, CacheCapacityError
from shadowkv.cache.base import SharedPrefix
from shadowkv.cache.methods import CacheConfig
from shadowkv.cache.timing import SpanTimer
from shadowkv.config import EngineConfig, ModelConfig
from shadowkv.engine.engine import Engine
from shadowkv.engine.sampling import SamplingParams
from shadowkv.models.llama import LlamaModel


class StubTokenizer:
    """Stands in for ``Tokenizer``: no EOS, and every id sequence decodes to the empty string."""

    eos_token_id: int | None = None
    bos_token_id: int | None = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


def build_engine(
    model: LlamaModel,
    model_cfg: ModelConfig,
    cache_cfg: CacheConfig,
    engine_cfg: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> Engine:
    """An ``Engine`` over an already-built model, as ``LLM`` makes one, with ``StubTokenizer``."""
    tokenizer: Any = StubTokenizer()  # duck-types the two members the engine uses
    return Engine(model, model_cfg, tokenizer, cache_cfg, engine_cfg, device, dtype)


# Full-batch decode steps run before timing starts: the first step of a batch shape captures its
# CUDA graph (engine/decode_runner.py), which is set-up, not decoding.
WARMUP_STEPS = 1


def new_tokens(decode_steps: int, batch: int, index: int) -> int:
    """``max_tokens`` of request ``index`` of ``batch`` so that all finish on the same step.

    The engine prefills one prompt per step after the running requests' decode (the harness
    builds it with ``max_num_batched_tokens=1``), so request ``i`` decodes ``batch - 1 - i``
    tokens before the last prompt is in; giving it as many extra tokens leaves every request
    ``WARMUP_STEPS + decode_steps`` decode steps at the full batch, after which all stop together.
    """
    return 1 + WARMUP_STEPS + decode_steps + (batch - 1 - index)


def fits(
    cache: AttentionCache, context: int, decode_steps: int, batch: int,
    prefix: SharedPrefix | None = None,
) -> bool:
    """Whether ``batch`` sequences of ``context`` prompt tokens fit the cache together.

    Reserves them (the cache's own accounting of device and host pools), then frees them,
    without allocating pools the cache allocates lazily (``AttentionCache.planning``). With
    ``prefix`` (a shared document every prompt starts with) each sequence holds the prefix's
    pages instead of taking its own where the cache shares them (``prefix_start``): pages held
    once, counted once.
    """
    added: list[int] = []
    with cache.planning():
        try:
            for i in range(batch):
                new = new_tokens(decode_steps, batch, i)
                n = 0
                if prefix is not None:
                    n = cache.prefix_start(prefix, context, new, None, prefix.num_tokens)
                start = {"prefix": prefix, "prefix_tokens": n} if n else {}
                if not cache.can_add(context, new, **start):
                    return False
                seq_id = -1 - i  # engine request ids are >= 0
                cache.add_sequence(seq_id, context, new, **start)
                added.append(seq_id)
            return True
        except CacheCapacityError:
            return False
        finally:
            for seq_id in added:
                cache.free_sequence(seq_id)


def max_batch(
    cache: AttentionCache, context: int, decode_steps: int, limit: int,
    prefix: SharedPrefix | None = None,
) -> int:
    """The largest batch (<= ``limit``) of ``context``-token prompts the cache admits at once
    (with ``prefix``: each starting with that shared document, ``fits``).

    ``fits`` is monotone in the batch size, so a doubling search then bisection finds it with
    O(log limit) reservations instead of trial allocations.
    """
    if not fits(cache, context, decode_steps, 1, prefix):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(cache, context, decode_steps, hi, prefix):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)  # lo fits, hi does not (or is past the limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(cache, context, decode_steps, mid, prefix) else (lo, mid)
    return lo


@dataclass(frozen=True)
class RunResult:
    """One timed run: ``batch`` prompts of ``context`` tokens, then ``decode_steps`` full steps."""

    context: int
    batch: int
    decode_steps: int
    prefill_s: float  # mean wall time of one prompt's prefill step
    ttft_s: float  # first request: arrival to first token (its prefill alone)
    ttft_mean_s: float  # mean over the batch (later prompts wait for earlier ones)
    decode_s: float  # wall time of the full-batch decode steps
    cache_device_bytes: int
    cache_host_bytes: int
    dense_bytes: int
    peak_device_bytes: int
    activation_bytes: int  # device peak above what was allocated before the run (CUDA only)
    hit_rate: float | None
    svd_s: float | None = None  # ShadowKV: time factorising prompt keys, all prompts together
    decode_mode: str = "eager"  # how decode steps ran (engine/decode_runner.py)
    prefill: str = "model"  # "synthetic": generated K/V stored, no model prefill timed
    # Each request's generated token ids (greedy), for comparing runs; not in ``as_dict``.
    output_ids: tuple[tuple[int, ...], ...] = ()

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * self.decode_steps / self.decode_s

    def as_dict(self) -> dict[str, Any]:
        timed = self.prefill == "model"  # a synthetic prefill's times are not a prefill's
        return {
            "context": self.context,
            "batch": self.batch,
            "decode_steps": self.decode_steps,
            "prefill": self.prefill,
            "prefill_s": round(self.prefill_s, 4) if timed else None,
            "prefill_tokens_per_s": round(self.context / self.prefill_s, 1) if timed else None,
            "ttft_s": round(self.ttft_s, 4) if timed else None,
            "ttft_mean_s": round(self.ttft_mean_s, 4) if timed else None,
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "decode_ms_per_step": round(1000 * self.decode_s / self.decode_steps, 3),
            "decode_mode": self.decode_mode,
            "hit_rate": None if self.hit_rate is None else round(self.hit_rate, 4),
            "svd_share_of_prefill": (
                round(self.svd_s / (self.prefill_s * self.batch), 4)
                if self.svd_s is not None and timed
                else None
            ),
            "cache_device_bytes": self.cache_device_bytes,
            "cache_host_bytes": self.cache_host_bytes,
            "dense_bytes": self.dense_bytes,
            "peak_device_bytes": self.peak_device_bytes,
            "activation_bytes": self.activation_bytes,
        }


def bench_prompts(
    vocab: int, context: int, batch: int, seed: int, question: int = 0
) -> list[list[int]]:
    """``batch`` random prompts of ``context`` tokens. With ``question`` > 0 they share one
    document (their first ``context - question`` tokens) and each ends with its own question
    (prompt ``i`` with question ``i + 1``: question 0 is ``prefill_document``'s)."""
    gen = torch.Generator().manual_seed(seed)
    if not question:
        return torch.randint(0, vocab, (batch, context), generator=gen).tolist()
    doc = torch.randint(0, vocab, (context - question,), generator=gen).tolist()
    questions = torch.randint(0, vocab, (batch + 1, question), generator=gen).tolist()
    return [doc + q for q in questions[1:]]


def prefill_document(
    engine: Engine, context: int, question: int, seed: int
) -> tuple[float, SharedPrefix | None]:
    """Prefill the shared document of ``bench_prompts(..., question)`` once, as a request of its
    own (question 0, one token generated), so the engine's prefix store holds it. Returns the
    prefill's seconds and the cache pages the store keeps of it (None when the cache does not
    share its memory: then only the prefill's computation is shared)."""
    if engine.prefix_store is None:
        raise ValueError("a shared-document run needs EngineConfig(prefix_cache=True)")
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_cfg.vocab_size
    doc = torch.randint(0, vocab, (context - question,), generator=gen).tolist()
    prompt = doc + torch.randint(0, vocab, (1, question), generator=gen).tolist()[0]
    cfg = engine.cfg
    engine.cfg = replace(cfg, max_num_batched_tokens=1, chunked_prefill=False)
    try:
        _sync(engine.device)
        start = time.perf_counter()
        engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        _sync(engine.device)
        seconds = time.perf_counter() - start
    finally:
        engine.cfg = cfg
    use = engine.prefix_store.find_prefix(prompt, touch=False)
    return seconds, None if use is None else use.entry.shared


def timed_run(
    engine: Engine, context: int, batch: int, decode_steps: int, seed: int = 0,
    prefill: str = "model", question: int = 0,
) -> RunResult:
    """``_timed_run`` with the engine prefilling one whole prompt per step
    (``max_num_batched_tokens=1``, no chunking) so each prefill is timed alone and
    ``new_tokens`` lines the requests up. ``question`` > 0: the prompts share one document
    (``bench_prompts``), which ``prefill_document`` has put in the prefix store."""
    cfg = engine.cfg
    whole = replace(cfg, max_num_batched_tokens=1, chunked_prefill=False)
    if whole == cfg:  # already so (run_throughput's engines; a TPEngine's cfg is not settable)
        return _timed_run(engine, context, batch, decode_steps, seed, prefill, question)
    engine.cfg = whole
    try:
        return _timed_run(engine, context, batch, decode_steps, seed, prefill, question)
    finally:
        engine.cfg = cfg


def _timed_run(
    engine: Engine, context: int, batch: int, decode_steps: int, seed: int, prefill: str,
    question: int = 0,
) -> RunResult:
    """Prefill ``batch`` random prompts and decode until each made ``decode_steps`` full steps.

    ``prefill="synthetic"`` stores generated K/V instead of running the model over the prompts
    (``bench/synthetic.py``): decode is timed the same, prefill figures mean nothing then.
    """
    device = engine.device
    prompts = bench_prompts(engine.model_cfg.vocab_size, context, batch, seed, question)
    cache = engine.cache
    if hasattr(cache, "reset_hit_rate"):
        cache.reset_hit_rate()
    svd_timer = None
    if hasattr(cache, "svd_timer"):  # ShadowKV: time the factorisations inside the prefills
        svd_timer = cache.svd_timer = SpanTimer(device)
    baseline = _allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reqs = [
        engine.add_request(
            p,
            SamplingParams(max_tokens=new_tokens(decode_steps, batch, i), ignore_eos=True),
            prompt_kv=synthetic_prompt(p, engine, seed + i) if prefill == "synthetic" else None,
        )
        for i, p in enumerate(prompts)
    ]
    decode_s, full_steps, mem, most_running, warmup = 0.0, 0, None, 0, 0
    while engine.has_unfinished():
        _sync(device)
        start = time.perf_counter()
        outs = engine.step()
        _sync(device)
        elapsed = time.perf_counter() - start
        # Decoded together this step (a prefill's first token is a request's only one).
        most_running = max(most_running, sum(len(o.request.output_ids) > 1 for o in outs))
        if engine.last_step != "decode":
            continue  # a prefill, alone or after a decode (timed per request below)
        if len(outs) == batch:
            if mem is None:
                mem = cache.memory()  # every sequence live, before any finishes
            if warmup < WARMUP_STEPS:
                warmup += 1
                continue
            decode_s, full_steps = decode_s + elapsed, full_steps + 1
    # Whole prompts, one per step: admission to first token is the prefill.
    prefill_times = [r.first_token - r.prefill_start for r in reqs]  # type: ignore[operator]
    if full_steps != decode_steps or mem is None:
        why = (
            f"at most {most_running} of them ran at once: the cache admitted fewer than it "
            "reserved in the batch search"
            if most_running < batch
            else "the engine's scheduling changed; update shadowkv.bench.harness"
        )
        raise RuntimeError(
            f"expected {batch} prefills and {decode_steps} full-batch decode steps, saw "
            f"{len(prefill_times)} and {full_steps}; {why}"
        )
    ttfts = [r.first_token - r.arrival for r in reqs]  # type: ignore[operator]
    svd_s = None
    if svd_timer is not None:
        svd_s, cache.svd_timer = svd_timer.take(), None
    peak = _peak(device)
    return RunResult(
        context=context,
        batch=batch,
        decode_steps=decode_steps,
        prefill_s=statistics.mean(prefill_times),
        ttft_s=ttfts[0],
        ttft_mean_s=statistics.mean(ttfts),
        decode_s=decode_s,
        cache_device_bytes=mem.device_bytes,
        cache_host_bytes=mem.host_bytes,
        dense_bytes=mem.dense_bytes,
        peak_device_bytes=peak,
        activation_bytes=max(0, peak - baseline) if device.type == "cuda" else 0,
        hit_rate=_hit_rate(cache),
        svd_s=svd_s,
        decode_mode=engine.runner.mode,
        prefill=prefill,
        output_ids=tuple(tuple(r.output_ids) for r in reqs),
    )


def _hit_rate(cache: AttentionCache) -> float | None:
    fn = getattr(cache, "hit_rate", None)
    if fn is None:
        return None
    rates = fn()
    rates = rates if isinstance(rates, (list, tuple)) else [rates]
    seen = [float(r) for r in rates if not math.isnan(float(r))]
    return statistics.mean(seen) if seen else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0


def _peak(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
