"""``WorkerStats.queued`` (``/metrics`` ``shadowkv_queue_length``) counts requests only.

The engine thread's inbox carries aborts as well as new requests; an abort is no queued request.
Drives an ``EngineWorker`` without its thread: the test plays the engine thread.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from shadowkv import LLM, EngineConfig, SamplingParams  # noqa: E402
from shadowkv.server.worker import EngineWorker, Handle  # noqa: E402


def test_queue_length_counts_requests_not_pending_aborts(tiny_checkpoint, monkeypatch) -> None:
    llm = LLM(str(tiny_checkpoint("llama")), device="cpu",
              engine=EngineConfig(cache_memory_gb=0.01))
    worker = EngineWorker(llm.engine)
    for _ in range(3):
        worker.abort(Handle([5], SamplingParams(), False, None))  # type: ignore[arg-type]
    worker._publish()
    assert worker.stats().queued == 0, "three aborts waiting in the inbox are not requests"
    llm.engine.add_request([5, 6], SamplingParams(max_tokens=2))
    worker._publish()
    assert worker.stats().queued == 1
    monkeypatch.setattr(EngineWorker, "alive", property(lambda self: True))

    async def submit() -> None:
        worker.submit([7, 8], SamplingParams(max_tokens=2))

    asyncio.run(submit())
    worker._publish()
    assert worker.stats().queued == 2, "one request in the engine, one in the inbox"
    cmds = worker._drain(block=False)  # the engine thread takes the aborts and the request
    assert len(cmds) == 4
    worker._admit(cmds[-1][1])  # type: ignore[index]
    worker._publish()
    assert worker.stats().queued == 2 and len(llm.engine.waiting) == 2


def test_preemptions_reach_metrics(tiny_checkpoint) -> None:
    """``/metrics`` counts preemptions and replayed tokens (optimistic admission)."""
    from shadowkv.server.metrics import metrics_registry, render

    llm = LLM(str(tiny_checkpoint("llama", num_layers=4, vocab_size=96)), device="cpu",
              engine=EngineConfig(cache_memory_gb=0.0008, admission_reserve=2, max_num_seqs=8))
    worker = EngineWorker(llm.engine)
    for k, n in zip(range(5, 13), (90, 100, 84, 120, 96, 88, 110, 93)):
        llm.engine.add_request([(k * i + k) % 90 + 3 for i in range(n)],
                               SamplingParams(max_tokens=24, ignore_eos=True))
    while llm.engine.has_unfinished():
        llm.engine.step()
    worker._publish()
    text = render(metrics_registry(worker)).decode()
    counters = llm.engine.counters
    assert counters["preemptions"] > 0 and counters["replayed_tokens"] > 0
    assert f"shadowkv_preemptions_total {float(counters['preemptions'])}" in text
    assert f"shadowkv_replayed_tokens_total {float(counters['replayed_tokens'])}" in text
