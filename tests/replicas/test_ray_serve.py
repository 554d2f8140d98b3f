"""Two SmolLM2 replicas on Ray Serve, on CPU, through ``shadowkv serve --replicas 2`` (slow
suite): 16 concurrent requests answered as the library answers them, both replicas used, a
shared prefix kept on one replica, and a replica killed mid-run losing no request silently."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("ray.serve", reason="replicas need Ray Serve: pip install 'shadowkv[replicas]'")
httpx = pytest.importorskip("httpx", reason="needs the 'test' extra: pip install 'shadowkv[test]'")

from shadowkv import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
START_S = 300  # a local Ray cluster and two model loads on two busy cores
MAX_TOKENS = 16


@dataclass
class Cluster:
    url: str
    client: Any  # httpx.Client
    log: Path

    def health(self) -> dict[str, Any]:
        return self.client.get("/health").json()

    def metrics(self) -> dict[str, float]:
        text = self.client.get("/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith("shadowkv_")}

    def wait(self, ok, what: str, timeout: float = START_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                h = self.health()
                if ok(h):
                    return h
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1.0)
        raise AssertionError(f"{what}: not after {timeout} s; log:\n{self.log.read_text()[-4000:]}")


def all_up(h: dict[str, Any]) -> bool:
    return all(r["up"] and r["pid"] for r in h.get("replicas", []))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Cluster]:
    port, log = free_port(), tmp_path_factory.mktemp("ray") / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shadowkv", "serve", "--replicas", "2", "--port", str(port),
             "--device", "cpu", "--model", str(smollm2_dir), "--served-model-name", "smollm2"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            c = Cluster(url, client, log)
            c.wait(lambda h: (client.get("/v1/models"), all_up(h))[1], "both replicas up")
            yield c
    finally:
        proc.send_signal(signal.SIGTERM)  # serve.delete, serve.shutdown, ray.shutdown
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def ask(c: Cluster, prompt: str, stream: bool, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """One completion: its status, replica, text and finish reason, or the error it ended with."""
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        r = c.client.post("/v1/completions", json=body)
        out = r.json()
        base = {"status": r.status_code, "replica": r.headers.get("x-shadowkv-replica")}
        if r.status_code != 200:
            return {**base, "error": out["error"]}
        choice = out["choices"][0]
        return {**base, "text": choice["text"], "finish": choice["finish_reason"]}
    text, finish, error, done = [], None, None, False
    with c.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        replica = r.headers.get("x-shadowkv-replica")
        if r.status_code != 200:  # failed before the stream started: a JSON error
            return {"status": r.status_code, "replica": replica,
                    "error": json.loads(r.read())["error"]}
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    continue
                text += [ch["text"] for ch in event["choices"]]
                finish = event["choices"][0]["finish_reason"] or finish
    out = {"status": r.status_code, "replica": replica, "done": done}
    return {**out, "error": error} if error else {**out, "text": "".join(text), "finish": finish}


PROMPTS = [f"Fact {i}: the {w} is" for i, w in enumerate(
    "sun moon sea sky tree river city road cat dog bird fish rain snow wind fire".split())]


def test_sixteen_concurrent_requests_match_the_library_and_use_both_replicas(
    cluster: Cluster, smollm2: Any
) -> None:
    before = cluster.metrics()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: ask(cluster, PROMPTS[i], i % 2 == 1), range(16)))
    after = cluster.metrics()
    for prompt, got in zip(PROMPTS, results):
        want = smollm2.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS))[0].text
        assert got["status"] == 200 and got.get("text") == want, (prompt, got)
    assert {r["replica"] for r in results} == {"engine-0", "engine-1"}
    for name in ("engine-0", "engine-1"):
        key = f'shadowkv_replica_dispatched_total{{replica="{name}"}}'
        assert after[key] > before[key], name
    finished = after['shadowkv_requests_total{outcome="finished"}']
    assert finished - before['shadowkv_requests_total{outcome="finished"}'] == 16


def test_requests_sharing_a_prefix_stay_on_one_replica(cluster: Cluster) -> None:
    doc = ("Ray Serve runs replicas of a deployment; each replica here is one engine with its "
           "own cache, and a prompt prefix it has seen is cheaper for it. ") * 3
    before = cluster.metrics()
    results = [ask(cluster, f"{doc}Question {q}: what is a replica?", False, 4) for q in range(4)]
    after = cluster.metrics()
    assert all(r["status"] == 200 for r in results), results
    assert len({r["replica"] for r in results}) == 1, results
    assert after["shadowkv_prefix_routed_total"] - before["shadowkv_prefix_routed_total"] >= 3
    assert after["shadowkv_prefix_hits_total"] - before["shadowkv_prefix_hits_total"] >= 3


def test_a_client_that_leaves_mid_stream_aborts_its_request(cluster: Cluster) -> None:
    key = 'shadowkv_requests_total{outcome="aborted"}'
    before = cluster.metrics()[key]
    body = {"model": "smollm2", "prompt": "Count slowly: one, two,", "max_tokens": 500,
            "stream": True, "temperature": 0}
    with cluster.client.stream("POST", "/v1/completions", json=body) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 3:
                break  # closing the response drops the connection
    deadline = time.monotonic() + 60
    while cluster.metrics()[key] == before:
        assert time.monotonic() < deadline, "the engine request was not aborted"
        time.sleep(0.5)
    assert cluster.metrics()["shadowkv_running_requests"] == 0
    assert all(rep["in_flight"] == 0 for rep in cluster.health()["replicas"])


def test_a_killed_replica_loses_no_request_silently_and_comes_back(cluster: Cluster) -> None:
    victim = cluster.health()["replicas"][0]
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, cluster, f"Story {i}: once upon a time", i % 2 == 0, 64)
                   for i in range(16)]
        cluster.wait(lambda h: h["replicas"][0]["in_flight"] > 0, "engine-0 busy", 60)
        time.sleep(1.0)  # let its requests start decoding
        os.kill(victim["pid"], signal.SIGKILL)
        results = [f.result(timeout=180) for f in futures]  # none hangs
    ok = [r for r in results if "error" not in r]
    lost = [r for r in results if "error" in r]
    assert len(ok) + len(lost) == 16
    for r in ok:
        assert r["status"] == 200 and r["finish"] == "length" and r["text"], r
    assert lost, "the kill hit no request in flight"
    for r in lost:  # a JSON answer: a 503; a stream (status sent already): an error event
        assert r["error"]["code"] == "replica_lost" and "engine-0" in r["error"]["message"], r
        assert r["status"] == 503 or (r["status"] == 200 and r["done"]), r
    later = [ask(cluster, f"Later {i}: the answer is", i % 2 == 0, 4) for i in range(4)]
    assert all(r["status"] == 200 and "error" not in r for r in later), later
    h = cluster.wait(lambda h: all_up(h) and h["replicas"][0]["pid"] != victim["pid"],
                     "Ray restarted engine-0", 240)
    assert h["status"] == "ok"
    again = [ask(cluster, f"Again {i}: the answer is", False, 4) for i in range(4)]
    assert all(r["status"] == 200 for r in again), again
    assert "engine-0" in {r["replica"] for r in again}
