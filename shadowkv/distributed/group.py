"""This process's place in the tensor-parallel group, read from torch.distributed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """Rank ``rank`` of ``world`` tensor-parallel ranks; ``group`` is the process group the
    all-reduces run on (None: torch.distributed's default group)."""

    rank: int = 0
    world: int = 1
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a group of {self.world} ranks")


def backend_for(device: torch.device | str) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def current_group(group: dist.ProcessGroup | None = None) -> TPGroup:
    """Rank and world of ``group`` (default: the whole job); one rank of one when
    torch.distributed is not initialised (a single-process run)."""
    if not dist.is_available() or not dist.is_initialized():
        return TPGroup()
    return TPGroup(dist.get_rank(group), dist.get_world_size(group), group)
