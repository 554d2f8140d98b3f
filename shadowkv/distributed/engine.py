"""The engine, tensor-parallel: one full ``Engine`` per rank, fed the same inputs by rank 0.

SGLang's pattern: every rank runs its own scheduler (an ``Engine`` over its shard of the model,
``shard_model``, and its own cache of its KV heads). Rank 0 is the frontend (the ``LLM`` process,
the server's engine thread) and holds a ``TPEngine``: it applies each call that changes the
engine (``add_request``, ``add_requests``, ``abort``, ``clear_prefix_cache``) locally and, once
it succeeded, records it; each ``step()`` first broadcasts the recorded commands (pickled, over
a gloo group of its own) and then steps. Ranks 1..N-1 run ``worker_loop``: receive the
commands, apply them in the same order, step. The same inputs in the same order give every rank
the same request ids and the same plan, so the model's all-reduces line up; every rank has the
full logits (the LM head is replicated), so every rank samples the same tokens.

What could still make ranks diverge, and how it is handled:

- the cache memory budget reads free GPU memory: ``build_engine`` takes the minimum over the
  ranks (an all-reduce) and gives every rank that budget;
- an unseeded sampled request draws its generator's seed from the process's RNG: rank 0 draws
  the seed and sends it in the command (the request's ``params.seed`` then shows it), so every
  rank samples alike;
- times (arrival, first token) are metrics only, never the plan.

Each command message also carries a fingerprint of rank 0's previous step (the running ids
with their token counts and last tokens, the waiting ids, or the error it raised); a worker
whose own fingerprint differs stops with "ranks diverged", which ends the frontend with a
``TPRankError`` like any failed worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shadowkv.cache.base import CacheOptions
from shadowkv.cache.methods import CacheConfig
from shadowkv.config import ConfigError, EngineConfig, ModelConfig
from shadowkv.distributed.group import TPGroup, backend_for
from shadowkv.distributed.launch import TPRankError, Workers, spawn_workers
from shadowkv.distributed.shard import check_divisible, shard_model
from shadowkv.engine.engine import Engine, StepOutput, cache_memory_budget
from shadowkv.engine.request import Request
from shadowkv.engine.sampling import SamplingParams
from shadowkv.models.llama import LlamaModel
from shadowkv.models.loader import load_model
from shadowkv.models.tokenizer import Tokenizer

# Commands wait for rank 0's next step however long the frontend is idle (a server with no
# requests): their group's timeout is long; a dead rank 0 closes its sockets, which ends them.
IDLE_TIMEOUT = timedelta(days=30)
# How long rank 0 waits for a worker that failed in a collective to exit (and say why).
EXIT_GRACE_S = 5.0
STOP_TIMEOUT_S = 10.0  # how long ``close`` waits for the workers to take its stop message

Command = tuple[Any, ...]
Fingerprint = tuple[Any, ...]


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: its own GPU ``cuda:rank`` on CUDA, the CPU otherwise."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def load_shard(
    path: Path, device: torch.device, dtype: torch.dtype, tp: TPGroup
) -> tuple[ModelConfig, LlamaModel]:
    """The checkpoint at ``path`` loaded whole on ``device`` and cut to rank ``tp.rank``."""
    cfg, model = load_model(path, device, dtype)
    return cfg, shard_model(model, tp)


def build_engine(
    model: LlamaModel, model_cfg: ModelConfig, tokenizer: Tokenizer, cache_cfg: CacheConfig,
    engine_cfg: EngineConfig, device: torch.device, dtype: torch.dtype, tp: TPGroup,
) -> Engine:
    """This rank's ``Engine``; with several ranks every one gets the smallest rank's cache
    budget (on CUDA it reads free memory, which differs by GPU), so all admit alike."""
    if tp.world > 1:
        budget = torch.tensor([cache_memory_budget(engine_cfg, device)], dtype=torch.int64)
        if device.type == "cuda":
            budget = budget.to(device)  # NCCL reduces device tensors
        dist.all_reduce(budget, op=dist.ReduceOp.MIN, group=tp.group)
        engine_cfg = replace(engine_cfg, cache_memory_gb=int(budget.item()) / 2**30)
    return Engine(model, model_cfg, tokenizer, cache_cfg, engine_cfg, device, dtype)


def fingerprint(engine: Engine) -> Fingerprint:
    """What a step left, cheaply compared: per running request its id, token count and last
    token, and the waiting ids."""
    running = tuple(
        (r.request_id, len(r.output_ids), r.output_ids[-1] if r.output_ids else None)
        for r in engine.running
    )
    return running, tuple(r.request_id for r in engine.waiting)


def _error_print(err: BaseException) -> Fingerprint:
    return ("error", type(err).__name__)


@dataclass
class StepMessage:
    """What rank 0 sends before each step: the commands since the last one, the fingerprint of
    its last step (None before the first), whether to ``step`` after them (not after a
    ``set_cache``), and ``stop`` to end the workers."""

    commands: list[Command] = field(default_factory=list)
    last: Fingerprint | None = None
    step: bool = True
    stop: bool = False


def apply(engine: Engine, cmd: Command, tp: TPGroup) -> Engine:
    """Run one recorded command on a worker's engine, as rank 0 ran it; returns the engine
    (a new one after ``set_cache``)."""
    kind, *args = cmd
    if kind == "set_cache":
        cache_cfg, engine_cfg = args
        parts = (engine.model, engine.model_cfg, engine.tokenizer)
        device, dtype = engine.device, engine.dtype
        del engine  # free the old pools before the new ones (the caller's reference is gone)
        return build_engine(*parts, cache_cfg, engine_cfg, device, dtype, tp)
    if kind == "add":
        prompt_ids, params, record, options = args
        engine.add_request(prompt_ids, params, record_prompt_kv=record, cache_options=options)
    elif kind == "adds":
        prompt_ids, plist, options = args
        engine.add_requests(prompt_ids, plist, cache_options=options)
    elif kind == "abort":
        engine.abort(args[0])
    elif kind == "clear_prefix_cache":
        engine.clear_prefix_cache()
    else:
        raise ValueError(f"unknown tensor-parallel command {kind!r}")
    return engine


def worker_loop(engine: Engine, commands: dist.ProcessGroup, tp: TPGroup) -> int:
    """Rank 1..N-1: apply rank 0's commands and step, until it sends ``stop``. Returns the
    number of steps run. A step that raises is not fatal (rank 0 raised the same and goes on,
    e.g. a request that can never be admitted); the fingerprint check catches any difference."""
    last: Fingerprint | None = None
    steps = 0
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=commands)
        msg: StepMessage = box[0]
        if msg.stop:
            return steps
        if msg.last != last:
            raise RuntimeError(
                f"tensor-parallel ranks diverged after step {steps}: rank 0 left {msg.last}, "
                f"rank {dist.get_rank()} left {last}"
            )
        for cmd in msg.commands:
            engine = apply(engine, cmd, tp)
            if cmd[0] == "set_cache":
                last = None
        if not msg.step:
            continue
        try:
            engine.step()
            last = fingerprint(engine)
        except Exception as err:  # noqa: BLE001 - rank 0 saw the same error and handles it
            last = _error_print(err)
        steps += 1


def with_seed(params: SamplingParams) -> SamplingParams:
    """``params`` with a seed drawn now if it samples without one: every rank then builds the
    same generator (``make_generator`` would draw from each process's own RNG)."""
    if params.greedy or params.seed is not None:
        return params
    return replace(params, seed=int(torch.randint(2**62, ()).item()))


class TPEngine:
    """Rank 0's engine under tensor parallelism: the local ``Engine``'s surface (reads go to
    it), with the calls that change it recorded and sent to the workers at the next ``step``.

    A worker that dies or raises, or a collective that times out, raises ``TPRankError``
    (naming the worker and its traceback); the engine is unusable after that. ``close()`` stops
    the workers."""

    _LOCAL = ("progress", "on_outputs")  # attributes set by frontends, on rank 0 only

    def __init__(
        self, engine: Engine, workers: Workers, commands: dist.ProcessGroup,
        on_close: Callable[[], None] | None = None, timeout_s: float = 600.0,
    ) -> None:
        object.__setattr__(self, "engine", engine)
        object.__setattr__(self, "workers", workers)
        object.__setattr__(self, "_commands", commands)
        object.__setattr__(self, "_on_close", on_close)
        object.__setattr__(self, "_timeout_s", timeout_s)
        # gloo's broadcast returns on rank 0 only once every worker received it, and the
        # command group never times out (workers wait out an idle frontend): rank 0 sends from
        # this thread and gives up after ``timeout_s`` (a stuck worker) instead of hanging.
        object.__setattr__(self, "_sender", ThreadPoolExecutor(1, "shadowkv-tp-send"))
        object.__setattr__(self, "_pending", [])
        object.__setattr__(self, "_last", None)
        object.__setattr__(self, "_failed", None)
        object.__setattr__(self, "closed", False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._LOCAL:
            raise AttributeError(f"TPEngine sets only {self._LOCAL} on its engine, not {name!r}")
        setattr(self.engine, name, value)

    @property
    def world(self) -> int:
        return self.workers.world

    # the calls that change the engine: run here, then recorded for the workers ---------------
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, prompt_kv: Any = None,
        record_prompt_kv: bool = False, cache_options: CacheOptions | None = None,
    ) -> Request:
        """``Engine.add_request``; an unseeded sampled request gets a seed drawn here (see
        ``with_seed``). A replayed prefill (``prompt_kv``) is one rank's heads: refused."""
        self._check_usable()
        if prompt_kv is not None:
            raise ConfigError(
                "a replayed prefill (prompt_kv) holds one rank's KV heads; with tensor_parallel > "
                "1 every rank prefills (eval: share_prefill is off)"
            )
        params = with_seed(params)
        req = self.engine.add_request(
            prompt_ids, params, record_prompt_kv=record_prompt_kv, cache_options=cache_options
        )
        self._pending.append(("add", list(prompt_ids), params, record_prompt_kv, cache_options))
        return req

    def add_requests(
        self, prompt_ids: list[int], params: Sequence[SamplingParams],
        cache_options: CacheOptions | None = None,
    ) -> list[Request]:
        self._check_usable()
        plist = [with_seed(p) for p in params]
        reqs = self.engine.add_requests(prompt_ids, plist, cache_options=cache_options)
        self._pending.append(("adds", list(prompt_ids), plist, cache_options))
        return reqs

    def abort(self, request_id: int) -> None:
        self.engine.abort(request_id)
        if self._failed is None and not self.closed:
            self._pending.append(("abort", request_id))

    def clear_prefix_cache(self) -> None:
        self._check_usable()
        self.engine.clear_prefix_cache()
        self._pending.append(("clear_prefix_cache",))

    def step(self) -> list[StepOutput]:
        """Send the commands since the last step (and that step's fingerprint), then step."""
        self._check_usable()
        msg = StepMessage(self._pending, self._last)
        object.__setattr__(self, "_pending", [])
        self._send(msg)
        try:
            outs = self.engine.step()
        except Exception as err:
            self._raise_if_ranks_failed(err)
            object.__setattr__(self, "_last", _error_print(err))
            raise
        object.__setattr__(self, "_last", fingerprint(self.engine))
        return outs

    def set_cache(self, cache_cfg: CacheConfig, engine_cfg: EngineConfig) -> None:
        """Every rank's engine rebuilt with ``cache_cfg`` and ``engine_cfg`` (same model)."""
        self._check_usable()
        if engine_cfg.tensor_parallel != self.world:
            raise ConfigError(
                f"set_cache cannot change tensor_parallel ({self.world} ranks are running, "
                f"{engine_cfg.tensor_parallel} asked); make a new LLM"
            )
        cmd = ("set_cache", cache_cfg, engine_cfg)
        msg = StepMessage([*self._pending, cmd], self._last, step=False)
        object.__setattr__(self, "_pending", [])
        self._send(msg)
        object.__setattr__(self, "_last", None)
        e = self.engine
        parts = (e.model, e.model_cfg, e.tokenizer)
        device, dtype = e.device, e.dtype
        object.__setattr__(self, "engine", None)  # free the old pools before the new ones
        del e
        tp = TPGroup(0, self.world)
        try:
            engine = build_engine(*parts, cache_cfg, engine_cfg, device, dtype, tp)
        except Exception as err:
            self._raise_if_ranks_failed(err)
            raise
        object.__setattr__(self, "engine", engine)

    # workers -----------------------------------------------------------------------------------
    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the workers (they finish the message they are on) and leave the group."""
        if self.closed:
            return
        object.__setattr__(self, "closed", True)
        try:
            if self._failed is None and self.workers.failure() is None:
                self._broadcast(StepMessage(stop=True), min(timeout_s, STOP_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - a worker died or is stuck: it is killed below
            pass
        finally:
            self.workers.join(timeout_s)  # killing a stuck worker also ends a stuck send
            self._sender.shutdown(wait=False)
            if self._on_close is not None:
                self._on_close()

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise TPRankError(f"the tensor-parallel engine failed earlier: {self._failed}")
        if self.closed:
            raise RuntimeError("the tensor-parallel engine is closed")

    def _send(self, msg: StepMessage) -> None:
        try:
            self._broadcast(msg, self._timeout_s)
        except Exception as err:
            self._raise_if_ranks_failed(err)
            raise

    def _broadcast(self, msg: StepMessage, timeout_s: float) -> None:
        sent = self._sender.submit(
            lambda: dist.broadcast_object_list([msg], src=0, group=self._commands)
        )
        try:
            sent.result(timeout=timeout_s)
        except FutureTimeout:
            raise SendTimeout(
                f"a worker did not take rank 0's commands within {timeout_s:.0f} s (stuck, or "
                "stopped)"
            ) from None

    def _raise_if_ranks_failed(self, err: BaseException) -> None:
        """After ``err``: a ``TPRankError`` if a worker died (waiting a little for one that is
        exiting) or a collective failed; otherwise ``err`` is rank 0's own and stays as is."""
        collective = isinstance(err, (dist.DistError, SendTimeout)) or _looks_collective(err)
        deadline = time.monotonic() + (EXIT_GRACE_S if collective else 0.0)
        failure = self.workers.failure()
        while failure is None and time.monotonic() < deadline:
            time.sleep(0.1)
            failure = self.workers.failure()
        if failure is None and not collective:
            return
        text = failure or f"every worker is still running, but (stuck?): {err}"
        object.__setattr__(self, "_failed", text)
        self.close(timeout_s=0)
        raise TPRankError(
            f"a tensor-parallel rank of {self.world} failed, so the engine stopped:\n{text}"
        ) from err


class SendTimeout(RuntimeError):
    """Rank 0's step message was not taken by every worker in time."""


def _looks_collective(err: BaseException) -> bool:
    """gloo and NCCL report a peer that closed its connection as a plain ``RuntimeError``."""
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        word in text for word in ("gloo", "NCCL", "Connection closed", "Connection reset")
    )


def commands_group(world: int) -> dist.ProcessGroup:
    """The gloo group the step messages go over (every rank must call this, in the same order
    as its other collectives): CPU objects, and a timeout as long as a frontend may idle."""
    return dist.new_group(list(range(world)), backend="gloo", timeout=IDLE_TIMEOUT)


# launching ---------------------------------------------------------------------------------------
TIMEOUT_S = 600.0  # a collective (or the group's start) that waits longer fails: no hang


@dataclass(frozen=True)
class RandomWeights:
    """A model with no checkpoint: the named architecture (``shadowkv.bench.models``) with
    random weights drawn from ``seed``, so every rank draws the same full model before it
    shards it (benchmarks; the tokenizer is ``StubTokenizer``)."""

    arch: str
    seed: int = 0


@dataclass(frozen=True)
class RankSpec:
    """What a worker rank needs to build its engine as rank 0 builds its own."""

    path: Path | RandomWeights  # a checkpoint, or random weights of a named architecture
    cache: CacheConfig
    engine: EngineConfig
    device: str  # "cpu" or "cuda": rank r uses cuda:r
    dtype: torch.dtype
    threads: int  # CPU threads (torch.set_num_threads), rank 0's count


def start_rank(spec: RankSpec, tp: TPGroup) -> tuple[ModelConfig, Engine, dist.ProcessGroup]:
    """This rank's shard, engine and command group; every rank runs it, in this order (its
    collectives: the budget all-reduce, the group's creation)."""
    # torchrun's LOCAL_RANK is the GPU on this node (its RANK counts every node's processes).
    device = rank_device(torch.device(spec.device), int(os.environ.get("LOCAL_RANK", tp.rank)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model_cfg, model, tokenizer = rank_model(spec, device, tp)
    engine = build_engine(model, model_cfg, tokenizer, spec.cache, spec.engine, device,
                          spec.dtype, tp)
    return model_cfg, engine, commands_group(tp.world)


def rank_model(
    spec: RankSpec, device: torch.device, tp: TPGroup
) -> tuple[ModelConfig, LlamaModel, Any]:
    """This rank's shard of ``spec.path`` and the tokenizer: the checkpoint's own, or for
    ``RandomWeights`` the benchmark's ``StubTokenizer``."""
    if not isinstance(spec.path, RandomWeights):
        return (*load_shard(spec.path, device, spec.dtype, tp), Tokenizer(spec.path))
    # Imported here: shadowkv.bench imports this module (bench --tensor-parallel).
    from shadowkv.bench.harness import StubTokenizer
    from shadowkv.bench.models import arch_config, random_model

    model_cfg = arch_config(spec.path.arch)
    model = random_model(model_cfg, device, spec.dtype, seed=spec.path.seed)
    return model_cfg, shard_model(model, tp), StubTokenizer()


def rank_threads(device: str, world: int) -> int:
    """CPU threads per rank: on a CPU the ``world`` ranks (rank 0's process included) share this
    process's threads, since each taking all of them oversubscribes the cores ``world`` times
    (bench's tiny arch at TP=2 on 2 cores: 58 ms/step vs 11 at one thread per rank); set
    ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` before to choose the total. A GPU rank keeps
    the count."""
    threads = torch.get_num_threads()
    return max(1, threads // world) if device == "cpu" else threads


def check_world(model_cfg: ModelConfig, world: int, device: str) -> None:
    """Refuse, before any process starts, a world that does not divide the model's heads and
    MLP (``TPShapeError``) or that has fewer GPUs than ranks on CUDA (under torchrun each node
    brings its own: not checked here)."""
    check_divisible(model_cfg, world)
    gpus = torch.cuda.device_count() if device == "cuda" else world
    if gpus < world and torchrun_world() is None:
        raise ConfigError(
            f"tensor_parallel={world} needs {world} GPUs (one per rank) but {gpus} are "
            "visible; lower --tensor-parallel"
        )


def serve_rank(tp: TPGroup, spec: RankSpec) -> None:
    """A worker rank's whole life: build its engine, then follow rank 0 until it stops."""
    torch.set_num_threads(spec.threads)
    _, engine, commands = start_rank(spec, tp)
    worker_loop(engine, commands, tp)


def open_tp_engine(spec: RankSpec, timeout_s: float | None = None) -> tuple[ModelConfig, TPEngine]:
    """Rank 0's ``TPEngine`` over ``spec.engine.tensor_parallel`` ranks: the workers spawned
    here (``spawn_workers``), or, when this process was started by ``torchrun`` (``RANK`` and
    ``WORLD_SIZE`` set), the other torchrun processes (``torchrun_rank`` runs them)."""
    world = spec.engine.tensor_parallel
    timeout = TIMEOUT_S if timeout_s is None else timeout_s
    workers, tp = launched_group(spec, world, timeout)
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)  # rank 0's share too (``rank_threads``)

    def leave() -> None:  # the process as it was: no group, its own thread count
        dist.destroy_process_group()
        torch.set_num_threads(threads)

    try:
        model_cfg, engine, commands = start_rank(spec, tp)
    except Exception as err:
        failure = workers.failure()
        workers.join(0)
        leave()
        if failure is None:
            raise
        raise TPRankError(
            f"a tensor-parallel worker failed while the engines were built:\n{failure}"
        ) from err
    return model_cfg, TPEngine(engine, workers, commands, on_close=leave, timeout_s=timeout)


def launched_group(spec: RankSpec, world: int, timeout_s: float) -> tuple[Workers, TPGroup]:
    """Rank 0's group: joined through torchrun's environment if set, else with spawned workers."""
    if dist.is_initialized():
        raise ConfigError(
            "this process already belongs to a process group (another tensor-parallel LLM?); "
            "close() that LLM before making a new one"
        )
    if torchrun_world() is None:
        return spawn_workers(serve_rank, world, spec, device=spec.device, timeout_s=timeout_s)
    _init_from_env(spec, world, timeout_s)
    return Workers(None, world), TPGroup(0, world)


def torchrun_world() -> int | None:
    """``WORLD_SIZE`` when this process was started by torchrun (or another launcher that sets
    ``RANK`` and ``WORLD_SIZE``), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["WORLD_SIZE"])


def torchrun_rank(spec: RankSpec, timeout_s: float | None = None) -> bool:
    """Under torchrun, a rank other than 0 builds its engine and follows rank 0 until it stops,
    then returns True (its process should exit); rank 0 (and any run without torchrun) gets
    False at once."""
    if torchrun_world() is None or int(os.environ["RANK"]) == 0:
        return False
    world = spec.engine.tensor_parallel
    _init_from_env(spec, world, TIMEOUT_S if timeout_s is None else timeout_s)
    serve_rank(TPGroup(dist.get_rank(), world), spec)
    dist.destroy_process_group()
    return True


def _init_from_env(spec: RankSpec, world: int, timeout_s: float) -> None:
    launched = torchrun_world()
    if launched != world:
        raise ConfigError(
            f"torchrun started {launched} processes but tensor_parallel is {world}; pass "
            f"--nproc-per-node {world} (or --tensor-parallel {launched})"
        )
    dist.init_process_group(backend_for(spec.device), timeout=timedelta(seconds=timeout_s))
