"""The OpenAI-compatible HTTP API: bodies to ``SamplingParams``, engine events back to clients.

Routes: ``/v1/completions``, ``/v1/chat/completions`` (SSE streaming or one JSON answer),
``/v1/models``, ``/v1/models/{id}``, ``/tokenize``, ``/detokenize``, ``/version``, ``/health``,
``/metrics`` (Prometheus text). With an API key, the ``/v1`` routes and ``/tokenize`` /
``/detokenize`` want ``Authorization: Bearer <key>``, checked before the body is read. Errors are
OpenAI-shaped JSON with a 4xx status for anything the client can fix. How a body becomes a
request is in ``server/requests.py``; the OpenAPI document in ``server/openapi.py``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

import shadowkv
from shadowkv.server import metrics as prom
from shadowkv.server.body import DEFAULT_MAX_BODY_BYTES, read_json, validate
from shadowkv.server.openapi import install_openapi, route_docs
from shadowkv.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, Strict
from shadowkv.server.requests import (
    ClientGone,
    Served,
    chat_request,
    completion_request,
    run_chat,
    run_completion,
    to_api_error,
)
from shadowkv.server.responses import (
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    VersionResponse,
    now,
)
from shadowkv.server.worker import EngineWorker

if TYPE_CHECKING:
    from shadowkv.llm import LLM

log = logging.getLogger("shadowkv.server")

DEFAULT_MAX_TOKENS = 1024  # a request that names no max_tokens generates at most this many


class TokenizeRequest(Strict):
    """Text (with or without special tokens) or chat messages, as the endpoints would."""

    prompt: str | None = None
    messages: list[Any] | None = None
    tools: list[Any] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(Strict):
    tokens: list[int]


def create_app(
    llm: LLM,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> FastAPI:
    """An app serving ``llm`` as ``model_name``; its engine thread runs while the app is up."""
    worker = EngineWorker(llm.engine)
    registry = prom.metrics_registry(worker)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(
        title="shadowkv", version=shadowkv.__version__, lifespan=lifespan, docs_url=None,
        redoc_url=None,
    )
    served = Served(llm, worker, model_name, default_max_tokens)
    app.state.worker = worker
    app.state.llm = llm
    _add_error_handlers(app)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        sent = request.headers.get("authorization", "")
        scheme, _, token = sent.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), api_key.encode()
        ):
            raise APIError(
                401,
                "invalid or missing API key; send the header 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )

    keyed = [Depends(check_key)]
    v1 = APIRouter(prefix="/v1", dependencies=keyed)
    secured = api_key is not None

    async def body_of(request: Request, model: type[Any]) -> Any:
        return validate(model, await read_json(request, max_body_bytes))

    @v1.post("/completions", **route_docs(CompletionRequest, "completion", secured))
    async def completions(request: Request) -> Any:
        body = await body_of(request, CompletionRequest)
        return await run_completion(served, request, await completion_request(served, body))

    @v1.post("/chat/completions", **route_docs(ChatCompletionRequest, "chat", secured))
    async def chat_completions(request: Request) -> Any:
        body = await body_of(request, ChatCompletionRequest)
        return await run_chat(served, request, await chat_request(served, body))

    def card() -> ModelCard:
        return ModelCard(
            id=model_name, created=now(), owned_by="shadowkv", max_model_len=llm.max_model_len,
            cache_method=llm.cache_config.method,
        )

    @v1.get("/models", **route_docs(None, ModelList, secured))
    async def models() -> dict[str, Any]:
        return ModelList(data=[card()]).model_dump()

    @v1.get("/models/{model_id:path}", **route_docs(None, ModelCard, secured, not_found=True))
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise served.unknown_model(model_id)
        return card().model_dump()

    app.include_router(v1)
    extra = APIRouter(dependencies=keyed)

    @extra.post("/tokenize", **route_docs(TokenizeRequest, TokenizeResponse, secured))
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await body_of(request, TokenizeRequest)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt or messages", param="prompt",
                           code="invalid_value")
        if body.prompt is not None:
            ids = await served.encode(body.prompt, body.add_special_tokens, limit=False)
        else:
            chat = validate(
                ChatCompletionRequest, {"messages": body.messages, "tools": body.tools}
            )
            ids, _ = await served.chat_prompt(chat)
        return TokenizeResponse(
            tokens=ids, count=len(ids), max_model_len=llm.max_model_len
        ).model_dump()

    @extra.post("/detokenize", **route_docs(DetokenizeRequest, DetokenizeResponse, secured))
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await body_of(request, DetokenizeRequest)
        vocab = llm.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens",
                           code="invalid_value")
        text = await asyncio.to_thread(llm.tokenizer.decode, body.tokens, False)
        return DetokenizeResponse(prompt=text).model_dump()

    app.include_router(extra)

    @app.get("/version", **route_docs(None, VersionResponse, False))
    async def version() -> dict[str, str]:
        return {"version": shadowkv.__version__}

    @app.get("/health", **route_docs(None, HealthResponse, False, unavailable=True))
    async def health() -> JSONResponse:
        ok = worker.alive
        return JSONResponse(
            {"status": "ok" if ok else "engine thread stopped"}, status_code=200 if ok else 503
        )

    @app.get("/metrics", **route_docs(None, "metrics", False))
    async def metrics() -> Response:
        return Response(prom.render(registry), media_type=prom.CONTENT_TYPE)

    install_openapi(app, secured)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(err.status_code, str(err.detail), code=None))

    async def client_gone(request: Request, err: ClientGone) -> JSONResponse:
        return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)

    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path, exc_info=err)
        return await api_error(request, to_api_error(err, None))

    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientGone, client_gone)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)
