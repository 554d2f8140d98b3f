"""Checkpoint tensor names onto ``LlamaModel``'s, per family.

Our decoder fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (Phi-3 and GLM ship
them fused already). Names of the norms differ by family: GLM-4 and Gemma-3 norm each sublayer's
output too (``attn_out_norm``, ``mlp_out_norm``), and Gemma's RMSNorms scale by ``1 + weight``,
which is folded into the weight here so one norm op serves every family.
"""

from __future__ import annotations

import torch

from shadowkv.config import ModelConfig
from shadowkv.models.loader import ModelLoadError

# Our norm name -> the checkpoint's, per family with sandwich norms (others: input_layernorm and
# post_attention_layernorm, the norm before the MLP).
SANDWICH_NORMS = {
    "glm4": {
        "input_layernorm": "input_layernorm",
        "attn_out_norm": "post_self_attn_layernorm",
        "post_attention_layernorm": "post_attention_layernorm",
        "mlp_out_norm": "post_mlp_layernorm",
    },
    "gemma3": {
        "input_layernorm": "input_layernorm",
        "attn_out_norm": "post_attention_layernorm",
        "post_attention_layernorm": "pre_feedforward_layernorm",
        "mlp_out_norm": "post_feedforward_layernorm",
    },
}
PLAIN_NORMS = {n: n for n in ("input_layernorm", "post_attention_layernorm")}
OFFSET_NORMS = ("gemma3",)  # families whose RMSNorm multiplies by (1 + weight)


def to_our_names(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map HF names onto ``LlamaModel``'s, fusing q/k/v and gate/up where the checkpoint does
    not."""
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ModelLoadError(
                f"checkpoint lacks tensor {name!r}; "
                f"is it a complete {cfg.architecture} checkpoint?"
            )
        return state[name]

    def fused(prefix: str, name: str, parts: tuple[str, ...], kind: str) -> torch.Tensor:
        if f"{prefix}{name}.{kind}" in state:
            return state[f"{prefix}{name}.{kind}"]
        return torch.cat([take(f"{prefix}{p}.{kind}") for p in parts])

    offset = cfg.architecture in OFFSET_NORMS

    def norm(name: str) -> torch.Tensor:
        w = take(name)
        return w + 1 if offset else w  # fp32 checkpoints: exactly HF's (1.0 + w.float())

    out["embed_tokens.weight"] = take("model.embed_tokens.weight")
    out["norm.weight"] = norm("model.norm.weight")
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    norms = SANDWICH_NORMS[cfg.architecture] if cfg.sandwich_norms else PLAIN_NORMS
    qkv = ("q_proj", "k_proj", "v_proj")
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        attn = p + "self_attn."
        for kind in ("weight", "bias") if cfg.attention_bias else ("weight",):
            out[o + f"self_attn.qkv_proj.{kind}"] = fused(attn, "qkv_proj", qkv, kind)
        out[o + "self_attn.o_proj.weight"] = take(attn + "o_proj.weight")
        if cfg.output_bias:
            out[o + "self_attn.o_proj.bias"] = take(attn + "o_proj.bias")
        if cfg.qk_norm:
            out[o + "self_attn.q_norm.weight"] = norm(attn + "q_norm.weight")
            out[o + "self_attn.k_norm.weight"] = norm(attn + "k_norm.weight")
        for kind in ("weight", "bias") if cfg.mlp_bias else ("weight",):
            out[o + f"mlp.gate_up_proj.{kind}"] = fused(
                p + "mlp.", "gate_up_proj", ("gate_proj", "up_proj"), kind
            )
            out[o + f"mlp.down_proj.{kind}"] = take(p + f"mlp.down_proj.{kind}")
        for ours, theirs in norms.items():
            out[o + f"{ours}.weight"] = norm(p + f"{theirs}.weight")
    return out
