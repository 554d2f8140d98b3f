"""RoPE frequencies for the scalings checkpoints ask for, registered by kind, and their tables.

Each kind maps ``(RopeConfig, rotary dims, max position)`` to inverse frequencies and an attention
factor; ``rope_tables`` turns them into ``kernels.rope.RopeTables`` (cos/sin per position and
frequency) built once for the engine's maximum length and indexed by absolute position, so the
ShadowKV cache can re-apply RoPE to rebuilt keys at their original positions. The rotation itself
is one op, ``kernels.rope`` (model q/k and the key rebuild alike).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from shadowkv.config import ConfigError, RopeConfig
from shadowkv.kernels.rope.tables import RopeTables

# (rope, rotary dims, max position) -> (inverse frequencies [dims/2] float64, attention factor)
RopeKind = Callable[[RopeConfig, int, int], tuple[torch.Tensor, float]]
ROPE_KINDS: dict[str, RopeKind] = {}


def register_rope(name: str) -> Callable[[RopeKind], RopeKind]:
    """Register a frequency scaling under ``name`` (the checkpoint's ``rope_type``)."""

    def add(fn: RopeKind) -> RopeKind:
        ROPE_KINDS[name] = fn
        return fn

    return add


def inv_frequencies(rope: RopeConfig, dims: int, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dims/2]`` (float64) and the attention (cos/sin) factor of ``rope``
    for ``dims`` rotated dims."""
    return ROPE_KINDS[rope.kind](rope, dims, max_position)


def _base(rope: RopeConfig, dims: int) -> torch.Tensor:
    return 1.0 / rope.theta ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims)


@register_rope("default")
def _default(rope: RopeConfig, dims: int, max_position: int) -> tuple[torch.Tensor, float]:
    return _base(rope, dims), 1.0


@register_rope("linear")
def _linear(rope: RopeConfig, dims: int, max_position: int) -> tuple[torch.Tensor, float]:
    return _base(rope, dims) / rope.factor, 1.0


@register_rope("dynamic")
def _dynamic(rope: RopeConfig, dims: int, max_position: int) -> tuple[torch.Tensor, float]:
    # NTK-aware scaling, evaluated once at the engine's maximum length (a static table keeps
    # cached keys consistent; HF recomputes it per call and re-rotates nothing either).
    original = rope.original_max_position or max_position
    seq = max(max_position, original)
    if seq <= original:
        return _base(rope, dims), 1.0
    base = rope.theta * ((rope.factor * seq / original) - (rope.factor - 1)) ** (dims / (dims - 2))
    return 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims), 1.0


@register_rope("llama3")
def _llama3(rope: RopeConfig, dims: int, max_position: int) -> tuple[torch.Tensor, float]:
    inv_freq = _base(rope, dims)
    original = rope.original_max_position or max_position
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


@register_rope("yarn")
def _yarn(rope: RopeConfig, dims: int, max_position: int) -> tuple[torch.Tensor, float]:
    original = rope.original_max_position or max_position

    def correction_dim(num_rotations: float) -> float:
        return (dims * math.log(original / (num_rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    pos_freqs = rope.theta ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rope.factor * pos_freqs)
    ramp = ((torch.arange(dims // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
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


@register_rope("longrope")
def _longrope(rope: RopeConfig, dims: int, max_position: int) -> tuple[torch.Tensor, float]:
    # Phi-3's LongRoPE: per-frequency divisors, the long set past the pre-training context.
    # transformers picks the set per forward from the current length; a static table is built
    # once for the engine's maximum length (as dynamic NTK is), so the long set is used when that
    # length passes the original context, and cached keys and new queries always agree.
    original = rope.original_max_position or max_position
    ext = rope.long_factor if max_position > original else rope.short_factor
    if len(ext) != dims // 2:
        raise ConfigError(
            f"longrope needs {dims // 2} short and long factors (one per rotary frequency), "
            f"got {len(rope.short_factor)} and {len(rope.long_factor)}"
        )
    inv_freq = _base(rope, dims) / torch.tensor(ext, dtype=torch.float64)
    factor = rope.attention_factor
    if factor is None:  # the paper's scaling for the extended context
        factor = 1.0
        if rope.factor > 1:
            factor = math.sqrt(1 + math.log(rope.factor) / math.log(original))
    return inv_freq, float(factor)


def rope_tables(
    rope: RopeConfig,
    head_dim: int,
    max_position: int,
    style: str = "neox",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RopeTables:
    """cos/sin ``[max_position, Dr/2]`` for the rotary dims of ``head_dim`` (computed in float64,
    stored in ``dtype``)."""
    dims = rope.rotary_dims(head_dim)
    inv_freq, factor = inv_frequencies(rope, dims, max_position)
    positions = torch.arange(max_position, dtype=torch.float64)
    freqs = torch.outer(positions, inv_freq)  # [P, Dr/2]
    cos = (freqs.cos() * factor).to(device=device, dtype=dtype)
    sin = (freqs.sin() * factor).to(device=device, dtype=dtype)
    return RopeTables(cos, sin, style)
