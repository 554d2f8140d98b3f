"""N processes, one tensor-parallel rank each, that fail together.

``run_ranks(fn, world, *args)`` spawns ``world`` processes, joins them into one process group
(gloo on CPU, NCCL on CUDA) over a free local port, runs ``fn(tp, *args)`` on each and returns
every rank's result. A rank that raises or dies ends the others (they would block in their next
all-reduce) and the call raises ``TPRankError`` naming the rank and its error; a run that passes
``timeout_s`` is killed likewise, so a hang fails instead of blocking.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shadowkv.distributed.group import TPGroup, backend_for


class TPRankError(RuntimeError):
    """A tensor-parallel rank failed or the ranks did not finish in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    device: str = "cpu",
    timeout_s: float = 120.0,
) -> list[Any]:
    """``[fn(TPGroup(r, world), *args) for r in range(world)]``, each in its own process.

    ``fn`` must be importable by name (a module-level function: the ranks are spawned) and its
    result picklable by ``torch.save``."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port, backend = free_port(), backend_for(device)
    procs = mp.start_processes(
        _rank_main, args=(fn, world, port, backend, timeout_s, args, results), nprocs=world,
        join=False, start_method="spawn",
    )
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while not procs.join(timeout=0.2, grace_period=1.0):
            _drain(results, out)
            if time.monotonic() > deadline:
                _kill(procs)
                raise TPRankError(
                    f"the {world} tensor-parallel ranks did not finish within {timeout_s:.0f} s "
                    "(a rank may be stuck in a collective the others never reached); killed them"
                )
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        raise TPRankError(
            f"tensor-parallel rank {err.error_index} of {world} failed, so every rank was "
            f"stopped:\n{err}"
        ) from None
    _drain(results, out)
    missing = sorted(set(range(world)) - set(out))
    if missing:
        raise TPRankError(f"ranks {missing} exited without a result")
    return [out[r] for r in range(world)]


def _rank_main(
    rank: int, fn: Callable[..., Any], world: int, port: int, backend: str, timeout_s: float,
    args: tuple, results: Any,
) -> None:
    # A collective that a failed rank never joins times out here too, not only in the parent.
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        value = fn(TPGroup(rank, world), *args)
        buf = io.BytesIO()
        torch.save(value, buf)  # bytes, not shared tensors: this process exits next
        results.put((rank, buf.getvalue()))
    finally:
        dist.destroy_process_group()


def _drain(results: Any, out: dict[int, Any]) -> None:
    while not results.empty():
        rank, data = results.get()
        out[rank] = torch.load(io.BytesIO(data), weights_only=False)


def _kill(procs: mp.ProcessContext) -> None:
    for p in procs.processes:
        if p.is_alive():
            p.kill()
        p.join()
