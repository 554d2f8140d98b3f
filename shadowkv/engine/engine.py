"""The step loop: decode every running request, then prefill waiting ones under a token budget.

A step runs one decode token for every running request first, then admits and prefills waiting
requests first come, first served while ``EngineConfig.max_num_batched_tokens`` (decode rows
plus prompt tokens) allows; at least one prefill advances per step, so the queue always moves.
The prefills run one prompt after another (one forward each, then the decode's forward): the
batch fills in a few steps instead of one request per two steps. A prompt longer than
``EngineConfig.prefill_slice_tokens`` prefills a slice of layers per step while others decode
(alone: the caches prefill one sequence at a time), so running sequences wait one slice at a
time, never a whole long prefill.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shadowkv.cache import CacheCapacityError, make_cache
from shadowkv.cache.base import CacheOptions
from shadowkv.cache.methods import CacheConfig
from shadowkv.config import EngineConfig, ModelConfig
from shadowkv.engine.decode_runner import DecodeRunner
from shadowkv.engine.grammar import Grammars
from shadowkv.engine.logits import new_state, prompt_logprobs, sample_requests
from shadowkv.engine.prompt_kv import PromptKV, RecordingCache
from shadowkv.engine.request import Request, Status
from shadowkv.engine.sampling import SamplingParams, make_generator, sample
from shadowkv.models.context import ForwardContext
from shadowkv.models.llama import Hidden, LlamaModel
from shadowkv.models.tokenizer import Tokenizer

ProgressFn = Callable[[Request, int, int], None]


class PromptError(ValueError):
    """A prompt cannot be served as given (empty, malformed)."""


class ContextLengthError(PromptError):
    """A prompt does not fit the model's context window."""


@dataclass
class _Prefill:
    """A prefill in progress: the hidden state (``[T, hidden]`` output and residual) entering
    layer ``next_layer``."""

    request: Request
    cache: RecordingCache | None  # keeps the prompt's K/V when the request asks for them
    x: Hidden | None
    ctx: ForwardContext | None
    next_layer: int = 0


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
        # In the model dtype: what the q/k rotation and the key rebuild read per token (bf16 on
        # a GPU halves those bytes; transformers rounds cos/sin to the model dtype too).
        self.rope = model.rope_tables(self.max_model_len, device, dtype)
        self.cache = make_cache(
            model.attention_specs(), cache_cfg, self.rope, device, dtype, engine_cfg.max_num_seqs,
            self.max_model_len, cache_memory_budget(engine_cfg, device),
        )
        self.runner = DecodeRunner(
            model, self.rope, self.cache, device, engine_cfg.max_num_seqs, engine_cfg.decode_mode
        )
        eos = set(model_cfg.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.grammars = Grammars(tokenizer, model_cfg.vocab_size, sorted(self.eos_ids))
        # Prompt tokens run through the model, and samples that took a copy of another's
        # prefill: by ``cache.fork``, or by replaying the recorded prefill (caches without fork).
        self.counters = {"prefill_tokens": 0, "forked_samples": 0, "replayed_samples": 0}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._next_id = 0
        self._prefilling: _Prefill | None = None
        self._did_prefill = False  # whether this step's prefill work ran anything
        # What the last step worked on: "decode", "prefill" or "mixed" (both).
        self.last_step: str | None = None
        self.progress: ProgressFn | None = None
        # Called with each part of a step's outputs as soon as it is final — the decode's, then
        # each prefill's first tokens — before ``step`` returns them all: a server streams them
        # without waiting for the rest of the step's prefills.
        self.on_outputs: Callable[[list[StepOutput]], None] | None = None

    # requests ----------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        prompt_kv: PromptKV | None = None,
        record_prompt_kv: bool = False,
        cache_options: CacheOptions | None = None,
    ) -> Request:
        """Queue a request. ``prompt_kv`` replays a recorded prefill of these exact tokens instead
        of running the model; ``record_prompt_kv`` keeps this prefill in ``Request.prompt_kv``;
        ``cache_options`` tunes the cache method for this request alone."""
        if cache_options is not None:
            self.cache.check_options(cache_options)
        if prompt_kv is not None and list(prompt_kv.token_ids) != list(prompt_ids):
            raise PromptError("prompt_kv was recorded for other prompt tokens")
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the model's context is {self.max_model_len}; "
                f"shorten it to at most {self.max_model_len - 1} tokens"
            )
        max_new = min(params.max_tokens, self.max_model_len - n)
        idle = not self.running and not self.waiting
        if idle and not self.cache.can_add(n, max_new, cache_options):
            raise CacheCapacityError(
                f"a request of {n} prompt + {max_new} new tokens cannot fit in the cache even when "
                "it is empty; lower max_tokens or give the cache more memory"
            )
        if prompt_kv is not None and params.prompt_logprobs is not None:
            raise PromptError("prompt_logprobs need the model's prefill, not a replayed one")
        req = self._new_request(prompt_ids, params, cache_options)
        req.prompt_kv, req.record_prompt_kv = prompt_kv, record_prompt_kv
        self.waiting.append(req)
        return req

    def add_requests(
        self,
        prompt_ids: list[int],
        params: Sequence[SamplingParams],
        cache_options: CacheOptions | None = None,
    ) -> list[Request]:
        """Several samples of one prompt (OpenAI's ``n``): one prefill, shared.

        The samples are admitted together (all or none). After the first one's prefill each
        other sample gets a copy of its cache (``cache.fork``; caches that cannot fork replay
        the recorded prefill, which runs no model layers) and draws its first token from the
        same logits with its own parameters and generator.
        """
        if not params:
            raise ValueError("add_requests needs at least one SamplingParams")
        if len(params) > self.cfg.max_num_seqs:
            raise CacheCapacityError(
                f"{len(params)} samples of one prompt need {len(params)} sequence slots; this "
                f"engine has max_num_seqs={self.cfg.max_num_seqs}"
            )
        first = self.add_request(prompt_ids, params[0], cache_options=cache_options)
        try:
            first.samples = [self._new_request(prompt_ids, p, cache_options) for p in params[1:]]
        except Exception:
            self.abort(first.request_id)
            raise
        return [first, *first.samples]

    def _new_request(
        self, prompt_ids: list[int], params: SamplingParams, options: CacheOptions | None
    ) -> Request:
        req = Request(
            self._next_id, list(prompt_ids), params, self.eos_ids,
            make_generator(params, self.device),
        )
        if params.processed:
            matcher = None
            if params.json_schema is not None:
                matcher = self.grammars.matcher(params.json_schema)
            stops = () if params.ignore_eos else tuple(self.eos_ids)
            req.logit_state = new_state(
                req, self.model_cfg.vocab_size, self.device, stops, matcher, sorted(self.eos_ids)
            )
        req.cache_options = options
        self._next_id += 1
        return req

    def abort(self, request_id: int) -> None:
        """Stop a request; aborting the first of several samples before its prefill has ended
        aborts them all (they wait on its prefill)."""
        heads = list(self.waiting)
        if self._prefilling is not None:
            heads.append(self._prefilling.request)
            if self._prefilling.request.request_id == request_id:
                self._prefilling = None
        for head in heads:
            if head.request_id == request_id:
                if head in self.waiting:
                    self.waiting.remove(head)
                for req in (head, *head.samples):
                    self._finish(req, "abort")
                head.samples = []
            for sample_req in list(head.samples):
                if sample_req.request_id == request_id:
                    head.samples.remove(sample_req)
                    self._finish(sample_req, "abort")
        for req in list(self.running):
            if req.request_id == request_id:
                self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._prefilling)

    @property
    def prefilling(self) -> Request | None:
        """The request whose prefill is under way (between slices), if any."""
        return self._prefilling.request if self._prefilling else None

    def fits_ever(self, prompt_len: int, max_new: int, options: CacheOptions | None = None) -> bool:
        """Whether a request of this size could be admitted into the empty cache.

        Reads sizes only (no per-sequence state), so another thread may call it while steps run.
        """
        if not 0 < prompt_len < self.max_model_len:
            return False
        return self.cache.fits_empty(
            prompt_len, min(max_new, self.max_model_len - prompt_len), options
        )

    # the loop ----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Decode every running request, then advance prefills FCFS within the token budget."""
        outs = self._emit(self._decode()) if self.running else []
        decoded = bool(outs)
        outs += self._prefill_work(self.cfg.max_num_batched_tokens - len(outs), decoded)
        prefilled = self._did_prefill
        self.last_step = ("mixed" if prefilled else "decode") if decoded else (
            "prefill" if prefilled else None
        )
        if not decoded and not prefilled and self.waiting:
            raise CacheCapacityError(
                "no running request frees memory and the next one cannot be admitted"
            )
        return outs

    def _prefill_work(self, budget: int, decoded: bool) -> list[StepOutput]:
        """Prefill waiting requests, oldest first, while their prompt tokens fit ``budget``.

        The first one goes whatever its size, so a long prompt (or a full decode batch) cannot
        keep the queue from moving. A prompt whose prefill runs in slices of layers is the only
        prefill of its steps: the caches hold one sequence's prefill state at a time.
        """
        self._did_prefill = False
        if self._prefilling is not None:
            self._did_prefill = True
            return self._emit(self._advance_prefill())
        outs: list[StepOutput] = []
        while self.waiting and self._prefilling is None:
            cost = len(self.waiting[0].prompt_ids)
            if self._did_prefill and cost > budget:
                break
            # After this step's decode, an admission failure is retried next step rather than
            # raised: the decode's outputs must reach the caller.
            if not self._admit_next(may_raise=not decoded and not self._did_prefill):
                break
            self._did_prefill = True
            budget -= cost
            outs += self._emit(self._advance_prefill())
        return outs

    def _emit(self, outs: list[StepOutput]) -> list[StepOutput]:
        if outs and self.on_outputs is not None:
            self.on_outputs(outs)
        return outs

    def _max_new(self, req: Request) -> int:
        return min(req.params.max_tokens, self.max_model_len - len(req.prompt_ids))

    def _admit_next(self, may_raise: bool = True) -> bool:
        """Start the head request's prefill if a decode slot and cache room are free; say
        whether it started."""
        req = self.waiting[0]
        n, max_new = len(req.prompt_ids), self._max_new(req)
        opts = req.cache_options
        slots = 1 + len(req.samples)
        if len(self.running) + slots > self.cfg.max_num_seqs or not self.cache.can_add(
            n, max_new, opts
        ):
            return False
        group = [req, *req.samples]
        for i, r in enumerate(group):
            try:
                self.cache.add_sequence(r.request_id, n, self._max_new(r), opts)
            except CacheCapacityError:
                # can_add said yes but an allocation failed (pinning host memory, or the room
                # for the other samples): the request stays queued and is retried once running
                # requests have freed memory.
                for added in group[:i]:
                    self.cache.free_sequence(added.request_id)
                if self.running or not may_raise:
                    return False
                if i:
                    raise CacheCapacityError(
                        f"{len(group)} samples of a {n}-token prompt cannot fit in the cache "
                        "even when it is empty; ask for fewer samples or lower max_tokens"
                    ) from None
                raise
        req.prefill_start = time.perf_counter()
        self.waiting.popleft()
        self.cache.begin_prefill(req.request_id, n)
        record = req.record_prompt_kv or (req.samples and not self.cache.supports_fork)
        recording = RecordingCache(self.cache) if record else None
        x, ctx = None, None  # a replayed prefill runs no layers
        if req.prompt_kv is None:
            self.counters["prefill_tokens"] += n
            x = self.model.embed(torch.tensor(req.prompt_ids, device=self.device))
            ctx = self.model.context(
                "prefill", torch.arange(n, device=self.device), self.rope,
                recording or self.cache,  # type: ignore[arg-type]
                self.cfg.prefill_mlp_chunk, self._layer_done(req),
            )
        self._prefilling = _Prefill(req, recording, x, ctx)
        return True

    def _layer_done(self, req: Request) -> Callable[[int, int], None]:
        """Per-layer prefill progress for ``self.progress`` (looked up when each layer ends)."""

        def done(layer: int, num_layers: int) -> None:
            if self.progress is not None:
                self.progress(req, layer, num_layers)

        return done

    def _advance_prefill(self) -> list[StepOutput]:
        """Run the next slice of layers (all of them when nothing else is running)."""
        p = self._prefilling
        assert p is not None
        req, n, L = p.request, len(p.request.prompt_ids), self.model_cfg.num_layers
        if req.prompt_kv is not None:
            req.prompt_kv.replay(self.cache)
            return self._end_prefill(req.prompt_kv.logits, req.prompt_kv)
        assert p.x is not None and p.ctx is not None
        slice_tokens = self.cfg.prefill_slice_tokens
        if not self.running or slice_tokens is None:
            stop = L
        else:
            stop = min(L, p.next_layer + max(1, L * slice_tokens // n))
        p.x = self.model.run_layers(p.x, p.ctx, p.next_layer, stop)
        p.next_layer = stop
        if stop < L:
            return []
        logits = self.model.logits(p.x, torch.tensor([n - 1], device=self.device))[0]
        if req.params.prompt_logprobs is not None:
            x = p.x
            req.prompt_logprobs = prompt_logprobs(
                lambda pos: self.model.logits(x, pos.to(self.device)),
                req.prompt_ids,
                req.params.prompt_logprobs,
            )
        kv = None
        if p.cache is not None:
            kv = p.cache.result(req.prompt_ids, logits)
            if req.record_prompt_kv:
                req.prompt_kv = kv
        return self._end_prefill(logits, kv)

    def _end_prefill(self, logits: torch.Tensor, kv: PromptKV | None) -> list[StepOutput]:
        p = self._prefilling
        assert p is not None
        self._prefilling = None
        req = p.request
        self.cache.end_prefill()
        group, req.samples = [req, *req.samples], []
        for r in group[1:]:  # before any first token: the first one may finish and free its copy
            self._copy_prefill(req, r, kv)
        for r in group:
            r.memory = self.cache.memory(r.request_id).as_dict()
            r.status = Status.RUNNING
            self.running.append(r)
        return [self._first_token(r, logits) for r in group]

    def _copy_prefill(self, src: Request, dst: Request, kv: PromptKV | None) -> None:
        """Give sample ``dst`` (admitted, not prefilled) the prefilled cache of ``src``."""
        if self.cache.supports_fork:
            self.cache.fork(src.request_id, dst.request_id)
            self.counters["forked_samples"] += 1
        else:
            assert kv is not None, "a prefill with samples is recorded when the cache cannot fork"
            self.cache.begin_prefill(dst.request_id, len(src.prompt_ids))
            kv.replay(self.cache)
            self.cache.end_prefill()
            self.counters["replayed_samples"] += 1
        dst.prefill_start = src.prefill_start
        dst.prompt_logprobs = src.prompt_logprobs

    def _first_token(self, req: Request, logits: torch.Tensor) -> StepOutput:
        """Sample a request's first token from its prompt's last logits ``[V]``."""
        if req.logit_state is None and req.params.logprobs is None:
            return self._append(req, sample(logits, req.params, req.generator))
        return self._append(req, sample_requests(logits[None].clone(), [req])[0])

    def _decode(self) -> list[StepOutput]:
        reqs = list(self.running)
        seq_ids = [r.request_id for r in reqs]
        logits = self.runner.step(
            seq_ids, [r.output_ids[-1] for r in reqs], [self.cache.length(s) for s in seq_ids]
        )
        self.cache.end_decode()
        tokens = sample_requests(logits, reqs)
        return [self._append(r, t) for r, t in zip(reqs, tokens)]

    def _append(self, req: Request, token: int) -> StepOutput:
        req.output_ids.append(token)
        if req.first_token is None:
            req.first_token = time.perf_counter()
        reason = None
        ids = req.output_ids
        eos = token in self.eos_ids and not req.params.ignore_eos
        if eos or token in req.params.stop_token_ids:
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
