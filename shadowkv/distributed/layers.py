"""The row-parallel projection and the slicing helpers of column-parallel ones."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_r @ W_r^T) + b``: this rank's input columns of a projection whose input
    is split across ranks (o_proj over heads, down_proj over intermediate columns). The bias is
    added once, after the sum, so it is not counted ``world`` times."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup | None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in / world]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight)  # this rank's partial sum [T, out]
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def column_linear(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """A copy of ``linear`` keeping output rows ``rows`` (its weight and bias rows)."""
    weight = linear.weight.detach()[rows].contiguous()
    out = nn.Linear(
        weight.shape[1], weight.shape[0], bias=linear.bias is not None,
        device=weight.device, dtype=weight.dtype,
    )
    out.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach()[rows].contiguous(), requires_grad=False)
    return out


def row_linear(
    linear: nn.Linear, cols: torch.Tensor, group: dist.ProcessGroup | None
) -> RowParallelLinear:
    """``linear`` keeping input columns ``cols``, its output summed over the ranks."""
    weight = linear.weight.detach()[:, cols].contiguous()
    bias = None if linear.bias is None else linear.bias.detach()
    return RowParallelLinear(weight, bias, group)


def block_rows(start: int, width: int, rank: int, world: int) -> torch.Tensor:
    """Indices of rank ``rank``'s contiguous ``1/world`` of the ``width`` rows at ``start``."""
    part = width // world
    return torch.arange(start + rank * part, start + (rank + 1) * part)
