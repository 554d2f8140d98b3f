"""One decoder for the Llama family (Llama 2/3/3.1/3.2, Qwen2/2.5 with QKV bias, Mistral).

Tokens are packed along one dimension (``T`` = prompt tokens in prefill, ``B`` = one token per
sequence in decode); attention goes through the cache, which owns all per-sequence state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from shadowkv.cache.base import AttentionCache
from shadowkv.config import ModelConfig
from shadowkv.models.rope import RotaryEmbedding

Phase = Literal["prefill", "decode"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.H, self.Hkv, self.D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k, v fused into one GEMM; the split sizes are the three output widths.
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.H + 2 * self.Hkv) * self.D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.H * self.D, cfg.hidden_size, bias=cfg.output_bias)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
        cache: AttentionCache, phase: Phase,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.H * self.D, self.Hkv * self.D, self.Hkv * self.D], -1)
        q = q.view(T, self.H, self.D)
        k_pre = k.view(T, self.Hkv, self.D)  # pre-RoPE, bias included: what ShadowKV factorises
        v = v.view(T, self.Hkv, self.D)
        q = rope.apply(q, positions)
        k = rope.apply(k_pre, positions)
        attend = cache.prefill if phase == "prefill" else cache.decode
        out = attend(self.layer, q, k, v, k_pre)  # [T, H, D]
        return self.o_proj(out.reshape(T, self.H * self.D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
        cache: AttentionCache, phase: Phase, mlp_chunk: int,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, cache, phase)
        if x.shape[0] <= mlp_chunk:
            return x + self.mlp(self.post_attention_layernorm(x))
        # Long prompts: the MLP's [T, 2 * intermediate] activation dominates peak memory, so run
        # it in slices, writing back in place.
        for s in range(0, x.shape[0], mlp_chunk):
            part = x[s : s + mlp_chunk]
            part += self.mlp(self.post_attention_layernorm(part))
        return x


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        cache: AttentionCache,
        phase: Phase,
        logits_index: torch.Tensor | None = None,
        mlp_chunk: int = 4096,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Logits ``[N, vocab]`` (fp32) for the tokens at ``logits_index`` (default: all)."""
        x = self.embed(input_ids)
        x = self.run_layers(x, positions, rope, cache, phase, 0, len(self.layers), mlp_chunk, progress)
        return self.logits(x, logits_index)

    # The engine drives a long prefill through these three in slices of layers, so decode steps
    # of running sequences can run between the slices.
    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    @torch.inference_mode()
    def run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        cache: AttentionCache,
        phase: Phase,
        start: int,
        stop: int,
        mlp_chunk: int = 4096,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after layers ``[start, stop)``."""
        for i in range(start, stop):
            x = self.layers[i](x, positions, rope, cache, phase, mlp_chunk)
            if progress is not None:
                progress(i + 1, len(self.layers))
        return x

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if index is not None:
            x = x[index]
        return self.lm_head(self.norm(x)).float()
