"""Request and response bodies of the OpenAI-compatible API (the subset we serve).

Requests are validated here for shape and type only; value ranges are checked by
``SamplingParams`` so the library and the server refuse the same things with the same words.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shadowkv.cache.base import CacheOptions
from shadowkv.engine.sampling import SamplingParams


class APIError(Exception):
    """An error answered as OpenAI-style JSON: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    include_usage: bool = False


class CacheFields(BaseModel):
    """The ``cache`` extension: this request's settings of the server's cache method."""

    model_config = ConfigDict(extra="forbid")  # a misspelt knob must not be silently ignored

    exact: bool = False
    sparse_budget: float | None = None


class SamplingFields(BaseModel):
    """Fields shared by both endpoints; unknown fields are ignored (OpenAI clients send extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    # Clients may send null for "the default", so optional fields take None and resolve later.
    temperature: float | None = None  # OpenAI's default is 1
    top_p: float | None = None
    top_k: int | None = None  # an extension (vLLM has it too); 0 disables it
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension for benchmarks
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    cache: CacheFields | None = None  # an extension: per-request cache settings

    def cache_options(self) -> CacheOptions | None:
        """The ``cache`` field as engine options (value checks raise ``CacheOptionsError``)."""
        if self.cache is None:
            return None
        return CacheOptions(exact=self.cache.exact, sparse_budget=self.cache.sparse_budget)

    def check_supported(self) -> None:
        """Refuse what we parse but do not implement, naming the field."""
        if self.n not in (None, 1):
            raise APIError(
                400,
                f"n={self.n} is not supported; only n=1 (send one request per sample)",
                param="n",
                code="unsupported_parameter",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(
                    400,
                    f"{name} is not supported; leave it at 0",
                    param=name,
                    code="unsupported_parameter",
                )
        if self.logprobs not in (None, False, 0):
            raise APIError(
                400, "logprobs are not supported", param="logprobs", code="unsupported_parameter"
            )
        if self.logit_bias:
            raise APIError(
                400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter"
            )

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """``max_tokens`` is the request's own value, or the room left in the context when unset."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo or self.suffix or (self.best_of not in (None, 1)):
            name = "echo" if self.echo else "suffix" if self.suffix else "best_of"
            raise APIError(
                400, f"{name} is not supported", param=name, code="unsupported_parameter"
            )

    def single_prompt(self) -> str | list[int]:
        """The one prompt as text or token ids (a list of one prompt is accepted too)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(
                    400,
                    f"{len(p)} prompts in one request are not supported; send one "
                    "request per prompt",
                    param="prompt",
                    code="unsupported_parameter",
                )
            p = p[0]
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_prompt")
        return p  # type: ignore[return-value]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name; wins over max_tokens when set

    def chat_messages(self) -> list[dict[str, str]]:
        # Templates written before "developer" existed know it as "system".
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @staticmethod
    def of(prompt_tokens: int, completion_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def completion_body(
    rid: str, model: str, text: str, finish: str | None, usage: Usage | None, created: int
) -> dict[str, Any]:
    """A ``text_completion`` object; streamed chunks use the same shape with partial ``text``."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    body: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def chat_body(
    rid: str, model: str, text: str, finish: str, usage: Usage, created: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage.model_dump(),
    }


def chat_chunk(
    rid: str,
    model: str,
    delta: dict[str, str],
    finish: str | None,
    created: int,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; the usage-only chunk at the end has no choices."""
    choices = (
        []
        if usage is not None and not delta and finish is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    )
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body
