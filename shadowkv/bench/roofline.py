"""Memory roofline of a dense decode step: the bytes it must stream over the measured bandwidth.

A decode step of dense attention reads every weight once (the batch shares them) and every cached
K/V row of every sequence; at long contexts it is bandwidth-bound, so ``bytes / step time`` over
the device's measured copy bandwidth says how close the engine runs to the hardware.
"""

from __future__ import annotations

import time

import torch

from shadowkv.bench.models import weight_bytes
from shadowkv.config import ModelConfig


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second a device-to-device copy moves (read + write), best of ``repeats``.

    512 MiB per buffer on a GPU (far past L2); 128 MiB on a CPU (past the last-level cache).
    """
    n = (nbytes or (2**29 if device.type == "cuda" else 2**27)) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm up (allocation, first-touch pages)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best


def dense_step_bytes(
    model: torch.nn.Module, cfg: ModelConfig, dtype: torch.dtype, context: int, batch: int,
    decode_steps: int,
) -> int:
    """Bytes one full-batch dense decode step reads: the weights (the input embedding only for
    ``batch`` rows when it is not tied to the LM head) and the K/V of every cached token, at the
    mean length over the timed steps (sliding-window layers: of the window only)."""
    weights = weight_bytes(model)
    if not cfg.tie_word_embeddings:
        weights -= cfg.vocab_size * cfg.hidden_size * torch.empty((), dtype=dtype).element_size()
    elem = torch.empty((), dtype=dtype).element_size()
    mean_len = context + (batch - 1) / 2 + decode_steps / 2
    kept = cfg.num_layers * mean_len  # cached rows over all layers, per sequence
    if cfg.sliding_window is not None:
        window = cfg.sliding_window
        kept = sum(min(mean_len, window) if cfg.is_sliding(i) else mean_len
                   for i in range(cfg.num_layers))
    kv = 2 * kept * cfg.kv_dim * elem * batch
    return int(weights + kv)
