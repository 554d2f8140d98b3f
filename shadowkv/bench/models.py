"""Named model architectures with random weights, for throughput runs without a checkpoint.

Speed depends on shapes, not on weight values, so a real architecture's config with random
weights gives honest timings while its outputs are meaningless; every report says "random
weights". ``tiny`` is a few-layer config for CPU tests.
"""

from __future__ import annotations

from typing import Any

import torch

from shadowkv.config import ConfigError, ModelConfig, RopeConfig
from shadowkv.models.llama import LlamaModel

RANDOM_WEIGHTS = "random weights"

_LLAMA3_8B: dict[str, Any] = {
    "architecture": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_layers": 32,
    "num_heads": 32,
    "num_kv_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 128000,
}

ARCHITECTURES: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        **_LLAMA3_8B,
        rope=RopeConfig(
            theta=500000.0,
            kind="llama3",
            factor=8.0,
            original_max_position=8192,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
        ),
        max_position_embeddings=131072,
        eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-3-8b": ModelConfig(
        **_LLAMA3_8B,
        rope=RopeConfig(theta=500000.0),
        max_position_embeddings=8192,
        eos_token_ids=(128001,),
    ),
    # Qwen2.5-7B-Instruct at its native 32K context (YaRN to 128K is opt-in there too).
    "qwen2.5-7b": ModelConfig(
        architecture="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0),
        max_position_embeddings=32768,
        attention_bias=True,
        eos_token_ids=(151645, 151643),
    ),
    "tiny": ModelConfig(
        architecture="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope=RopeConfig(theta=10000.0),
        max_position_embeddings=16384,
    ),
}


def arch_config(name: str) -> ModelConfig:
    """The ``ModelConfig`` of a named architecture."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)} "
            "or pass a checkpoint with --model"
        ) from None


def random_model(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0, std: float = 0.02
) -> LlamaModel:
    """A ``LlamaModel`` of ``cfg`` with N(0, std) weights made directly on ``device`` in ``dtype``.

    Built on the meta device first, so an 8B model never exists in fp32 or on the wrong device.
    """
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, tied tensors counted once."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())
