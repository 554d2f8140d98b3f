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

# Llama-3.1's 128K context: llama3 RoPE scaling of an 8K-trained model, and its stop tokens.
_LLAMA31_LONG = dict(
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
)

ARCHITECTURES: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(**_LLAMA3_8B, **_LLAMA31_LONG),
    # Llama-3.1-70B(-Instruct): the tensor-parallel case of docs/scaling.md.
    "llama-3.1-70b": ModelConfig(
        **{**_LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_layers": 80,
           "num_heads": 64},
        **_LLAMA31_LONG,
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
    # Phi-3-mini-128k-instruct (and Phi-3.5-mini): MHA, head dim 96, LongRoPE from 4K to 128K.
    # The short/long factor values are stand-ins (timings do not depend on them); the attention
    # factor follows from the 32x context ratio as in the checkpoint.
    "phi-3-mini-128k": ModelConfig(
        architecture="phi3",
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=96,
        rope=RopeConfig(
            theta=10000.0,
            kind="longrope",
            factor=32.0,
            original_max_position=4096,
            short_factor=(1.0,) * 48,
            long_factor=tuple(1.0 + 0.5 * i for i in range(48)),
        ),
        max_position_embeddings=131072,
        bos_token_id=1,
        eos_token_ids=(32000, 32007),
    ),
    # GLM-4-9B-chat (GlmForCausalLM): 2 KV heads, RoPE on half of each head, interleaved.
    "glm-4-9b": ModelConfig(
        architecture="glm",
        vocab_size=151552,
        hidden_size=4096,
        intermediate_size=13696,
        num_layers=40,
        num_heads=32,
        num_kv_heads=2,
        head_dim=128,
        rms_norm_eps=1.5625e-07,
        rope=RopeConfig(theta=10000.0, partial_rotary_factor=0.5),
        rope_style="interleaved",
        max_position_embeddings=131072,
        attention_bias=True,
        eos_token_ids=(151329, 151336, 151338),
    ),
    # Qwen3-8B at its native 32K (40K positions; YaRN to 128K is opt-in), q/k norms.
    "qwen3-8b": ModelConfig(
        architecture="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0),
        max_position_embeddings=40960,
        qk_norm=True,
        eos_token_ids=(151645, 151643),
    ),
    # Gemma-3-12B (text): 40 sliding layers (1024-token window, RoPE base 10K) and 8 global
    # ones (base 1M, linear x8 to 128K); ShadowKV serves the global layers.
    "gemma-3-12b": ModelConfig(
        architecture="gemma3",
        vocab_size=262208,
        hidden_size=3840,
        intermediate_size=15360,
        num_layers=48,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0, kind="linear", factor=8.0),
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_ids=(1, 106),
        sliding_window=1024,
        layer_types=tuple(
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)
        ),
        local_rope=RopeConfig(theta=10000.0),
        qk_norm=True,
        sandwich_norms=True,
        hidden_act="gelu_tanh",
        embed_scale=3840**0.5,
        attn_scale=256**-0.5,
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
