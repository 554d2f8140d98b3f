"""Choose the Triton kernel or the PyTorch reference for an op.

``SHADOWKV_KERNELS=torch`` forces the reference everywhere; ``=triton`` forces Triton for every op
that has a ``triton.py`` (with ``TRITON_INTERPRET=1`` this runs kernels on the CPU, which is how CI
tests them). By default CUDA tensors use Triton when it is importable and the op has a kernel;
everything else uses the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def has_triton_kernel(op: str) -> bool:
    """Whether ``shadowkv/kernels/<op>/triton.py`` exists (checked without importing it)."""
    try:
        return importlib.util.find_spec(f"shadowkv.kernels.{op}.triton") is not None
    except ModuleNotFoundError:  # no kernels/<op>/ package at all
        return False


def use_triton(t: torch.Tensor, op: str | None = None) -> bool:
    """Whether the op (named as its kernels/ folder) should run its Triton kernel on ``t``."""
    mode = os.environ.get("SHADOWKV_KERNELS", "auto")
    if mode == "torch":
        return False
    has_kernel = op is None or has_triton_kernel(op)
    if mode == "triton":
        return has_kernel
    return t.is_cuda and triton_available() and has_kernel
