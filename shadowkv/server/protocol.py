"""Request bodies of the OpenAI-compatible API (the subset we serve), validated strictly.

Strict: ``"8"`` is not an integer and ``"yes"`` is not a boolean. Ranges are declared on the
fields (so ``/openapi.json`` states them); ``SamplingParams`` checks them again for library
users. Unknown fields are ignored (OpenAI clients send extras such as ``user``), but fields that
would change the output and that this server cannot honour are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shadowkv.cache.base import CacheOptions
from shadowkv.engine.sampling import SamplingParams

MAX_LOGPROBS = 20
MAX_SAMPLES = 16


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
            status, message, type, param, code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message, "type": self.type, "param": self.param, "code": self.code
            }
        }


def unsupported(name: str, why: str) -> APIError:
    msg = f"{name} is not supported: {why}"
    return APIError(400, msg, param=name, code="unsupported_parameter")


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class CacheFields(Strict):
    """The ``cache`` extension: this request's settings of the server's cache method."""

    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt knob must not be ignored

    exact: bool = False
    sparse_budget: float | None = Field(None, gt=0)


class JSONSchemaFormat(Strict):
    name: str = Field("schema", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object with a 'schema'")
        return self

    def target_schema(self) -> dict[str, Any] | None:
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            assert self.json_schema is not None
            return self.json_schema.schema_ or {"type": "object"}
        return None


class SamplingFields(Strict):
    """Fields shared by both endpoints."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)  # OpenAI's default is 1
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # an extension (vLLM's): 0 or -1 disables it
    min_tokens: int | None = Field(None, ge=0)  # an extension (vLLM's)
    n: int | None = Field(None, ge=1, le=MAX_SAMPLES)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, max_length=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension for benchmarks
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)  # an extension (vLLM's)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    response_format: ResponseFormat | None = None
    cache: CacheFields | None = None  # an extension: per-request cache settings
    # Parsed only to be refused: they would change the output and are not implemented.
    suffix: Any = None
    best_of: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    modalities: Any = None

    def check_supported(self) -> None:
        """Refuse what we parse but do not implement, naming the field."""
        for name, why in (
            ("suffix", "this server does not fill in the middle"),
            ("functions", "use 'tools' (functions is the deprecated form)"),
            ("function_call", "use 'tool_choice' (function_call is the deprecated form)"),
            ("audio", "this server serves text only"),
            ("prediction", "predicted outputs are not implemented"),
        ):
            if getattr(self, name) is not None:
                raise unsupported(name, why)
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "use n for several samples")
        if self.modalities not in (None, ["text"]):
            raise unsupported("modalities", "this server answers with text only")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(not s for s in stops):
            msg = "stop strings must not be empty"
            raise APIError(400, msg, param="stop", code="invalid_value")

    def cache_options(self) -> CacheOptions | None:
        """The ``cache`` field as engine options (value checks raise ``CacheOptionsError``)."""
        if self.cache is None:
            return None
        return CacheOptions(exact=self.cache.exact, sparse_budget=self.cache.sparse_budget)

    def logit_bias_ids(self) -> dict[int, float]:
        out = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise APIError(
                    400, f"logit_bias keys must be token ids (digit strings), got {key!r}",
                    param="logit_bias", code="invalid_value",
                )
            out[int(key)] = value
        return out

    def sampling_params(
        self, max_tokens: int, *, logprobs: int | None, prompt_logprobs: int | None = None,
        json_schema: dict[str, Any] | None = None, seed_offset: int = 0,
    ) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        seed = None if self.seed is None else (self.seed + seed_offset) % 2**63
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(0, self.top_k or 0),
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=self.logit_bias_ids(),
            min_tokens=min(self.min_tokens or 0, max_tokens),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            json_schema=json_schema,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(..., min_length=1)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def prompts(self) -> list[str | list[int]]:
        """The prompts as text or token ids (a list of prompts gives one choice each)."""
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ContentPart(Strict):
    """A content part; only text is accepted (the model reads text only)."""

    model_config = ConfigDict(strict=True, extra="allow")

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(
                f"content parts of type {self.type!r} are not supported: this server serves a "
                "text-only model; send text parts ({'type': 'text', 'text': ...}) or a string"
            )
        if self.text is None:
            raise ValueError("a text part needs a 'text' string")
        return self


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call answered

    @model_validator(mode="after")
    def _content_needed(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role!r} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class FunctionDef(Strict):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(
                400, "top_logprobs needs logprobs: true", param="top_logprobs",
                code="invalid_value",
            )
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise APIError(
                400, "tool_choice needs tools", param="tool_choice", code="invalid_value"
            )
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {t.function.name for t in self.tools or ()}:
                raise APIError(
                    400, f"tool_choice names the function {name!r}, which is not in tools",
                    param="tool_choice", code="invalid_value",
                )
        if self.tools and self.response_format and self.response_format.type != "text":
            raise APIError(
                400, "response_format and tools cannot be combined", param="response_format",
                code="invalid_value",
            )

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else (
            self.max_tokens
        )
