"""The engines a throughput run times: built in this process, or on every tensor-parallel rank.

One rank (``LocalEngines``): the model is built here once and each method gets a new ``Engine``
over it. ``tensor_parallel`` = N > 1 (``TPEngines``): N processes each build the same model
(random weights of the same seed, or the checkpoint), keep their shard, and build an engine with
their own cache of their Hkv/N KV heads; this process is rank 0 and drives them through a
``TPEngine`` (each method: ``set_cache`` on every rank), so every rank runs every timed step with
its all-reduces. What the harness reads (cache accounting for the batch search, memory, hit
rates, the roofline) is rank 0's: one rank's share, within its own ``cache_memory_gb``.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from shadowkv.bench.harness import build_engine
from shadowkv.bench.models import RANDOM_WEIGHTS, arch_config, random_model
from shadowkv.cache.methods import CacheConfig
from shadowkv.config import EngineConfig, ModelConfig
from shadowkv.distributed.engine import (
    RandomWeights,
    RankSpec,
    TPEngine,
    check_world,
    open_tp_engine,
    rank_threads,
    torchrun_rank,
)
from shadowkv.engine.engine import Engine
from shadowkv.models.llama import LlamaModel


class LocalEngines:
    """One rank: the model lives in this process; each method gets a new ``Engine`` over it."""

    def __init__(
        self, model_cfg: ModelConfig, model: LlamaModel, weights: str, device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model_cfg, self.model, self.weights = model_cfg, model, weights
        self.device, self.dtype = device, dtype
        self.tensor_parallel = 1

    @property
    def rank_model_cfg(self) -> ModelConfig:
        """The model config as one rank holds its KV heads (here: all of them)."""
        return self.model_cfg

    def engine_for(self, cache: CacheConfig, engine_cfg: EngineConfig) -> Engine:
        return build_engine(self.model, self.model_cfg, cache, engine_cfg, self.device,
                            self.dtype)

    def release(self, engine: Engine) -> None:
        """Drop an engine's cache pools before the next engine allocates its own."""
        engine.cache = None  # type: ignore[assignment]
        engine.runner = None  # type: ignore[assignment]  # holds the cache and graphs' memory
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            # Freed pinned blocks stay in PyTorch's host cache, not the OS: a store sized from
            # available RAM would come out smaller (the name differs across torch versions).
            for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):
                if hasattr(torch._C, name):
                    getattr(torch._C, name)()
                    break

    def close(self) -> None:
        """Nothing runs outside this process."""


class TPEngines:
    """``tensor_parallel`` ranks behind rank 0's ``TPEngine``; a method's engine is every
    rank's, rebuilt with its cache by ``TPEngine.set_cache`` (which frees the old pools first)."""

    def __init__(
        self, tp: TPEngine, model_cfg: ModelConfig, weights: str,
        opened_with: tuple[CacheConfig, EngineConfig],
    ) -> None:
        self.tp, self.model_cfg, self.weights = tp, model_cfg, weights
        self.tensor_parallel = tp.world
        self._fresh: tuple[CacheConfig, EngineConfig] | None = opened_with  # not yet timed

    @property
    def model(self) -> LlamaModel:
        return self.tp.engine.model  # rank 0's shard (its weights are one rank's)

    @property
    def device(self) -> torch.device:
        return self.tp.engine.device  # rank 0's own: cuda:0 on CUDA

    @property
    def dtype(self) -> torch.dtype:
        return self.tp.engine.dtype

    @property
    def rank_model_cfg(self) -> ModelConfig:
        """The model config as one rank holds its KV heads: Hkv/N of them."""
        return replace(self.model_cfg,
                       num_kv_heads=self.model_cfg.num_kv_heads // self.tensor_parallel)

    def engine_for(self, cache: CacheConfig, engine_cfg: EngineConfig) -> TPEngine:
        if self._fresh != (cache, engine_cfg):  # the engines the ranks opened with are unused
            self.tp.set_cache(cache, engine_cfg)
        self._fresh = None
        return self.tp

    def release(self, engine: Any) -> None:
        """Nothing to free now: the next ``set_cache`` drops every rank's pools first."""

    def close(self) -> None:
        self.tp.close()


def open_engines(
    arch: str | None, model_path: str | None, seed: int, cache: CacheConfig,
    engine_cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
) -> LocalEngines | TPEngines:
    """The engines of a run: ``arch`` (random weights from ``seed``) or the checkpoint at
    ``model_path``; with ``engine_cfg.tensor_parallel`` > 1 the workers are spawned here, each
    rank opened with ``cache`` (the first method timed)."""
    if engine_cfg.tensor_parallel == 1:
        model_cfg, model, weights = load_model(arch, model_path, seed, device, dtype)
        return LocalEngines(model_cfg, model, weights, device, dtype)
    return open_tp(arch, model_path, seed, cache, engine_cfg, device, dtype)


def load_model(
    arch: str | None, model_path: str | None, seed: int, device: torch.device,
    dtype: torch.dtype,
) -> tuple[ModelConfig, LlamaModel, str]:
    """The model to time and how its weights were made (``random weights`` or a checkpoint path)."""
    if arch is not None:
        model_cfg = arch_config(arch)
        return model_cfg, random_model(model_cfg, device, dtype, seed=seed), RANDOM_WEIGHTS
    from shadowkv.models.loader import load_model as load_checkpoint
    from shadowkv.models.loader import resolve_model

    path = resolve_model(model_path)
    model_cfg, model = load_checkpoint(path, device, dtype)
    return model_cfg, model, f"checkpoint {path}"


def open_tp(
    arch: str | None, model_path: str | None, seed: int, cache: CacheConfig,
    engine_cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
) -> TPEngines:
    """Rank 0 of ``engine_cfg.tensor_parallel`` ranks (a bad world size or too few GPUs fail
    before any process starts)."""
    n = engine_cfg.tensor_parallel
    where: Path | RandomWeights
    if arch is not None:
        where, model_cfg, weights = RandomWeights(arch, seed), arch_config(arch), RANDOM_WEIGHTS
    else:
        from shadowkv.models.loader import read_config, resolve_model

        where = resolve_model(model_path)
        model_cfg, weights = read_config(where), f"checkpoint {where}"
    check_world(model_cfg, n, device.type)
    spec = RankSpec(where, cache, engine_cfg, device.type, dtype, rank_threads(device.type, n))
    if torchrun_rank(spec):
        sys.exit(0)  # a worker rank of torchrun: it followed rank 0 to the end
    model_cfg, tp = open_tp_engine(spec)
    return TPEngines(tp, model_cfg, weights, (cache, engine_cfg))
