"""Helpers shared by the Triton launchers (``kernels/<op>/triton.py``); imports Triton lazily."""

from __future__ import annotations

import os
from typing import Any

import torch


def interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_dtype(dtype: torch.dtype) -> Any:
    """Operand dtype for ``tl.dot``: the input's, except bf16 under the interpreter.

    The interpreter (Triton 3.9) multiplies bf16 operands as their raw uint16 bits, so kernels
    upcast them to fp32 there; compiled kernels keep bf16 for the tensor cores.
    """
    import triton.language as tl

    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return {torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (no tf32 rounding).

    ``None`` (Triton's default) for 16-bit inputs, which have no precision choice.
    """
    return "ieee" if dtype == torch.float32 else None


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs keep CPU tests fast


def plan_split_len(
    num_rows: int,
    capacity: int,
    device: torch.device,
    block: int,
    max_splits: int = 64,
    min_split: int = 128,
) -> int:
    """Items per split of a ``capacity``-long axis so ``num_rows`` x splits fill ~2 waves of SMs.

    Sized from the capacity, not the live lengths, so planning needs no host sync. The result is
    a multiple of ``block`` with at most ``max_splits`` splits of at least ``min_split`` items.
    """
    want = max(1, -(-2 * num_sms(device) // max(1, num_rows)))
    num_splits = max(1, min(want, max_splits, -(-capacity // min_split)))
    split_len = -(-capacity // num_splits)
    return -(-split_len // block) * block


def check(cond: bool, msg: str) -> None:
    """Refuse bad input with a ``ValueError`` naming the problem (asserts vanish under -O)."""
    if not cond:
        raise ValueError(msg)
