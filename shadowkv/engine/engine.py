"""The step loop: decode every running request, then prefill under a token budget.

A step runs one decode token for every running request first, then spends the rest of
``EngineConfig.max_num_batched_tokens`` (decode rows plus prompt tokens) on prefills, first come,
first served (``engine/prefill.py`` has the policy): a prompt that fits prefills whole; a longer
one prefills by chunks of tokens (``EngineConfig.chunked_prefill``), one chunk per step while the
others decode, so a step's time stays bounded whatever the prompt lengths. At most one prompt is
partly prefilled at a time; it gets at most half a step's prefill budget while short prompts
wait. All the prefill chunks a step runs go through the model in one ragged forward
(``engine/ragged.py``: tokens packed, one varlen attention call per layer), and with
``EngineConfig.mixed_step`` the decode rows go in front of them in that same forward; a step with
only decodes runs the decode runner (CUDA graphs on a GPU). A replayed prefill (``PromptKV``)
runs no layers and goes at its admission. The batch fills in a few steps instead of one request
per two steps.

With ``EngineConfig.admission_reserve`` a request is admitted with room for fewer new tokens
than ``max_tokens`` and grows its reservation before a decode step would pass it; when the cache
cannot grow, the newest running request is preempted: freed, requeued first, and later resumed
by prefilling its prompt again and replaying its generated tokens as teacher-forced decode rows
(their logits unused), so it continues with exactly the tokens of an uninterrupted run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shadowkv.cache import CacheCapacityError, make_cache
from shadowkv.cache.base import CacheMemory, CacheOptions, SharedPrefix
from shadowkv.cache.methods import CacheConfig
from shadowkv.config import EngineConfig, ModelConfig
from shadowkv.engine.decode_runner import DecodeRunner
from shadowkv.engine.grammar import Grammars
from shadowkv.engine.logits import new_state, prompt_logprobs, sample_requests
from shadowkv.engine.prefill import MIN_CHUNK, PrefillState, partial_share
from shadowkv.engine.prefix import (
    PrefixEntry,
    PrefixStore,
    PrefixUse,
    frees_pages,
    replay_prefix,
    shared_tokens,
)
from shadowkv.engine.prompt_kv import PromptKV, RecordingCache
from shadowkv.engine.ragged import MixedStep, RaggedPrefill, Segment
from shadowkv.engine.request import Request, Status
from shadowkv.engine.sampling import SamplingParams, make_generator, sample
from shadowkv.models.llama import Hidden, LlamaModel
from shadowkv.models.tokenizer import Tokenizer

# ``progress(request, done, total)`` during a prefill: work units (token-layers) done of total.
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


@dataclass(frozen=True)
class DecodeRows:
    """The host half of a decode step: the running requests, and per request its input token
    (the last one sampled, or an earlier one replayed after a preemption), its position (tokens
    cached) and its sequence id; ``live``: the rows whose logits are sampled (not replayed)."""

    requests: tuple[Request, ...]
    seq_ids: list[int]
    tokens: list[int]
    positions: list[int]
    live: list[int]


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def prefix_budget(cfg: EngineConfig, cache_bytes: int) -> int:
    """Host bytes the prefix store may hold: ``prefix_cache_gb``, else a quarter of the cache's
    ``cache_bytes`` (a stored prompt is about what a dense cache holds for it, plus ``k_pre``)."""
    if cfg.prefix_cache_gb is not None:
        return int(cfg.prefix_cache_gb * 2**30)
    return cache_bytes // 4


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
        cache_bytes = cache_memory_budget(engine_cfg, device)
        self.cache = make_cache(
            model.attention_specs(), cache_cfg, self.rope, device, dtype, engine_cfg.max_num_seqs,
            self.max_model_len, cache_bytes,
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
        # Prefill chunks run (a prompt prefilled whole is one chunk).
        # Preemptions (optimistic admission), and the decode rows that replayed a preempted
        # request's generated tokens to resume it.
        self.counters = {
            "prefill_tokens": 0, "prefill_chunks": 0, "forked_samples": 0, "replayed_samples": 0,
            "preemptions": 0, "replayed_tokens": 0,
        }
        # Prefix sharing (engine/prefix.py): prefills that reused a stored prefix, and the
        # prompt tokens those prefixes spared. A cache that shares its own pages stores them
        # (``SharedPrefix``); any other gets host copies of the prefixes' K/V.
        self.prefix_store: PrefixStore | None = None
        if engine_cfg.prefix_cache:
            self.prefix_store = PrefixStore(
                prefix_budget(engine_cfg, cache_bytes), release=self.cache.release_prefix
            )
            self.counters.update(prefix_hits=0, cached_tokens=0)
        self.shares_pages = self.prefix_store is not None and self.cache.supports_shared_prefix
        if self.shares_pages:  # the cache may keep what suffix prefills from a prefix read
            self.cache.will_share_prefixes()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._next_id = 0
        self._admissions = 0  # admissions so far: each one's order, for choosing preemptions
        self._partial: PrefillState | None = None  # the prompt prefilled in chunks, if any
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
        if idle and not self._fits_idle(n, max_new, cache_options):
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
        if self._partial is not None:
            heads.append(self._partial.request)
            if self._partial.request.request_id == request_id:
                self._partial = None  # freeing the sequence frees what its chunks hold
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
        return bool(self.waiting or self.running or self._partial)

    @property
    def prefilling(self) -> Request | None:
        """The request whose prompt is partly prefilled (between chunks), if any."""
        return self._partial.request if self._partial else None

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
        """Decode every running request (after giving each room for its token, preempting if
        need be) and advance prefills FCFS within the token budget: in one forward when both run
        and ``mixed_step`` is on, else the decode's forward first."""
        self._make_room()
        rows = self._decode_rows() if self.running else None
        decoded = rows is not None
        budget = self.cfg.max_num_batched_tokens - (len(rows.seq_ids) if rows else 0)
        outs: list[StepOutput] = []
        if rows is not None and not self.cfg.mixed_step:
            outs, rows = list(self._emit(self._decode(rows))), None  # a copy: emitted as is
        batch, replayed = self._plan_prefills(budget, decoded)
        if batch:
            ran = self._run_prefills(batch, rows)  # with the decode rows, if any are left
            n = len(rows.live) if rows is not None else 0  # its first outputs: the decode's
            outs += ran[:n] + replayed + ran[n:]
        else:
            if rows is not None:
                outs = list(self._emit(self._decode(rows)))
            outs += replayed
        prefilled = self._did_prefill
        self.last_step = ("mixed" if prefilled else "decode") if decoded else (
            "prefill" if prefilled else None
        )
        if not decoded and not prefilled and self.waiting:
            raise CacheCapacityError(
                "no running request frees memory and the next one cannot be admitted"
            )
        return outs

    def _plan_prefills(
        self, budget: int, decoded: bool
    ) -> tuple[list[tuple[PrefillState, int]], list[StepOutput]]:
        """Spend ``budget`` prompt tokens on prefills: the partial one's next chunk, then waiting
        prompts first come, first served (``engine/prefill.py``). Returns the chunks chosen
        (``(prefill, tokens)``, for ``_run_prefills``' one forward) and the outputs of replayed
        prefills, which run no layers and go at once (``decoded``: whether this step decodes)."""
        self._did_prefill = False
        chunked = self.cfg.chunked_prefill
        if chunked:
            budget = max(budget, MIN_CHUNK)
        outs: list[StepOutput] = []
        batch: list[tuple[PrefillState, int]] = []  # this step's chunks: (prefill, tokens)
        p = self._partial
        partial = p is not None  # whether a prompt stays partly prefilled after this step
        # Caches that stage a chunked prompt (ShadowKV) take at most one prompt per step that
        # starts from a replayed host copy of a prefix: it stages from its admission to the
        # forward's end (a prefix of shared pages is planned with its sequence's admission).
        shared = False
        stored: list[list[int]] = []  # prompts this step completes: the store gets them after
        if p is not None:
            head = len(self.waiting[0].prompt_ids) if self.waiting else None
            n = partial_share(budget, p.remaining, head)
            budget -= n
            batch.append((p, n))
            self._did_prefill = True
            partial = n < p.remaining
            if not partial and self.prefix_store is not None:
                stored.append(p.request.prompt_ids)
        try:
            while self.waiting:
                req = self.waiting[0]
                cached = self._cached_tokens(req)
                staging = self.cache.stages_prompts and not self.shares_pages
                if (cached and shared and staging) or self._gains_by_waiting(
                    req, cached, stored
                ):
                    break
                cost = len(req.prompt_ids) - cached
                # A prompt the cache could never stage (ShadowKV's staging pool is smaller)
                # prefills whole, as without chunking: first of a step, whatever its size.
                can_chunk = chunked and req.prompt_kv is None and self._can_stage(req)
                whole = cost <= budget or (not self._did_prefill and not can_chunk)
                if not whole and (not can_chunk or partial or budget < MIN_CHUNK):
                    break
                # After this step's decode, an admission failure is retried next step rather
                # than raised: the decode's outputs must reach the caller. A prompt split in
                # chunks, or started from a stored prefix, reserves its staging at admission.
                p = self._admit_next(
                    may_raise=not decoded and not self._did_prefill, staged=not whole or cached > 0
                )
                if p is None:
                    break
                n = cost if whole else budget
                budget -= n
                self._did_prefill = True
                shared = shared or p.done > 0
                if req.prompt_kv is not None:
                    try:
                        outs += self._emit(self._replay(p))
                    except BaseException:
                        self._drop(p)
                        raise
                    continue
                n = min(n, p.remaining)
                batch.append((p, n))
                partial = partial or n < p.remaining
                if n == p.remaining and self.prefix_store is not None:
                    stored.append(req.prompt_ids)
        except BaseException:
            for p, _ in batch:  # admitted (or partial) prefills that will not run now
                self._drop(p)
            raise
        return batch, outs

    def _drop(self, p: PrefillState) -> None:
        """Free a prefill whose first chunk failed: it is in no queue yet, so ``abort`` (what the
        server does after a failed step) would not find it and its memory would stay held."""
        if self._partial is p:
            self._partial = None
        for r in (p.request, *p.request.samples):
            self._finish(r, "abort")

    def _emit(self, outs: list[StepOutput]) -> list[StepOutput]:
        if outs and self.on_outputs is not None:
            self.on_outputs(outs)
        return outs

    def _max_new(self, req: Request) -> int:
        return min(req.params.max_tokens, self.max_model_len - len(req.prompt_ids))

    def _reserve(self, req: Request) -> int:
        """New tokens of cache room ``req`` is admitted with: all it may generate, or under
        ``admission_reserve=N`` what it has generated (a resumed request) + N, at most that.
        A request whose worst case cannot fit even an empty cache reserves its worst case, so
        it meets today's clear error instead of being preempted for ever."""
        max_new, reserve = self._max_new(req), self.cfg.admission_reserve
        if reserve is None or not self.cache.fits_empty(
            len(req.prompt_ids), max_new, req.cache_options
        ):
            return max_new
        return min(max_new, len(req.output_ids) + reserve)

    def _admit_next(self, may_raise: bool = True, staged: bool = False) -> PrefillState | None:
        """Admit the head request (and its samples) if decode slots and cache room are free.
        ``staged``: its prompt prefills in chunks or starts from a stored prefix, so the cache
        reserves its staging too (the samples get a copy of the whole prefill: none). With a
        stored prefix of cache pages, every sequence of the group starts from it (holding its
        pages, taking pages only for the rest); when the cache is short, the store's other
        entries of cache pages are evicted, least recently used first, before giving up."""
        req = self.waiting[0]
        n = len(req.prompt_ids)
        opts = req.cache_options
        slots = 1 + len(req.samples)
        if len(self.running) + slots > self.cfg.max_num_seqs:
            return None
        use = self._stored_prefix(req, touch=True) if staged and self.shares_pages else None
        keep = use.entry if use is not None else None
        prefix = keep.shared if keep is not None else None
        k = use.num_tokens if use is not None else 0
        while not self.cache.can_add(n, self._reserve(req), opts, staged, prefix, k):
            if not self._evict_shared(keep):
                return None
        group = [req, *req.samples]
        while (failed := self._add_group(group, staged, prefix, k)) is not None:
            if self._evict_shared(keep):
                continue
            # can_add said yes but an allocation failed (pinning host memory, or the room for
            # the other samples): the request stays queued and is retried once running
            # requests have freed memory.
            i, error = failed
            if self.running or not may_raise:
                return None
            if i:
                raise CacheCapacityError(
                    f"{len(group)} samples of a {n}-token prompt cannot fit in the cache "
                    "even when it is empty; ask for fewer samples or lower max_tokens"
                ) from None
            raise error
        if req.prefill_start is None:  # a resumed request keeps its first prefill's start
            req.prefill_start = time.perf_counter()
        for r in group:
            r.admission = self._admissions
            self._admissions += 1
        self.waiting.popleft()
        record = self._records(req) or self._storable(n)  # stored for later prompts
        p = PrefillState(req, RecordingCache(self.cache) if record else None)
        if use is not None:
            self._started_from(p, use.num_tokens)
            return p
        try:
            if staged:  # a prefix replayed is a first chunk: only a staged prompt has one
                self._reuse_prefix(p)
        except BaseException:
            self._drop(p)
            raise
        return p

    def _add_group(
        self, group: list[Request], staged: bool, prefix: SharedPrefix | None, k: int
    ) -> tuple[int, CacheCapacityError] | None:
        """Add every sequence of a prompt's group (the first staged, if ``staged``), each
        starting from ``k`` tokens of ``prefix`` if given; all or none. None when all were
        added, else the index of the one that did not fit and why."""
        n, opts = len(group[0].prompt_ids), group[0].cache_options
        shared = {"prefix": prefix, "prefix_tokens": k} if prefix is not None else {}
        for i, r in enumerate(group):
            try:
                self.cache.add_sequence(
                    r.request_id, n, self._reserve(r), opts, staged=staged and i == 0, **shared
                )
            except CacheCapacityError as e:
                for added in group[:i]:
                    self.cache.free_sequence(added.request_id)
                return i, e
        return None

    def _fits_idle(self, prompt_len: int, max_new: int, options: CacheOptions | None) -> bool:
        """Whether a request fits the cache no request holds: now, or once the store gives up
        its prefixes of cache pages (admission evicts them as it needs their room; the caches
        that share pages tell ``fits_empty`` exactly)."""
        if self.cache.can_add(prompt_len, max_new, options):
            return True
        held = self.shares_pages and self.prefix_store.shared_prefixes()  # type: ignore[union-attr]
        return bool(held) and self.cache.fits_empty(prompt_len, max_new, options)

    def _evict_shared(self, keep: PrefixEntry | None) -> bool:
        """Evict the least recently used stored prefix of cache pages, other than ``keep``,
        whose eviction frees memory now; says whether there was one."""
        store = self.prefix_store
        return store is not None and store.evict_shared(
            lambda prefix: frees_pages(self.cache, prefix), keep
        )

    def _records(self, req: Request) -> bool:
        """Whether ``req``'s prefill is recorded for itself or for its samples (not the store)."""
        return bool(req.record_prompt_kv or (req.samples and not self.cache.supports_fork))

    def _storable(self, prompt_len: int) -> bool:
        """Whether the prefix store could keep a prompt this long: only then is its K/V recorded
        to host memory for it (a 122K-token prompt of an 8B model is ~24 GiB of k, v, k_pre)."""
        store = self.prefix_store
        if store is None or self.shares_pages or prompt_len < store.block:
            return False
        c = self.model_cfg
        per_token = c.num_layers * 3 * c.num_kv_heads * c.head_dim * self.dtype.itemsize
        return prompt_len // store.block * store.block * per_token <= store.budget_bytes

    def _can_stage(self, req: Request) -> bool:
        """Whether the cache could stage ``req``'s prompt, prefilled in chunks."""
        return self.cache.can_stage(len(req.prompt_ids), self._max_new(req), req.cache_options)

    def _shares_prefix(self, req: Request) -> bool:
        # Prompt logprobs need every prompt position's logits; a replay runs no model at all;
        # a stored prefix is a first chunk, so the prompt must be able to stage. A recorded
        # prompt would miss the K/V of a prefix of cache pages (nothing replays it).
        return (
            self.prefix_store is not None and req.prompt_kv is None
            and req.params.prompt_logprobs is None and self._can_stage(req)
            and not (self.shares_pages and self._records(req))
        )

    def _stored_prefix(self, req: Request, touch: bool = False) -> PrefixUse | None:
        """The stored prefix ``req`` would start from now and how many tokens of it: all it
        matches of a host copy, what the cache allows (``prefix_start``) of cache pages.
        ``touch``: the entry becomes the most recently used."""
        if not self._shares_prefix(req):
            return None
        use = self.prefix_store.find_prefix(req.prompt_ids, touch)  # type: ignore[union-attr]
        if use is None or use.entry.shared is None:
            return use
        n = self.cache.prefix_start(
            use.entry.shared, len(req.prompt_ids), self._reserve(req), req.cache_options,
            use.num_tokens,
        )
        return PrefixUse(use.entry, n) if n > 0 else None

    def _cached_tokens(self, req: Request) -> int:
        """Leading prompt tokens of ``req`` a stored prefix would give it now."""
        use = self._stored_prefix(req)
        return use.num_tokens if use is not None else 0

    def _gains_by_waiting(self, req: Request, cached: int, stored: list[list[int]]) -> bool:
        """Whether ``req`` would find more of its prompt stored after this step than its
        ``cached`` tokens now, because a prompt this step completes starts the same way: it then
        waits a step rather than prefilling those tokens again beside it."""
        if not stored or not self._shares_prefix(req):
            return False
        return any(shared_tokens(req.prompt_ids, q) > cached for q in stored)

    def _reuse_prefix(self, p: PrefillState) -> None:
        """Start a newly admitted prefill with the longest stored prefix of its prompt, if any:
        replayed into the cache as its first chunk (no layers run)."""
        req = p.request
        if not self._shares_prefix(req):
            return
        use = self.prefix_store.find_prefix(req.prompt_ids)  # type: ignore[union-attr]
        if use is None:
            return
        replay_prefix(use, self.cache, req.request_id, p.recording)
        self._started_from(p, use.num_tokens)

    def _started_from(self, p: PrefillState, num_tokens: int) -> None:
        """``p``'s first ``num_tokens`` prompt tokens came from a stored prefix."""
        p.done = num_tokens
        if not p.request.output_ids:  # a resumed request reports its first prefill's
            p.request.cached_tokens = num_tokens
        self.counters["prefix_hits"] += 1
        self.counters["cached_tokens"] += num_tokens

    def _replay(self, p: PrefillState) -> list[StepOutput]:
        """A newly admitted replayed prefill (``PromptKV``): all its tokens, running no layers."""
        req = p.request
        self.cache.begin_prefill(req.request_id, len(req.prompt_ids))
        req.prompt_kv.replay(self.cache)  # type: ignore[union-attr]
        self.cache.end_prefill()
        return self._end_prefill(p, req.prompt_kv.logits, req.prompt_kv)  # type: ignore[union-attr]

    def _layer_done(self, req: Request, start: int, n: int) -> Callable[[int, int], None]:
        """Per-layer progress of a chunk of ``n`` tokens from ``start`` for ``self.progress``
        (looked up when each layer ends), in token-layers of the whole prompt."""
        total = len(req.prompt_ids)

        def done(layer: int, num_layers: int) -> None:
            if self.progress is not None:
                self.progress(req, start * num_layers + layer * n, total * num_layers)

        return done

    def _run_prefills(
        self, batch: list[tuple[PrefillState, int]], rows: DecodeRows | None = None
    ) -> list[StepOutput]:
        """Run this step's prefill chunks — ``n`` prompt tokens from ``p.done`` of each ``p`` —
        through every layer in one ragged forward (``engine/ragged.py``), with the decode
        ``rows`` in front when given (a mixed step); then the decode's tokens, each chunk's
        prompt logprobs and the first tokens of the prompts it completes. A failure drops every
        prefill of the batch (its memory returns; it is in no queue, or is the partial); the
        running requests keep running, their decode not counted (lengths unchanged: the next
        step decodes the same token again)."""
        dev = self.device
        ragged = RaggedPrefill.of(self.cache, [
            Segment(p.request.request_id, p.done, n, p.recording or self.cache)
            for p, n in batch
        ])
        done = [self._layer_done(p.request, p.done, n) for p, n in batch]
        B = len(rows.seq_ids) if rows is not None else 0

        def progress(layer: int, num_layers: int) -> None:  # each segment's, after each layer
            for f in done:
                f(layer, num_layers)

        try:
            if rows is not None:
                self.cache.begin_decode(rows.seq_ids)
            for seg in ragged.segments:
                self.cache.begin_prefill(seg.seq_id, seg.num_tokens, seg.start)
            ids, positions = self._packed_inputs(batch, ragged, rows)  # [B + sum T_i] each
            x = self.model.embed(ids)  # [B + sum T_i, hidden]
            ctx = self.model.context(
                "prefill" if rows is None else "mixed", positions, self.rope,
                ragged if rows is None else MixedStep(self.cache, B, ragged),  # type: ignore[arg-type]
                self.cfg.prefill_mlp_chunk, progress,
            )
            x = self.model.run_layers(x, ctx, 0, self.model_cfg.num_layers)
            for seg in ragged.segments:
                self.cache.end_prefill(seg.seq_id)
            # The decode rows' logits and every segment's last position's in one head call;
            # only completed prompts' rows are used (cheaper than a host-side filter).
            index = torch.cat([torch.arange(B, device=dev), ragged.last_index(dev) + B])
            logits = self.model.logits(x, index)  # [B + num_segments, vocab]
            outs = list(self._emit(self._end_decode(rows, logits[:B]))) if rows is not None else []
        except BaseException:
            for p, _ in batch:
                self._drop(p)
            raise
        for i, (p, n) in enumerate(batch):
            try:
                outs += self._emit(
                    self._end_chunk(p, n, x, B + ragged.cu_seqlens[i], logits[B + i])
                )
            except BaseException:
                for q, _ in batch[i:]:
                    self._drop(q)
                raise
        return outs

    def _packed_inputs(
        self, batch: list[tuple[PrefillState, int]], ragged: RaggedPrefill, rows: DecodeRows | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A ragged forward's token ids and positions: the decode rows' (if any), then each
        chunk's prompt tokens at their own positions."""
        dev = self.device
        ids = [t for p, n in batch for t in p.request.prompt_ids[p.done : p.done + n]]
        positions = ragged.positions(dev)
        if rows is None:
            return torch.tensor(ids, device=dev), positions
        decode_pos = torch.tensor(rows.positions, device=dev)
        return torch.tensor(rows.tokens + ids, device=dev), torch.cat([decode_pos, positions])

    def _end_chunk(
        self, p: PrefillState, n: int, x: Hidden, offset: int, logits: torch.Tensor
    ) -> list[StepOutput]:
        """After the forward: prompt tokens ``[p.done, p.done + n)`` are cached, their hidden
        states ``x`` rows ``[offset, offset + n)``, ``logits [V]`` the last one's. The last chunk
        samples the first tokens; an earlier one leaves ``p`` as the partial prefill."""
        req, dev = p.request, self.device
        start, end, total = p.done, p.done + n, len(p.request.prompt_ids)
        p.done = end
        self.counters["prefill_tokens"] += n
        self.counters["prefill_chunks"] += 1
        # A resumed request (it has outputs) computed its prompt logprobs at its first prefill.
        logprobs = req.params.prompt_logprobs is not None and not req.output_ids
        if logprobs:
            # Positions [start, end) predict tokens [start + 1, end + 1): the chunk's own slice.
            lp = prompt_logprobs(
                lambda pos: self.model.logits(x, pos.to(dev) + offset),
                req.prompt_ids[start : end + 1],
                req.params.prompt_logprobs,
            )
            p.logprobs += lp if start == 0 else lp[1:]
        if end < total:
            self._partial = p
            return []
        if self._partial is p:
            self._partial = None
        if logprobs:
            req.prompt_logprobs = p.logprobs
        kv = None
        if p.recording is not None:
            kv = p.recording.result(req.prompt_ids, logits)
            if req.record_prompt_kv:
                req.prompt_kv = kv
            if self.prefix_store is not None and not self.shares_pages:
                self.prefix_store.put(req.prompt_ids, kv.layers)
        if self.shares_pages:
            self._store_pages(req)
        return self._end_prefill(p, logits, kv)

    def _store_pages(self, req: Request) -> None:
        """Keep the cache pages of ``req``'s prefilled prompt's whole blocks in the store."""
        store = self.prefix_store
        assert store is not None
        whole = len(req.prompt_ids) // store.block * store.block
        if whole == 0 or store.holds(req.prompt_ids):
            return
        prefix = self.cache.share_prefix(req.request_id, whole)
        if prefix is not None:
            store.put_shared(req.prompt_ids, prefix)

    def prefix_memory(self) -> CacheMemory:
        """Cache bytes the stored prefixes of cache pages hold (each page once; sequences may
        hold them too)."""
        if not self.shares_pages:
            return CacheMemory()
        return self.cache.prefix_memory(self.prefix_store.shared_prefixes())  # type: ignore[union-attr]

    def clear_prefix_cache(self) -> None:
        """Evict every stored prefix (their cache pages are freed unless a sequence holds them)."""
        if self.prefix_store is not None:
            self.prefix_store.clear()

    def _end_prefill(
        self, p: PrefillState, logits: torch.Tensor, kv: PromptKV | None
    ) -> list[StepOutput]:
        req = p.request
        group, req.samples = [req, *req.samples], []
        for r in group[1:]:  # before any first token: the first one may finish and free its copy
            self._copy_prefill(req, r, kv)
        for r in group:
            if r.memory is None:
                r.memory = self.cache.memory(r.request_id).as_dict()
            r.status = Status.RUNNING
            self.running.append(r)
        # A resumed request (preempted: it has outputs, and no samples) does not sample here:
        # its decode rows replay the tokens it generated (``_decode``).
        return [self._first_token(r, logits) for r in group if not r.output_ids]

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

    def _decode_rows(self) -> DecodeRows:
        """The decode's prologue: one row per running request, feeding its output token at its
        cached length — its last one, or while it resumes after a preemption an earlier one,
        replayed (teacher-forced: ``_end_decode`` drops its logits — no sampling, logit state,
        RNG or output — so the cache is rebuilt exactly as the uninterrupted run built it)."""
        reqs = tuple(self.running)
        seq_ids = [r.request_id for r in reqs]
        lengths = [self.cache.length(s) for s in seq_ids]
        fed = [n - len(r.prompt_ids) for r, n in zip(reqs, lengths)]  # output index fed
        return DecodeRows(
            reqs, seq_ids, [r.output_ids[i] for r, i in zip(reqs, fed)], lengths,
            [i for i, (r, f) in enumerate(zip(reqs, fed)) if f == len(r.output_ids) - 1],
        )

    def _decode(self, rows: DecodeRows) -> list[StepOutput]:
        """A decode-only forward through the decode runner (CUDA graphs on a GPU)."""
        logits = self.runner.step(rows.seq_ids, rows.tokens, rows.positions)
        return self._end_decode(rows, logits)

    def _end_decode(self, rows: DecodeRows, logits: torch.Tensor) -> list[StepOutput]:
        """The decode's epilogue, after a forward gave ``logits [B, vocab]`` for ``rows``: the
        tokens are cached, then sampled and appended (finished requests free their memory)."""
        self.cache.end_decode()
        live = rows.live
        reqs = list(rows.requests)
        if len(live) < len(reqs):
            self.counters["replayed_tokens"] += len(reqs) - len(live)
            if not live:
                return []
            logits, reqs = logits[live], [reqs[i] for i in live]
        tokens = sample_requests(logits, reqs)
        return [self._append(r, t) for r, t in zip(reqs, tokens)]

    # optimistic admission ----------------------------------------------------------------------
    def _make_room(self) -> None:
        """Before a decode step, under ``admission_reserve=N``: give every running request whose
        next token passes its reservation room for N more new tokens (at most ``max_tokens``),
        else for that token alone; oldest admission first. When neither fits, evict a stored
        prefix of cache pages (least recently used first) or, when none is left, preempt the
        newest running request (the one needing room, if it is the newest) and try again."""
        reserve = self.cfg.admission_reserve
        if reserve is None:
            return
        for req in sorted(self.running, key=lambda r: r.admission):
            if req not in self.running:  # preempted for an older one's room
                continue
            s = req.request_id
            need = self.cache.length(s) - len(req.prompt_ids) + 1  # new tokens cached after it
            held = self.cache.reserved_tokens(s)
            if need <= held:
                continue
            wants = (min(self._max_new(req), held + reserve), need)
            while req in self.running:
                fits = next((n for n in wants if self.cache.can_grow(s, n)), None)
                if fits is not None:
                    self.cache.grow(s, fits)
                    break
                if not self._evict_shared(None):
                    self._preempt(max(self.running, key=lambda r: r.admission))

    def _preempt(self, req: Request) -> None:
        """Free a running request's cache and requeue it first; it keeps its outputs, logit
        state and generator, and resumes at its next admission (``_end_prefill``, ``_decode_rows``).
        The partial prefill is never preempted: only running requests are."""
        self.running.remove(req)
        self.cache.free_sequence(req.request_id)
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.counters["preemptions"] += 1

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
