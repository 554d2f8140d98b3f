"""Rotary position embeddings (neox / rotate-half layout) with the scalings checkpoints ask for.

The table is built once for the engine's maximum length and indexed by absolute position, so the
ShadowKV cache can re-apply RoPE to rebuilt keys at their original positions.
"""

from __future__ import annotations

import math

import torch

from shadowkv.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[D/2]`` (float64) and the attention (cos/sin) factor."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / rope.theta**exponents
    original = rope.original_max_position or max_position
    if rope.kind == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.kind == "dynamic":
        # NTK-aware scaling, evaluated once at the engine's maximum length (a static table keeps
        # cached keys consistent; HF recomputes it per call and re-rotates nothing either).
        seq = max(max_position, original)
        if seq <= original:
            return inv_freq, 1.0
        base = rope.theta * ((rope.factor * seq / original) - (rope.factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
        return 1.0 / base**exponents, 1.0
    if rope.kind == "llama3":
        low_wavelen = original / rope.low_freq_factor
        high_wavelen = original / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (original / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope.kind == "yarn":
        return _yarn(rope, head_dim, original)
    return inv_freq, 1.0


def _yarn(rope: RopeConfig, head_dim: int, original: int) -> tuple[torch.Tensor, float]:
    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rope.factor * pos_freqs)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where high-frequency dims are extrapolated unchanged
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    def mscale(m: float = 1.0) -> float:
        return 0.1 * m * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0

    factor = rope.attention_factor
    if factor is None and rope.mscale and rope.mscale_all_dim:
        factor = mscale(rope.mscale) / mscale(rope.mscale_all_dim)
    elif factor is None:
        factor = mscale()
    return inv_freq, float(factor)


class RotaryEmbedding:
    """cos/sin tables ``[max_position, D]`` on one device and dtype."""

    def __init__(
        self,
        rope: RopeConfig,
        head_dim: int,
        max_position: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        inv_freq, factor = inv_frequencies(rope, head_dim, max_position)
        positions = torch.arange(max_position, dtype=torch.float64)
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        self.cos = (emb.cos() * factor).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * factor).to(device=device, dtype=dtype)
        self.max_position = max_position
        self.head_dim = head_dim

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [T, H, D]`` (or ``[..., T, H, D]`` with ``positions`` broadcastable)."""
        cos = self.cos[positions].unsqueeze(-2)  # [..., T, 1, D]
        sin = self.sin[positions].unsqueeze(-2)
        return apply_rope(x, cos, sin)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` computed in the table's dtype, returned in ``x``'s."""
    xf = x.to(cos.dtype)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
