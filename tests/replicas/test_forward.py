"""A forwarded request through an ASGI app: parts in order, streams chunk by chunk, and an
early close reaches the app as a disconnect (no Ray)."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: "
                    "pip install 'shadowkv[serve]'")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from shadowkv.replicas.forward import ForwardedRequest, forward  # noqa: E402


def make_app(events: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"got": body, "q": request.url.query,
                             "h": request.headers.get("x-test")}, status_code=201)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                events.append("stream closed")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return app


def req(method: str, path: str, body: bytes = b"", query: bytes = b"") -> ForwardedRequest:
    return ForwardedRequest(method, path, query, [(b"x-test", b"yes"),
                                                  (b"content-type", b"application/json")], body)


async def collect(app: FastAPI, r: ForwardedRequest) -> list[tuple]:
    return [p async for p in forward(app, r)]


def test_a_json_answer_is_one_start_and_its_body() -> None:
    parts = asyncio.run(collect(make_app([]), req("POST", "/echo", b'{"a": 1}', b"k=v")))
    assert parts[0][0] == "start" and parts[0][1] == 201
    assert b"".join(p[1] for p in parts[1:]) == b'{"got":{"a":1},"q":"k=v","h":"yes"}'


def test_an_error_in_the_app_is_its_500_answer() -> None:
    parts = asyncio.run(collect(make_app([]), req("GET", "/boom")))
    assert parts[0][:2] == ("start", 500)


def test_a_stream_comes_chunk_by_chunk_and_an_early_close_disconnects() -> None:
    events: list[str] = []

    async def main() -> tuple[list[bytes], float]:
        got = []
        parts = forward(make_app(events), req("GET", "/stream"))
        async for part in parts:
            if part[0] == "body":
                got.append(part[1])
                if len(got) == 3:
                    break
        start = time.monotonic()
        await parts.aclose()
        return got, time.monotonic() - start

    got, closing_s = asyncio.run(main())
    assert got == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert events == ["stream closed"]
    assert closing_s < 2.0  # the app saw the disconnect (not the 5 s fallback cancel)
