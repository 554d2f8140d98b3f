"""``/metrics``: the engine thread's published snapshot, exposed through prometheus-client.

A collector reads ``EngineWorker.stats()`` at scrape time (one registry per app, so two servers
in one process do not share metrics); prometheus-client writes the text format.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from shadowkv.server.worker import EngineWorker

CONTENT_TYPE = CONTENT_TYPE_LATEST

GAUGES = (
    ("queue_length", "Requests waiting for admission.", "queued"),
    ("running_requests", "Sequences in the running decode batch.", "running"),
    (
        "prefilling_requests",
        "Admitted requests whose prompt is partly prefilled (chunked prefill between chunks).",
        "prefilling",
    ),
    ("generation_tokens_per_second", "Generated tokens per second, recent window.", "tokens_per_s"),
    (
        "cache_device_bytes",
        "Attention-cache bytes held on the compute device.",
        "cache_device_bytes",
    ),
    ("cache_host_bytes", "Attention-cache bytes held in host memory.", "cache_host_bytes"),
    (
        "prefix_store_bytes",
        "Host bytes of the stored prompt prefixes' K/V copies that later prompts share (prefix "
        "sharing, caches that do not share their own pages).",
        "prefix_store_bytes",
    ),
    (
        "prefix_shared_device_bytes",
        "Device bytes of the cache pages the stored prompt prefixes hold (prefix sharing of "
        "cache memory; running requests started from them hold the same pages).",
        "prefix_shared_device_bytes",
    ),
    (
        "prefix_shared_host_bytes",
        "Host bytes of the cache pages the stored prompt prefixes hold.",
        "prefix_shared_host_bytes",
    ),
)
COUNTERS = (
    ("generated_tokens", "Tokens generated since start.", "generated_tokens"),
    ("prompt_tokens", "Prompt tokens admitted since start.", "prompt_tokens"),
    (
        "prefill_tokens",
        "Prompt tokens run through the model (samples of one prompt share one prefill).",
        "prefill_tokens",
    ),
    (
        "prefill_chunks",
        "Prefill chunks run (a prompt prefilled whole is one; a long one several steps' worth).",
        "prefill_chunks",
    ),
    ("engine_steps", "Engine steps (prefills and decode steps).", "steps"),
    (
        "preemptions",
        "Running requests freed and requeued because the cache could not grow them "
        "(admission_reserve); each resumes with the tokens it would have generated.",
        "preemptions",
    ),
    (
        "replayed_tokens",
        "Decode rows spent replaying preempted requests' generated tokens to resume them.",
        "replayed_tokens",
    ),
    ("prefix_hits", "Prefills that reused a stored prompt prefix.", "prefix_hits"),
    (
        "cached_tokens",
        "Prompt tokens served by stored prefixes instead of being prefilled again.",
        "cached_tokens",
    ),
)


class WorkerCollector:
    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        s = self.worker.stats()
        for name, doc, attr in GAUGES:
            yield GaugeMetricFamily(f"shadowkv_{name}", doc, value=getattr(s, attr))
        for name, doc, attr in COUNTERS:
            yield CounterMetricFamily(f"shadowkv_{name}", doc, value=getattr(s, attr))
        copies = CounterMetricFamily(
            "shadowkv_sample_prefill_copies",
            "Samples (n > 1) that took a copy of their prompt's prefill: 'fork' copies the cache, "
            "'replay' (caches that cannot fork, e.g. ShadowKV) stores the recorded prompt again "
            "without running the model.",
            labels=["how"],
        )
        copies.add_metric(["fork"], s.forked_samples)
        copies.add_metric(["replay"], s.replayed_samples)
        yield copies
        outcomes = CounterMetricFamily(
            "shadowkv_requests", "Requests by outcome.", labels=["outcome"]
        )
        for outcome, value in (
            ("finished", s.finished), ("aborted", s.aborted), ("failed", s.failed),
            ("rejected", self.worker.rejected),
        ):
            outcomes.add_metric([outcome], value)
        yield outcomes


def metrics_registry(worker: EngineWorker) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(worker))  # type: ignore[arg-type]
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
