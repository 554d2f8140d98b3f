"""The OpenAI-compatible HTTP API: bodies to ``SamplingParams``, engine events back to clients.

Routes: ``/v1/completions``, ``/v1/chat/completions`` (SSE streaming or one JSON answer),
``/v1/models``, ``/health``, ``/metrics`` (Prometheus text). With an API key, every ``/v1`` route
wants ``Authorization: Bearer <key>``. Errors are OpenAI-shaped JSON with a 4xx status for
anything the client can fix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from shadowkv.cache.base import CacheCapacityError, CacheOptionsError
from shadowkv.engine.engine import ContextLengthError, PromptError
from shadowkv.engine.sampling import SamplingError
from shadowkv.errors import USER_ERRORS
from shadowkv.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    Usage,
    chat_body,
    chat_chunk,
    completion_body,
    new_id,
    now,
)
from shadowkv.server.worker import (
    Delta,
    EngineFailure,
    EngineWorker,
    Event,
    Failed,
    Finished,
    Handle,
    WorkerStats,
    WorkerStopped,
)

if TYPE_CHECKING:
    from shadowkv.llm import LLM

log = logging.getLogger("shadowkv.server")

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming handler checks that its client is there


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def create_app(llm: LLM, model_name: str, api_key: str | None = None) -> FastAPI:
    """An app serving ``llm`` as ``model_name``; its engine thread runs while the app is up."""
    worker = EngineWorker(llm.engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="shadowkv", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.state.llm = llm
    _add_error_handlers(app)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        sent = request.headers.get("authorization", "")
        scheme, _, token = sent.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise APIError(
                401,
                "invalid or missing API key; send the header 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    def check_model(body: SamplingFields) -> None:
        if body.model not in (None, model_name):
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server serves "
                f"{model_name!r} (see /v1/models)",
                param="model",
                code="model_not_found",
            )
        body.check_supported()

    async def submit(
        request: Request, body: SamplingFields, ids: list[int], max_tokens: int | None, param: str
    ) -> tuple[Handle, Event]:
        """Queue a request and wait for its first event (a non-streamed one: its answer).

        Waiting before answering lets errors found at admission still get a 4xx status.
        """
        room = llm.max_model_len - len(ids)
        try:
            params = body.sampling_params(max_tokens if max_tokens is not None else max(1, room))
            options = body.cache_options()
            handle = worker.submit(ids, params, stream=bool(body.stream), cache_options=options)
        except USER_ERRORS as err:
            raise to_api_error(err, param) from err
        first = await next_event(handle, request, worker)
        if isinstance(first, Failed):
            handle.closed = True
            raise to_api_error(first.error, param) from first.error
        return handle, first

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body)
        prompt = body.single_prompt()
        ids = (
            prompt
            if isinstance(prompt, list)
            else await asyncio.to_thread(llm.tokenizer.encode, prompt)
        )
        handle, first = await submit(request, body, ids, body.max_tokens, "prompt")
        rid, created = new_id("cmpl"), now()

        def chunk(text: str, finish: str | None, usage: Usage | None = None) -> dict[str, Any]:
            body_ = completion_body(rid, model_name, text, finish, usage, created)
            if usage is not None and finish is None:
                body_["choices"] = []
            return body_

        if body.stream:
            return sse(stream_events(handle, first, worker, chunk, body.include_usage, None))
        done = collect(handle, first)
        return completion_body(
            rid,
            model_name,
            done.text,
            done.finish_reason,
            Usage.of(done.prompt_tokens, done.completion_tokens),
            created,
        )

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body)
        try:
            ids = await asyncio.to_thread(llm.tokenizer.chat_ids, body.chat_messages())
        except ValueError as err:  # no chat template, or the template refused the messages
            raise APIError(400, str(err), param="messages") from err
        max_tokens = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        handle, first = await submit(request, body, ids, max_tokens, "messages")
        rid, created = new_id("chatcmpl"), now()

        def chunk(text: str, finish: str | None, usage: Usage | None = None) -> dict[str, Any]:
            delta = {"content": text} if text else {}
            return chat_chunk(rid, model_name, delta, finish, created, usage)

        if body.stream:
            opening = chat_chunk(
                rid, model_name, {"role": "assistant", "content": ""}, None, created
            )
            return sse(stream_events(handle, first, worker, chunk, body.include_usage, opening))
        done = collect(handle, first)
        return chat_body(
            rid,
            model_name,
            done.text,
            done.finish_reason,
            Usage.of(done.prompt_tokens, done.completion_tokens),
            created,
        )

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": model_name,
            "object": "model",
            "created": now(),
            "owned_by": "shadowkv",
            "max_model_len": llm.max_model_len,
            "cache_method": llm.cache_config.method,
        }
        return {"object": "list", "data": [card]}

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.alive
        return JSONResponse(
            {"status": "ok" if ok else "engine thread stopped"}, status_code=200 if ok else 503
        )

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            render_metrics(worker.stats(), worker.rejected), media_type="text/plain; version=0.0.4"
        )

    return app


async def next_event(handle: Handle, request: Request, worker: EngineWorker) -> Event:
    """The handle's next event; aborts the request and raises ``ClientGone`` if the client left.

    Streams only wait here for their first event; after that Starlette cancels them on disconnect.
    """
    while True:
        try:
            return await asyncio.wait_for(handle.events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                worker.abort(handle)
                raise ClientGone from None


def collect(handle: Handle, event: Event) -> Finished:
    """The answer of a non-streamed request, whose only event is the last one."""
    handle.closed = True
    if isinstance(event, Failed):
        raise to_api_error(event.error, None) from event.error
    if not isinstance(event, Finished):
        raise RuntimeError(f"a non-streamed request got {type(event).__name__} before its end")
    return event


Chunk = Callable[..., dict[str, Any]]


async def stream_events(
    handle: Handle,
    event: Event,
    worker: EngineWorker,
    chunk: Chunk,
    include_usage: bool,
    opening: dict[str, Any] | None,
) -> AsyncIterator[str]:
    """Server-sent events for one request; a closed connection aborts it (Starlette cancels us)."""
    try:
        if opening is not None:
            yield _sse(opening)
        while True:
            if isinstance(event, Delta):
                yield _sse(chunk(event.text, None))
            elif isinstance(event, Finished):
                handle.closed = True
                if event.tail:
                    yield _sse(chunk(event.tail, None))
                yield _sse(chunk("", event.finish_reason))
                if include_usage:
                    yield _sse(
                        chunk("", None, Usage.of(event.prompt_tokens, event.completion_tokens))
                    )
                break
            else:
                handle.closed = True
                yield _sse(to_api_error(event.error, None).body())
                break
            event = await handle.events.get()
        yield "data: [DONE]\n\n"
    finally:
        if not handle.closed:
            worker.abort(handle)


def sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def to_api_error(err: Exception, param: str | None) -> APIError:
    """The HTTP answer for an exception: 4xx for what the client can fix, 5xx otherwise."""
    if isinstance(err, APIError):
        return err
    msg = str(err)
    if isinstance(err, ContextLengthError):
        return APIError(400, msg, param=param, code="context_length_exceeded")
    if isinstance(err, CacheCapacityError):
        return APIError(400, msg, param="max_tokens", code="cache_capacity_exceeded")
    if isinstance(err, SamplingError):
        # SamplingParams messages start with the offending field's name.
        return APIError(400, msg, param=msg.split(" ", 1)[0], code="invalid_parameter")
    if isinstance(err, PromptError):
        return APIError(400, msg, param=param, code="invalid_prompt")
    if isinstance(err, CacheOptionsError):
        return APIError(400, msg, param="cache", code="invalid_parameter")
    if isinstance(err, USER_ERRORS):
        return APIError(400, msg, param=param)
    if isinstance(err, WorkerStopped):
        return APIError(503, msg, type="server_error", code="unavailable")
    if isinstance(err, EngineFailure):
        return APIError(500, msg, type="server_error", code="engine_failure")
    return APIError(500, f"internal error: {type(err).__name__}", type="server_error")


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            message = f"the request body is not valid JSON: {detail}".strip()
            return await api_error(request, APIError(400, message, code="invalid_json"))
        name = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{name + ': ' if name else ''}{first.get('msg', 'invalid request')}"
        return await api_error(request, APIError(400, message, param=name, code="invalid_value"))

    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(err.status_code, str(err.detail), code=None))

    async def client_gone(request: Request, err: ClientGone) -> JSONResponse:
        return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)

    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path, exc_info=err)
        return await api_error(request, to_api_error(err, None))

    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientGone, client_gone)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)


def render_metrics(stats: WorkerStats, rejected: int) -> str:
    """Prometheus text exposition of the engine's counters and gauges."""
    rows = [
        ("queue_length", "gauge", "Requests waiting for admission.", stats.queued),
        ("running_requests", "gauge", "Sequences in the running decode batch.", stats.running),
        (
            "generated_tokens_total",
            "counter",
            "Tokens generated since start.",
            stats.generated_tokens,
        ),
        (
            "prompt_tokens_total",
            "counter",
            "Prompt tokens admitted since start.",
            stats.prompt_tokens,
        ),
        (
            "generation_tokens_per_second",
            "gauge",
            "Generated tokens per second, recent window.",
            round(stats.tokens_per_s, 3),
        ),
        (
            "cache_device_bytes",
            "gauge",
            "Attention-cache bytes held on the compute device.",
            stats.cache_device_bytes,
        ),
        (
            "cache_host_bytes",
            "gauge",
            "Attention-cache bytes held in host memory.",
            stats.cache_host_bytes,
        ),
        ("engine_steps_total", "counter", "Engine steps (prefills and decode steps).", stats.steps),
    ]
    lines: list[str] = []
    for name, kind, help_text, value in rows:
        lines += [
            f"# HELP shadowkv_{name} {help_text}",
            f"# TYPE shadowkv_{name} {kind}",
            f"shadowkv_{name} {value}",
        ]
    lines += [
        "# HELP shadowkv_requests_total Requests by outcome.",
        "# TYPE shadowkv_requests_total counter",
    ]
    outcomes = {
        "finished": stats.finished,
        "aborted": stats.aborted,
        "failed": stats.failed,
        "rejected": rejected,
    }
    lines += [f'shadowkv_requests_total{{outcome="{k}"}} {v}' for k, v in outcomes.items()]
    return "\n".join(lines) + "\n"
