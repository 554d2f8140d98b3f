"""Response bodies: declared as pydantic models (so ``/openapi.json`` states them) and built
through them (so what is sent is what is declared)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel

from shadowkv.engine.request import Logprob


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    """OpenAI's breakdown of the prompt tokens: ``cached_tokens`` were not prefilled again (a
    stored prefix served them; see ``engine/prefix.py``)."""

    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @staticmethod
    def of(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int
    cache_method: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class HealthResponse(BaseModel):
    status: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


TokenText = Callable[[int], str]


def completion_logprobs(
    entries: Sequence[Logprob | None], token_ids: Sequence[int], text: TokenText, start: int
) -> CompletionLogprobs:
    """The legacy completions format; ``None`` entries (the first prompt token) give nulls."""
    tokens = [text(t) for t in token_ids]
    offsets, pos = [], start
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None if e is None else e[0] for e in entries],
        top_logprobs=[
            None if e is None else {text(t): lp for t, lp in e[1]} for e in entries
        ],
        text_offset=offsets,
    )


def chat_logprobs(
    entries: Sequence[Logprob], token_ids: Sequence[int], text: TokenText
) -> ChoiceLogprobs:
    def top(t: int, lp: float) -> TopLogprob:
        s = text(t)
        return TopLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8")))

    content = []
    for t, (lp, alts) in zip(token_ids, entries):
        s = text(t)
        content.append(
            TokenLogprob(
                token=s, logprob=lp, bytes=list(s.encode("utf-8")),
                top_logprobs=[top(a, alp) for a, alp in alts],
            )
        )
    return ChoiceLogprobs(content=content)


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    usage: Usage | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` (the usage-only chunk at the end has no choices)."""
    body: dict[str, Any] = {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def completion_chunk(
    rid: str, model: str, created: int, choices: list[dict[str, Any]], usage: Usage | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body
