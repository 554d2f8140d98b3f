"""One decoder for the Llama family and its relatives: Llama 2/3/3.1/3.2, Qwen2/2.5 (QKV bias),
Mistral, Phi-3 (LongRoPE), GLM-4 (partial interleaved RoPE, sandwich norms in Glm4), Qwen3 (q/k
norms) and Gemma-3 text (q/k norms, sandwich norms, tanh GELU, scaled embeddings, sliding and
global layers with their own RoPE bases). What differs is read from ``ModelConfig``.

Tokens are packed along one dimension (``T`` = prompt tokens in prefill, ``B`` = one token per
sequence in decode); attention goes through the cache, which owns all per-sequence state. The
model tells the caches what its attention is (``attention_specs``) and builds one
``ForwardContext`` per step (``context``), which every layer reads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from shadowkv.cache.base import AttentionCache
from shadowkv.cache.layout import AttentionSpec
from shadowkv.config import ModelConfig
from shadowkv.kernels.rms_norm import rms_norm
from shadowkv.kernels.rope import apply_rope
from shadowkv.kernels.rope.tables import RopeTables
from shadowkv.kernels.silu_mul import silu_mul
from shadowkv.models.context import ForwardContext, Phase
from shadowkv.models.rope import rope_tables

# Between layers the model carries (x, residual): x the last sublayer's output, residual the sum
# of everything before it (None before the first layer). Each norm adds the two as it normalises
# (one fused op, ``kernels.rms_norm``), so the residual adds cost no launch of their own.
Hidden = tuple[torch.Tensor, torch.Tensor | None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``; without a residual, ``(norm(x), x)``."""
        return rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.spec = attention_spec(cfg, layer)
        self.H, self.Hkv, self.D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # Qwen3 / Gemma-3: RMSNorm over each head's dims before RoPE (so the pre-RoPE keys
        # ShadowKV factorises are the normed ones).
        self.q_norm = RMSNorm(self.D, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.D, cfg.rms_norm_eps) if cfg.qk_norm else None
        # q, k, v fused into one GEMM; the split sizes are the three output widths.
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, (self.H + 2 * self.Hkv) * self.D, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.H * self.D, cfg.hidden_size, bias=cfg.output_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = x.shape[0]
        widths = [self.H * self.D, self.Hkv * self.D, self.Hkv * self.D]
        q, k, v = self.qkv_proj(x).split(widths, -1)
        q = q.view(T, self.H, self.D)
        k_pre = k.view(T, self.Hkv, self.D)  # pre-RoPE, bias included: what ShadowKV factorises
        v = v.view(T, self.Hkv, self.D)
        if self.q_norm is not None and self.k_norm is not None:
            q, k_pre = self.q_norm(q)[0], self.k_norm(k_pre)[0]
        k = k_pre
        if self.spec.rotary_dims:
            cos, sin = ctx.rotary(self.spec.rope_key)
            q, k = apply_rope(q, k_pre, cos, sin, self.spec.rope_style)
        attend = ctx.cache.decode if ctx.phase == "decode" else ctx.cache.prefill
        out = attend(self.layer, q, k, v, k_pre)  # [T, H, D]
        return self.o_proj(out.reshape(T, self.H * self.D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = cfg.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "silu":
            return self.down_proj(silu_mul(self.gate_up_proj(x)))  # silu(gate) * up, one launch
        gate, up = self.gate_up_proj(x).chunk(2, -1)  # Gemma: tanh GELU, in PyTorch
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # before MLP
        self.mlp = MLP(cfg)
        # GLM-4 / Gemma-3 also norm each sublayer's output before it joins the residual stream.
        sandwich = cfg.sandwich_norms
        self.attn_out_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if sandwich else None
        self.mlp_out_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if sandwich else None

    def forward(self, hidden: Hidden, ctx: ForwardContext) -> Hidden:
        x, residual = self.input_layernorm(*hidden)
        x = self.self_attn(x, ctx)
        if self.attn_out_norm is not None:
            x = self.attn_out_norm(x)[0]
        x, residual = self.post_attention_layernorm(x, residual)
        mlp_chunk = ctx.mlp_chunk
        if x.shape[0] <= mlp_chunk:
            return self._mlp(x), residual
        # Long prompts: the MLP's [T, 2 * intermediate] activation dominates peak memory, so run
        # it in slices, each slice's output over its (no longer needed) normed input.
        for s in range(0, x.shape[0], mlp_chunk):
            x[s : s + mlp_chunk] = self._mlp(x[s : s + mlp_chunk])
        return x, residual

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return out if self.mlp_out_norm is None else self.mlp_out_norm(out)[0]


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

    def attention_specs(self) -> tuple[AttentionSpec, ...]:
        """Each layer's attention as the caches must serve it (Gemma-3: sliding and global)."""
        return tuple(layer.self_attn.spec for layer in self.layers)

    def rope_tables(
        self, max_position: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> RopeTables:
        """cos/sin for positions ``[0, max_position)`` (computed in fp64, stored in ``dtype``):
        the model's q/k and ShadowKV's key rebuild both read them."""
        cfg = self.cfg
        tables = rope_tables(cfg.rope, cfg.head_dim, max_position, cfg.rope_style, device, dtype)
        if cfg.local_rope is None:
            return tables
        local = rope_tables(
            cfg.local_rope, cfg.head_dim, max_position, cfg.rope_style, device, dtype
        )
        return RopeTables(tables.cos, tables.sin, tables.style, {LOCAL_ROPE: local})

    def context(
        self,
        phase: Phase,
        positions: torch.Tensor,
        rope: RopeTables,
        cache: AttentionCache,
        mlp_chunk: int = 4096,
        progress: Callable[[int, int], None] | None = None,
    ) -> ForwardContext:
        """The step's context: RoPE rows gathered once for every layer."""
        cos, sin = rope.rows(positions)
        others = {key: table.rows(positions) for key, table in rope.others.items()}
        return ForwardContext(phase, positions, cos, sin, cache, mlp_chunk, progress, others)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, ctx: ForwardContext, logits_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[N, vocab]`` (fp32) for the tokens at ``logits_index`` (default: all)."""
        hidden = self.run_layers(self.embed(input_ids), ctx, 0, len(self.layers))
        return self.logits(hidden, logits_index)

    # The engine drives each prefill chunk through these three (embed, every layer, the last
    # position's logits), between the running sequences' decode steps.
    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> Hidden:
        x = self.embed_tokens(input_ids)
        if self.cfg.embed_scale is not None:  # Gemma: the scale rounded to the weights' dtype
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        return x, None

    @torch.inference_mode()
    def run_layers(self, hidden: Hidden, ctx: ForwardContext, start: int, stop: int) -> Hidden:
        """The hidden state (``[T, hidden]`` each) after layers ``[start, stop)``."""
        for i in range(start, stop):
            hidden = self.layers[i](hidden, ctx)
            if ctx.progress is not None:
                ctx.progress(i + 1, len(self.layers))
        return hidden

    @torch.inference_mode()
    def logits(self, hidden: Hidden, index: torch.Tensor | None = None) -> torch.Tensor:
        x, residual = hidden
        if index is not None:
            x = x[index]
            residual = None if residual is None else residual[index]
        logits = self.lm_head(self.norm(x, residual)[0]).float()
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


LOCAL_ROPE = "local"  # RopeTables key of the sliding layers' tables when they differ (Gemma-3)


def attention_spec(cfg: ModelConfig, layer: int = 0) -> AttentionSpec:
    """The attention of layer ``layer``.

    A sliding layer carries its window (``cache.make_cache`` gives such layers a window cache,
    whatever the method) and, when its RoPE differs, the key of its tables.
    """
    sliding = cfg.is_sliding(layer)
    rope = cfg.local_rope if sliding and cfg.local_rope is not None else cfg.rope
    return AttentionSpec(
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        scale=cfg.attn_scale or AttentionSpec.default_scale(cfg.head_dim),
        rotary_dims=rope.rotary_dims(cfg.head_dim),
        rope_style=cfg.rope_style,
        sliding_window=cfg.sliding_window if sliding else None,
        rope_key=LOCAL_ROPE if sliding and cfg.local_rope is not None else "",
    )
