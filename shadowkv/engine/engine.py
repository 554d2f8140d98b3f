"""The step loop: admit and prefill one request, or decode every running one.

Prefills and decode steps alternate while requests wait, so a long prompt delays running
sequences by one prefill, never by the whole queue.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shadowkv.cache import AttentionCache, CacheCapacityError, make_cache
from shadowkv.config import CacheConfig, EngineConfig, ModelConfig
from shadowkv.engine.request import Request, Status
from shadowkv.engine.sampling import SamplingParams, make_generator, sample
from shadowkv.models.llama import LlamaModel
from shadowkv.models.rope import RotaryEmbedding
from shadowkv.models.tokenizer import Tokenizer

ProgressFn = Callable[[Request, int, int], None]


class PromptError(ValueError):
    """A prompt cannot be served as given (empty, malformed)."""


class ContextLengthError(PromptError):
    """A prompt does not fit the model's context window."""


@dataclass(frozen=True)
class StepOutput:
    """One request's progress in a step: the new token (if any) and whether it finished."""

    request: Request
    new_token: int | None
    text_delta: str
    finished: bool


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def cache_memory_budget(cfg: EngineConfig, device: torch.device) -> int:
    if cfg.cache_memory_gb is not None:
        return int(cfg.cache_memory_gb * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.85)  # leave room for activations and the allocator's slack
    return 4 * 2**30


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        model_cfg: ModelConfig,
        tokenizer: Tokenizer,
        cache_cfg: CacheConfig,
        engine_cfg: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model, self.model_cfg, self.tokenizer = model, model_cfg, tokenizer
        self.cfg, self.device, self.dtype = engine_cfg, device, dtype
        self.max_model_len = engine_cfg.max_model_len or model_cfg.max_position_embeddings
        self.rope = RotaryEmbedding(model_cfg.rope, model_cfg.head_dim, self.max_model_len, device)
        self.cache: AttentionCache = make_cache(
            model_cfg, cache_cfg, self.rope, device, dtype, engine_cfg.max_num_seqs,
            self.max_model_len, cache_memory_budget(engine_cfg, device),
        )
        eos = set(model_cfg.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._next_id = 0
        self._last_was_prefill = False
        self.progress: ProgressFn | None = None

    # requests ----------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the model's context is {self.max_model_len}; "
                f"shorten it to at most {self.max_model_len - 1} tokens"
            )
        max_new = min(params.max_tokens, self.max_model_len - n)
        if not self.running and not self.waiting and not self.cache.can_add(n, max_new):
            raise CacheCapacityError(
                f"a request of {n} prompt + {max_new} new tokens cannot fit in the cache even when "
                "it is empty; lower max_tokens or give the cache more memory"
            )
        req = Request(self._next_id, list(prompt_ids), params, self.eos_ids, make_generator(params, self.device))
        self._next_id += 1
        self.waiting.append(req)
        return req

    def abort(self, request_id: int) -> None:
        for req in list(self.waiting):
            if req.request_id == request_id:
                self.waiting.remove(req)
                self._finish(req, "abort")
        for req in list(self.running):
            if req.request_id == request_id:
                self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def fits_ever(self, prompt_len: int, max_new: int) -> bool:
        """Whether a request of this size could be admitted into the empty cache.

        Reads sizes only (no per-sequence state), so another thread may call it while steps run.
        """
        if not 0 < prompt_len < self.max_model_len:
            return False
        return self.cache.fits_empty(prompt_len, min(max_new, self.max_model_len - prompt_len))

    # the loop ----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        if self.waiting and (not self.running or not self._last_was_prefill):
            req = self.waiting[0]
            max_new = self._max_new(req)
            if len(self.running) < self.cfg.max_num_seqs and self.cache.can_add(len(req.prompt_ids), max_new):
                self.waiting.popleft()
                self._last_was_prefill = True
                return [self._prefill(req, max_new)]
        self._last_was_prefill = False
        if self.running:
            return self._decode()
        if self.waiting:
            raise CacheCapacityError("no running request frees memory and the next one cannot be admitted")
        return []

    def _max_new(self, req: Request) -> int:
        return min(req.params.max_tokens, self.max_model_len - len(req.prompt_ids))

    def _prefill(self, req: Request, max_new: int) -> StepOutput:
        req.prefill_start = time.perf_counter()
        sid, n = req.request_id, len(req.prompt_ids)
        self.cache.add_sequence(sid, n, max_new)
        self.cache.begin_prefill(sid, n)
        ids = torch.tensor(req.prompt_ids, device=self.device)
        positions = torch.arange(n, device=self.device)
        progress = (lambda i, t: self.progress(req, i, t)) if self.progress else None
        logits = self.model(
            ids, positions, self.rope, self.cache, "prefill",
            logits_index=torch.tensor([n - 1], device=self.device),
            mlp_chunk=self.cfg.prefill_mlp_chunk, progress=progress,
        )
        self.cache.end_prefill()
        req.memory = self.cache.memory(sid).as_dict()
        req.status = Status.RUNNING
        self.running.append(req)
        return self._append(req, logits[0])

    def _decode(self) -> list[StepOutput]:
        reqs = list(self.running)
        seq_ids = [r.request_id for r in reqs]
        self.cache.begin_decode(seq_ids)
        ids = torch.tensor([r.output_ids[-1] for r in reqs], device=self.device)
        positions = torch.tensor([self.cache.lengths[s] for s in seq_ids], device=self.device)
        logits = self.model(ids, positions, self.rope, self.cache, "decode")
        self.cache.end_decode()
        return [self._append(r, logits[i]) for i, r in enumerate(reqs)]

    def _append(self, req: Request, logits: torch.Tensor) -> StepOutput:
        token = sample(logits, req.params, req.generator)
        req.output_ids.append(token)
        if req.first_token is None:
            req.first_token = time.perf_counter()
        reason = None
        ids = req.output_ids
        if (token in self.eos_ids and not req.params.ignore_eos) or token in req.params.stop_token_ids:
            reason, ids = "stop", ids[:-1]  # the stop token's own text is not part of the output
        text = self.tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in req.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None and (
            len(req.output_ids) >= req.params.max_tokens or req.num_tokens >= self.max_model_len
        ):
            reason = "length"
        req.text = text
        emit = text if reason else _streamable(text, req.params.stop)
        delta = emit[req.emitted :] if len(emit) > req.emitted else ""
        req.emitted = max(req.emitted, len(emit))
        if reason:
            self._finish(req, reason)
        return StepOutput(req, token, delta, reason is not None)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.status = Status.FINISHED
        req.finished_at = time.perf_counter()
        if req in self.running:
            self.running.remove(req)
        self.cache.free_sequence(req.request_id)


def _streamable(text: str, stops: tuple[str, ...]) -> str:
    """The part of unfinished text that is safe to stream.

    Holds back a trailing partial UTF-8 character (decoded as U+FFFD) and any ending that could
    be the start of a stop string, so streamed text always equals the final text's prefix.
    """
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return text[: len(text) - hold]
