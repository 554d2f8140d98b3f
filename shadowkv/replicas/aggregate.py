"""``/health`` and ``/metrics`` over all replicas, from each replica's ``WorkerStats`` (no Ray).

Metrics keep the one-server names (``server/metrics.py``) with each value summed over the
replicas that answered: counters add up, and so do the gauges, since every gauge is a total
of the server (requests queued or running, tokens per second, cache bytes) that the replicas
hold separately. A replica that restarts starts its counters from zero, so a sum can go down
(Prometheus' ``rate`` reads that as a counter reset). Per-replica series carry a ``replica``
label: whether each is up, requests the ingress sent it, and its requests by outcome.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shadowkv.server.metrics import WorkerCollector
from shadowkv.server.worker import WorkerStats


@dataclass(frozen=True)
class ReplicaSnapshot:
    """What the ingress knows of one replica at scrape time. ``stats`` and ``rejected`` are
    None when the replica did not answer (down or restarting)."""

    name: str
    up: bool
    pid: int | None
    in_flight: int  # requests the ingress has sent it that have not ended
    dispatched: int  # requests the ingress has sent it since the ingress started
    stats: WorkerStats | None = None
    rejected: int | None = None


def sum_stats(stats: Sequence[WorkerStats]) -> WorkerStats:
    """Every field summed (all are counts, bytes or rates the replicas hold separately)."""
    return WorkerStats(**{f.name: sum(getattr(s, f.name) for s in stats) for f in fields(
        WorkerStats)})


class _Summed:
    """The ``EngineWorker`` face ``WorkerCollector`` reads: summed stats and rejections."""

    def __init__(self, snapshots: Sequence[ReplicaSnapshot]) -> None:
        answered = [s for s in snapshots if s.stats is not None]
        self._stats = sum_stats([s.stats for s in answered if s.stats is not None])
        self.rejected = sum(s.rejected or 0 for s in answered)

    def stats(self) -> WorkerStats:
        return self._stats


class ReplicaCollector:
    def __init__(self, snapshots: Sequence[ReplicaSnapshot], prefix_routed: int) -> None:
        self.snapshots, self.prefix_routed = snapshots, prefix_routed

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "shadowkv_replicas_up", "Engine replicas taking requests.",
            value=sum(s.up for s in self.snapshots),
        )
        up = GaugeMetricFamily("shadowkv_replica_up", "1 when the replica takes requests.",
                               labels=["replica"])
        sent = CounterMetricFamily(
            "shadowkv_replica_dispatched", "Requests the ingress sent to the replica.",
            labels=["replica"],
        )
        outcomes = CounterMetricFamily(
            "shadowkv_replica_requests", "The replica's requests by outcome (since it started).",
            labels=["replica", "outcome"],
        )
        for s in self.snapshots:
            up.add_metric([s.name], float(s.up))
            sent.add_metric([s.name], s.dispatched)
            if s.stats is not None:
                for outcome, value in (("finished", s.stats.finished),
                                       ("aborted", s.stats.aborted),
                                       ("failed", s.stats.failed),
                                       ("rejected", s.rejected or 0)):
                    outcomes.add_metric([s.name, outcome], value)
        yield from (up, sent, outcomes)
        yield CounterMetricFamily(
            "shadowkv_prefix_routed",
            "Requests sent to the replica that served their prompt's prefix before.",
            value=self.prefix_routed,
        )


def render_metrics(snapshots: Sequence[ReplicaSnapshot], prefix_routed: int) -> bytes:
    """The Prometheus text of the summed one-server metrics and the per-replica ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(_Summed(snapshots)))  # type: ignore[arg-type]
    registry.register(ReplicaCollector(snapshots, prefix_routed))  # type: ignore[arg-type]
    return generate_latest(registry)


def health_body(snapshots: Sequence[ReplicaSnapshot]) -> tuple[int, dict[str, Any]]:
    """200 while any replica is up (the others' requests go to it), 503 when none is."""
    live = sum(s.up for s in snapshots)
    status = "ok" if live == len(snapshots) else "degraded" if live else "no replica up"
    return (200 if live else 503), {
        "status": status,
        "replicas": [
            {"name": s.name, "up": s.up, "pid": s.pid, "in_flight": s.in_flight}
            for s in snapshots
        ],
    }
