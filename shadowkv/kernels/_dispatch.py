"""Choose the Triton kernel or the PyTorch reference for an op.

``SHADOWKV_KERNELS=torch`` forces the reference everywhere; ``=triton`` forces Triton (with
``TRITON_INTERPRET=1`` this runs kernels on the CPU, which is how CI tests them). By default
CUDA tensors use Triton when it is importable and everything else uses the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("SHADOWKV_KERNELS", "auto")
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return t.is_cuda and triton_available()
