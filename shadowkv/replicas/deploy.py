"""N engine replicas on Ray Serve behind one ingress: ``shadowkv serve --replicas N``.

Deployments (one Serve application, route prefix ``/``):

- ``engine-0`` .. ``engine-{N-1}``: one Serve deployment of one replica each. A replica loads
  the model (``llm_from_args``), runs the one-server FastAPI app (``create_app``) with its
  engine thread, and answers ``forward`` calls by running the forwarded request through that
  app (``forward.py``). One deployment per replica, rather than one deployment of N
  replicas, lets the ingress pick the replica (Serve's own router picks among a deployment's
  replicas by load alone and knows nothing of prompt prefixes). Serve's health check
  (``check_health``: the engine thread is alive) and its controller restart a replica whose
  engine stopped or whose process died.
- ``ingress``: the HTTP entry behind Serve's proxy. It reads the body (``--max-request-bytes``),
  asks ``PrefixRouter`` for a replica, forwards the request through a streaming handle and
  relays the response: SSE part by part, JSON whole (so that a replica dying mid-answer gives
  a clean 503, not a cut body). ``/health`` and ``/metrics`` it answers itself from every
  replica's stats (``aggregate.py``). A probe loop pings each replica; one that fails a ping
  or a request is taken out of routing until a ping succeeds again (and, when it came back as
  a new process, its prefixes are forgotten: its store is empty).

Why an ingress that forwards rather than ``serve.ingress`` on the engine deployments: Serve's
proxy would then pick the replica itself, by load only. Forwarding through a handle keeps the
whole app (routes, key check, errors, streaming) in the replica, unchanged, and streaming
works because a ``stream=True`` handle call yields each SSE chunk as the replica's app sends it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from shadowkv.replicas.aggregate import ReplicaSnapshot, health_body, render_metrics
from shadowkv.replicas.forward import ForwardedRequest, Part, forward
from shadowkv.replicas.routing import NoReplicaError, PrefixRouter, RouterConfig, routing_text

log = logging.getLogger("shadowkv.replicas")

APP_NAME = "shadowkv"
# The replica's process died, or is unreachable.
REPLICA_LOST = (RayActorError, ActorUnavailableError)
SSE = b"text/event-stream"


@dataclass(frozen=True)
class ReplicaSettings:
    """How the replicas are deployed (``serve_replicas``' knobs, fixed for a run)."""

    num_replicas: int
    num_gpus: float = 0.0  # per replica: 1 on a GPU machine
    num_cpus: float = 1.0  # per replica (a logical share for Ray's scheduler)
    probe_interval_s: float = 1.0  # ingress pings of every replica
    probe_timeout_s: float = 5.0  # a ping slower than this takes the replica out of routing
    health_check_period_s: float = 2.0  # Serve's check_health calls
    health_check_timeout_s: float = 30.0  # a replica busy with a long step answers late


class EngineReplica:
    """One engine: the one-server app with its engine thread, driven through ``forward``."""

    def __init__(self, args: argparse.Namespace, name: str, app_settings: dict[str, Any]) -> None:
        from shadowkv.commands.common import llm_from_args
        from shadowkv.server import create_app

        self.app = create_app(llm_from_args(args), name, **app_settings)
        self.worker = self.app.state.worker
        self.worker.start()  # the app's lifespan is not run: it is called as plain ASGI

    async def forward(self, req: ForwardedRequest) -> AsyncIterator[Part]:
        async for part in forward(self.app, req):
            yield part

    def ping(self) -> dict[str, Any]:
        return {"alive": self.worker.alive, "pid": os.getpid()}

    def stats(self) -> tuple[Any, int]:
        return self.worker.stats(), self.worker.rejected

    def check_health(self) -> None:
        if not self.worker.alive:
            raise RuntimeError("the engine thread stopped")

    def __del__(self) -> None:
        self.worker.stop()


class Ingress:
    """Routes, forwards and relays; answers ``/health`` and ``/metrics`` for all replicas."""

    def __init__(self, engines: list[Any], settings: ReplicaSettings, max_body_bytes: int,
                 router_config: RouterConfig | None = None) -> None:
        n = len(engines)
        self.engines, self.settings, self.max_body_bytes = engines, settings, max_body_bytes
        self.names = [f"engine-{i}" for i in range(n)]
        self.router = PrefixRouter(n, router_config)
        self.loads, self.dispatched = [0] * n, [0] * n
        self.up = [True] * n  # serve.run returns once every replica is ready
        self.pids: list[int | None] = [None] * n
        self._probe: asyncio.Task[None] | None = None

    async def __call__(self, request: Request) -> Response:
        if self._probe is None:  # started on the first request: the serving event loop
            self._probe = asyncio.create_task(self._probe_loop())
        path = request.url.path
        if path == "/health":
            status, body = health_body(self._snapshots())
            return JSONResponse(body, status_code=status)
        if path == "/metrics":
            return await self._metrics()
        try:
            body = await self._read_body(request)
        except _TooLarge:
            return _error(413, f"the request body is larger than this server's limit of "
                          f"{self.max_body_bytes} bytes (--max-request-bytes)",
                          "invalid_request_error", "request_too_large")
        text = routing_text(path, _json_or_none(body)) if request.method == "POST" else None
        try:
            i = self.router.choose(text, self.loads, self.up)
        except NoReplicaError as err:
            return _error(503, f"{err}; retry shortly", "server_error", "unavailable")
        req = ForwardedRequest(
            request.method, path, request.scope.get("query_string", b""),
            list(request.scope["headers"]), body, request.scope.get("client"),
        )
        return await self._dispatch(i, req)

    async def _read_body(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def _dispatch(self, i: int, req: ForwardedRequest) -> Response:
        self.loads[i] += 1
        self.dispatched[i] += 1
        parts = self.engines[i].options(stream=True).forward.remote(req)
        relayed = False  # from then on _relay owns the load count and the handle
        try:
            _, status, raw_headers = await parts.__anext__()
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}
            headers["x-shadowkv-replica"] = self.names[i]
            if any(k.lower() == b"content-type" and v.startswith(SSE) for k, v in raw_headers):
                relayed = True
                return StreamingResponse(self._relay(i, parts), status_code=status,
                                         headers=headers)
            body = b"".join([part[1] async for part in parts])
        except Exception as err:
            return self._failed(i, err)
        finally:  # also on cancellation (the client left): the replica's app sees a disconnect
            if not relayed:
                self.loads[i] -= 1
                parts.cancel()
        headers["content-length"] = str(len(body))
        return Response(body, status_code=status, headers=headers)

    async def _relay(self, i: int, parts: Any) -> AsyncIterator[bytes]:
        """An SSE body part by part; a replica lost mid-stream ends it with an error event
        (the status line is sent already)."""
        try:
            async for part in parts:
                yield part[1]
        except Exception as err:
            failed = self._failed(i, err)  # as one server ends a stream its engine failed
            yield b"data: " + bytes(failed.body) + b"\n\ndata: [DONE]\n\n"
        finally:
            self.loads[i] -= 1
            parts.cancel()  # no-op when it ended; the client left otherwise

    def _failed(self, i: int, err: Exception) -> JSONResponse:
        if isinstance(err, (*REPLICA_LOST, StopAsyncIteration)):
            self._take_out(i, err)
            answer = _error(
                503, f"replica {self.names[i]} was lost while serving this request "
                f"({type(err).__name__}); it is being restarted and new requests go to the "
                "other replicas: retry", "server_error", "replica_lost",
            )
        else:
            log.exception("forwarding to %s failed", self.names[i], exc_info=err)
            answer = _error(500, f"internal error: {type(err).__name__}", "server_error", None)
        answer.headers["x-shadowkv-replica"] = self.names[i]
        return answer

    def _take_out(self, i: int, why: object) -> None:
        if self.up[i]:
            log.warning("%s out of routing: %s", self.names[i], why)
        self.up[i] = False

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._probe_one(i) for i in range(len(self.engines))))
            await asyncio.sleep(self.settings.probe_interval_s)

    async def _probe_one(self, i: int) -> None:
        try:
            pong = await asyncio.wait_for(self.engines[i].ping.remote(),
                                          self.settings.probe_timeout_s)
        except Exception as err:  # died, restarting (the call waits for it), or too slow
            self._take_out(i, f"ping failed: {type(err).__name__}")
            return
        if pong["pid"] != self.pids[i] and self.pids[i] is not None:
            self.router.forget(i)  # a new process: its prefix store is empty
        self.pids[i] = pong["pid"]
        if not self.up[i] and pong["alive"]:
            log.warning("%s back in routing (pid %s)", self.names[i], pong["pid"])
        self.up[i] = bool(pong["alive"])

    def _snapshots(self, stats: list[Any] | None = None) -> list[ReplicaSnapshot]:
        stats = stats or [None] * len(self.engines)
        return [
            ReplicaSnapshot(
                self.names[i], self.up[i], self.pids[i], self.loads[i], self.dispatched[i],
                *(stats[i] if stats[i] is not None else (None, None)),
            )
            for i in range(len(self.engines))
        ]

    async def _metrics(self) -> Response:
        async def one(i: int) -> Any:
            if not self.up[i]:
                return None
            try:
                return await asyncio.wait_for(self.engines[i].stats.remote(),
                                              self.settings.probe_timeout_s)
            except Exception:
                return None

        stats = await asyncio.gather(*(one(i) for i in range(len(self.engines))))
        text = render_metrics(self._snapshots(list(stats)), self.router.prefix_picks)
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        return Response(text, media_type=CONTENT_TYPE_LATEST)


class _TooLarge(Exception):
    pass


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None  # the replica answers the 400


def _error(status: int, message: str, type: str, code: str | None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def build_app(
    args: argparse.Namespace, name: str, app_settings: dict[str, Any], settings: ReplicaSettings,
) -> Any:
    """The Serve application: ``settings.num_replicas`` engine deployments and the ingress."""
    engine = serve.deployment(
        EngineReplica, num_replicas=1, max_ongoing_requests=100_000,
        health_check_period_s=settings.health_check_period_s,
        health_check_timeout_s=settings.health_check_timeout_s,
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
    )
    engines = [
        engine.options(name=f"engine-{i}").bind(_plain(args), name, app_settings)
        for i in range(settings.num_replicas)
    ]
    ingress = serve.deployment(
        Ingress, name="ingress", num_replicas=1, max_ongoing_requests=100_000,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(engines, settings, app_settings["max_body_bytes"])


def _plain(args: argparse.Namespace) -> argparse.Namespace:
    """The parsed flags without the CLI's callables (what a replica needs to build its LLM)."""
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if not callable(v)})


def start(
    args: argparse.Namespace, name: str, app_settings: dict[str, Any], settings: ReplicaSettings,
    host: str, port: int, address: str | None,
) -> None:
    """Connect to (``address``) or start a Ray cluster, and run the application on it."""
    if address is None:
        # A local cluster sized to the replicas (logical CPUs: what Ray schedules by, not a
        # cap on the threads a replica's torch uses).
        ray.init(num_cpus=max(1, int(settings.num_replicas * settings.num_cpus) + 1),
                 include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args, name, app_settings, settings), name=APP_NAME, route_prefix="/")


def run_until_stopped(stop_ray: bool) -> None:
    """Block until Ctrl-C or SIGTERM, then take the application (and a local cluster) down."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(1.0)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        serve.delete(APP_NAME)
        if stop_ray:
            serve.shutdown()
            ray.shutdown()
