"""SwiGLU's gate: ``silu(gate) * up`` of the fused gate/up projection, in plain PyTorch.

The same ops as ``models.llama.MLP.forward``, so bit for bit the model's formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` ``[..., I]`` in ``gate_up``'s dtype.

    Args:
        gate_up: ``[..., 2 * I]``, the gate/up projection's output, gate first.
    """
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
