"""N processes, one tensor-parallel rank each, that fail together.

``run_ranks(fn, world, *args)`` spawns ``world`` processes, joins them into one process group
(gloo on CPU, NCCL on CUDA) over a free local port, runs ``fn(tp, *args)`` on each and returns
every rank's result. A rank that raises or dies ends the others (they would block in their next
all-reduce) and the call raises ``TPRankError`` naming the rank and its error; a run that passes
``timeout_s`` is killed likewise, so a hang fails instead of blocking.

``spawn_workers(fn, world, *args)`` is the same for an engine that keeps running: ranks
``1..world-1`` run ``fn`` in spawned processes while the calling process joins the group as rank
0 and goes on with its own work; ``Workers.failure()`` says which worker died and why.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
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
        failures = _failures(procs, err.error_index)
        first, others = failures[0], "".join(f"\n\nthen {text}" for _, text in failures[1:])
        raise TPRankError(
            f"tensor-parallel rank {first[0]} of {world} failed, so every rank was stopped:\n"
            f"{first[1]}{others}"
        ) from None
    finally:
        _remove_error_files(procs)
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
    # On an error the group is left to the process's exit: its traceback is then written (by
    # torch's spawn wrapper) before the other ranks see the connection close (``_failures``).
    value = fn(TPGroup(rank, world), *args)
    buf = io.BytesIO()
    torch.save(value, buf)  # bytes, not shared tensors: this process exits next
    results.put((rank, buf.getvalue()))
    dist.destroy_process_group()


class Workers:
    """Ranks ``1..world-1`` in spawned processes, rank 0 being the process that started them
    (``spawn_workers``): it joins the group itself, so ``fn`` on a worker runs alongside it."""

    def __init__(self, procs: mp.ProcessContext | None, world: int) -> None:
        self.procs, self.world = procs, world  # procs None: started by torchrun, not watched

    def failure(self) -> str | None:
        """What happened to the workers that exited, the first failure first (None: all run).
        A worker that exited cleanly counts too: rank 0 still expects it in the collectives."""
        if self.procs is None:
            return None
        exited = [p for p in self.procs.processes if not p.is_alive()]
        if not exited:
            return None
        failures = _failures(self.procs, reported=-1, first_rank=1)
        if not failures:  # exited with code 0 (or SIGTERM) before rank 0 stopped it
            codes = {r + 1: p.exitcode for r, p in enumerate(self.procs.processes)}
            return f"worker ranks exited early (exit codes {codes})"
        return "\n\nthen ".join(text for _, text in failures)

    def join(self, timeout_s: float) -> None:
        """Wait ``timeout_s`` for the workers to exit, then kill those still running."""
        if self.procs is None:
            return
        deadline = time.monotonic() + timeout_s
        for p in self.procs.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        _kill(self.procs)
        _remove_error_files(self.procs)


def spawn_workers(
    fn: Callable[..., Any], world: int, *args: Any, device: str = "cpu",
    timeout_s: float = 120.0,
) -> tuple[Workers, TPGroup]:
    """Start ranks ``1..world-1`` running ``fn(TPGroup(r, world), *args)`` and join this process
    to their group as rank 0 (gloo on CPU, NCCL on CUDA; collectives time out after
    ``timeout_s``). Returns the workers and rank 0's ``TPGroup``; raises ``TPRankError`` when a
    worker dies before the group is formed.

    ``fn`` must be importable by name (the workers are spawned). The workers are daemons: they
    end with this process if nothing stops them first."""
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    backend = backend_for(device)
    procs = mp.start_processes(
        _worker_main, args=(fn, world, store.port, backend, timeout_s, args), nprocs=world - 1,
        join=False, daemon=True, start_method="spawn",
    )
    workers = Workers(procs, world)
    deadline = time.monotonic() + timeout_s
    while store.add("joined", 0) < world - 1:  # workers count themselves in before the group
        failure = workers.failure()
        if failure is not None or time.monotonic() > deadline:
            workers.join(0)
            raise TPRankError(
                f"a tensor-parallel worker failed before joining the group of {world}:\n"
                f"{failure or f'not every worker joined within {timeout_s:.0f} s'}"
            )
        time.sleep(0.05)
    dist.init_process_group(backend, store=store, rank=0, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return workers, TPGroup(0, world)


def _worker_main(
    index: int, fn: Callable[..., Any], world: int, port: int, backend: str, timeout_s: float,
    args: tuple,
) -> None:
    rank = index + 1
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    store.add("joined", 1)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    fn(TPGroup(rank, world), *args)  # an error: the traceback is written, the process exits
    dist.destroy_process_group()


def _failures(
    procs: mp.ProcessContext, reported: int, first_rank: int = 0
) -> list[tuple[int, str]]:
    """``(rank, what happened)`` of every failed rank, the first failure first.

    When one rank fails, the others usually fail too, in the collective it never joins
    ("Connection reset by peer"), and torch may report any of them first. A rank that died
    without a traceback (killed, ``os._exit``) caused it; otherwise the earliest traceback did
    (torch writes it before the process exits and closes its sockets). Ranks stopped by the
    clean-up (SIGTERM, no traceback, not the one torch reported) are left out. ``first_rank``:
    the rank of ``procs``' first process (1 for ``spawn_workers``)."""
    dead, raised = [], []
    for rank, (proc, path) in enumerate(zip(procs.processes, procs.error_files), first_rank):
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as fh:
                text = f"rank {rank} raised:\n{pickle.load(fh)}"
            raised.append((os.path.getmtime(path), rank, text))
        elif proc.exitcode not in (0, None, -signal.SIGTERM) or rank == reported:
            dead.append((rank, f"rank {rank} exited with code {proc.exitcode} (no traceback)"))
    return dead + [(rank, text) for _, rank, text in sorted(raised)]


def _remove_error_files(procs: mp.ProcessContext) -> None:
    for path in procs.error_files:
        if os.path.exists(path):
            os.unlink(path)


def _drain(results: Any, out: dict[int, Any]) -> None:
    while not results.empty():
        rank, data = results.get()
        out[rank] = torch.load(io.BytesIO(data), weights_only=False)


def _kill(procs: mp.ProcessContext) -> None:
    for p in procs.processes:
        if p.is_alive():
            p.kill()
        p.join()
