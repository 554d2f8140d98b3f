"""One HTTP request through an ASGI app in this process, its response as a stream of parts.

A replica runs the one-server FastAPI app (``server/app.py``: same routes, key check, errors)
on requests the ingress forwards through a Ray Serve handle. The app is called directly as
ASGI: ``forward`` yields ``("start", status, headers)`` once, then ``("body", bytes)`` per
chunk the app sends, so an SSE stream reaches the ingress token by token. Closing the
generator early (the client left, or the ingress was cancelled) tells the app the client
disconnected, which aborts its engine requests as a dropped connection does in one server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("shadowkv.replicas")

ASGIApp = Callable[..., Awaitable[None]]
Part = tuple[Any, ...]  # ("start", status, headers) or ("body", bytes)


@dataclass(frozen=True)
class ForwardedRequest:
    """What the ingress passes on of a client's request (a plain, picklable value)."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None


def _scope(req: ForwardedRequest) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": req.method, "scheme": "http", "path": req.path,
        "raw_path": req.path.encode(), "query_string": req.query_string, "root_path": "",
        "headers": req.headers, "client": req.client, "server": ("replica", 0), "state": {},
    }


async def forward(app: ASGIApp, req: ForwardedRequest) -> AsyncIterator[Part]:
    parts: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    unread = [req.body]

    async def receive() -> dict[str, Any]:
        if unread:
            return {"type": "http.request", "body": unread.pop(), "more_body": False}
        await gone.wait()  # the body is read: the next message is the client leaving
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await parts.put(message)

    async def run() -> None:
        try:
            await app(_scope(req), receive, send)
        except Exception:  # the app has answered 500 already (ServerErrorMiddleware) and logged
            log.exception("error in %s %s", req.method, req.path)
        finally:
            await parts.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await parts.get()) is not None:
            if message["type"] == "http.response.start":
                yield ("start", message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body" and message.get("body"):
                yield ("body", bytes(message["body"]))
    finally:
        gone.set()
        if not task.done():
            # Give the app a moment to see the disconnect and abort its engine requests.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            task.cancel()
