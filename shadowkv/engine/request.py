"""A generation request and its result."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from shadowkv.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from shadowkv.cache.base import CacheOptions
    from shadowkv.engine.logits import LogitState, TopLogprobs
    from shadowkv.engine.prompt_kv import PromptKV

Logprob = tuple[float, "TopLogprobs"]  # a token's log-probability and the top alternatives


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already streamed
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" (EOS / stop string / stop token) or "length"
    arrival: float = field(default_factory=time.perf_counter)
    prefill_start: float | None = None
    first_token: float | None = None
    finished_at: float | None = None
    memory: dict[str, Any] | None = None  # cache bytes held at the end of prefill
    cached_tokens: int = 0  # prompt tokens whose prefill a stored prefix spared (prefix sharing)
    prompt_kv: PromptKV | None = None  # a recorded prefill: replayed if given, else kept if asked
    record_prompt_kv: bool = False
    cache_options: CacheOptions | None = None
    logit_state: LogitState | None = None  # penalties, bias, grammar: None when none is asked
    logprobs: list[Logprob] = field(default_factory=list)  # per output token, when asked
    prompt_logprobs: list[Logprob | None] | None = None  # per prompt token (first: None)
    # Order of its latest admission (``Engine`` counts them): preemption picks the highest.
    admission: int = -1
    # More samples of the same prompt (``Engine.add_requests``): admitted with this request,
    # they take a copy of its prefilled cache instead of a prefill of their own.
    samples: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def metrics(self) -> dict[str, Any]:
        n = len(self.output_ids)
        decode_s = (self.finished_at or 0.0) - (self.first_token or 0.0)
        return {
            "prompt_tokens": len(self.prompt_ids),
            "cached_tokens": self.cached_tokens,
            "generated_tokens": n,
            "prefill_s": round((self.first_token or 0) - (self.prefill_start or 0), 4),
            "ttft_s": round((self.first_token or 0) - self.arrival, 4),
            "decode_tokens_per_s": round((n - 1) / decode_s, 3) if n > 1 and decode_s > 0 else None,
            "total_s": round((self.finished_at or 0) - self.arrival, 4),
        }


@dataclass(frozen=True)
class GenerationResult:
    """What ``LLM.generate`` returns per prompt."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    metrics: dict[str, Any]
    cache_memory: dict[str, Any] | None = None
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "token_ids": self.token_ids,
            "metrics": self.metrics,
            "cache_memory": self.cache_memory,
        }
