"""/health and /metrics over replicas, from their stats (no Ray)."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

pytest.importorskip(
    "prometheus_client", reason="metrics need the 'serve' extra: pip install 'shadowkv[serve]'"
)

from shadowkv.replicas.aggregate import (  # noqa: E402
    ReplicaSnapshot,
    health_body,
    render_metrics,
    sum_stats,
)
from shadowkv.server.worker import WorkerStats  # noqa: E402


def stats(base: int) -> WorkerStats:
    """Every field a different value, so a field summed from the wrong one shows."""
    return WorkerStats(**{f.name: base + i for i, f in enumerate(fields(WorkerStats))})


def samples(text: bytes) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(shadowkv_\S+) (\S+)$", text.decode(), re.M)}


def test_sum_stats_adds_every_field() -> None:
    a, b = stats(1), stats(100)
    total = sum_stats([a, b])
    for f in fields(WorkerStats):
        assert getattr(total, f.name) == getattr(a, f.name) + getattr(b, f.name), f.name
    assert sum_stats([]) == WorkerStats()


def test_metrics_sum_the_replicas_that_answered_and_label_each() -> None:
    snaps = [
        ReplicaSnapshot("engine-0", True, 11, 2, 7, stats(1), 3),
        ReplicaSnapshot("engine-1", True, 12, 0, 5, stats(100), 4),
        ReplicaSnapshot("engine-2", False, None, 0, 1),  # down: no stats
    ]
    m = samples(render_metrics(snaps, prefix_routed=6))
    a, b = stats(1), stats(100)
    assert m["shadowkv_generated_tokens_total"] == a.generated_tokens + b.generated_tokens
    assert m["shadowkv_queue_length"] == a.queued + b.queued  # gauges are summed too
    assert m['shadowkv_requests_total{outcome="rejected"}'] == 7
    assert m["shadowkv_replicas_up"] == 2
    assert m['shadowkv_replica_up{replica="engine-2"}'] == 0
    assert m['shadowkv_replica_dispatched_total{replica="engine-1"}'] == 5
    assert m['shadowkv_replica_requests_total{outcome="finished",replica="engine-0"}'] == a.finished
    assert not any('replica="engine-2",' in k or 'outcome="finished",replica="engine-2"' in k
                   for k in m)
    assert m["shadowkv_prefix_routed_total"] == 6


@pytest.mark.parametrize("up, code, status", [
    ((True, True), 200, "ok"), ((True, False), 200, "degraded"),
    ((False, False), 503, "no replica up"),
])
def test_health_is_ok_while_any_replica_is_up(up, code, status) -> None:
    snaps = [ReplicaSnapshot(f"engine-{i}", u, 10 + i, i, 0) for i, u in enumerate(up)]
    got_code, body = health_body(snaps)
    assert (got_code, body["status"]) == (code, status)
    assert [r["up"] for r in body["replicas"]] == list(up)
    assert [r["pid"] for r in body["replicas"]] == [10, 11]
