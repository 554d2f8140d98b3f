"""N processes, one tensor-parallel rank each, that fail together.

``run_ranks(fn, world, *args)`` spawns ``world`` processes, joins them into one process group
(gloo on CPU, NCCL on CUDA) over a free local port, runs ``fn(tp, *args)`` on each and returns
every rank's result. A rank that raises or dies ends the others (they would block in their next
all-reduce) and the call raises ``TPRankError`` naming the rank and its error; a run that passes
``timeout_s`` is killed likewise, so a hang fails instead of blocking.
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


def _failures(procs: mp.ProcessContext, reported: int) -> list[tuple[int, str]]:
    """``(rank, what happened)`` of every failed rank, the first failure first.

    When one rank fails, the others usually fail too, in the collective it never joins
    ("Connection reset by peer"), and torch may report any of them first. A rank that died
    without a traceback (killed, ``os._exit``) caused it; otherwise the earliest traceback did
    (torch writes it before the process exits and closes its sockets). Ranks stopped by the
    clean-up (SIGTERM, no traceback, not the one torch reported) are left out."""
    dead, raised = [], []
    for rank, (proc, path) in enumerate(zip(procs.processes, procs.error_files)):
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
