"""A loaded ``LlamaModel`` turned into tensor-parallel rank r of N, in place.

Per decoder layer (Megatron-style, one all-reduce after attention and one after the MLP):

- ``qkv_proj`` column-parallel: rank r keeps query heads ``[r H/N, (r+1) H/N)`` and KV heads
  ``[r Hkv/N, (r+1) Hkv/N)`` (their weight and bias rows). With contiguous blocks, query head
  ``h`` still reads KV head ``h // G`` of the same rank, so attention needs no other rank, and
  the layer's ``AttentionSpec`` becomes ``H/N`` and ``Hkv/N`` heads: ``make_cache`` then builds
  this rank's cache for its own KV heads (``KVLayout`` of ``Hkv/N``).
- ``o_proj`` row-parallel over those heads' columns, then an all-reduce (bias added once).
- ``gate_up_proj`` column-parallel: rank r's ``1/N`` of the gate rows and the same of the up rows
  (so ``silu_mul`` still splits it in halves); ``down_proj`` row-parallel, then an all-reduce.
- Embeddings, norms and the LM head stay whole on every rank: the input needs no gather, and
  every rank has the full logits, so rank 0's sampling needs nothing from the others. That costs
  ``2 x vocab x hidden`` weights per rank (3.9 GiB for Llama-3.1-70B, docs/scaling.md);
  vocab-parallel embeddings and head (an all-reduce of the lookup, a gather or distributed
  argmax of the logits) are the later option.

The model's other code is untouched: ``Attention`` reads its head counts and projections from
its attributes, which are all this replaces. TP=1 returns the model as it is.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from shadowkv.config import ConfigError, ModelConfig
from shadowkv.distributed.group import TPGroup
from shadowkv.distributed.layers import RowParallelLinear, block_rows, column_linear, row_linear
from shadowkv.models.llama import MLP, Attention, LlamaModel


class TPShapeError(ConfigError):
    """The model's heads or MLP do not split evenly over the tensor-parallel ranks."""


def check_divisible(cfg: ModelConfig, world: int) -> None:
    """Refuse a world size that does not divide the heads, KV heads and MLP width."""
    sizes = {
        "num_heads (query heads)": cfg.num_heads,
        "num_kv_heads (KV heads)": cfg.num_kv_heads,
        "intermediate_size (MLP width)": cfg.intermediate_size,
    }
    bad = [f"{name}={n}" for name, n in sizes.items() if n % world]
    if bad:
        fits = [n for n in range(1, cfg.num_kv_heads + 1)
                if all(v % n == 0 for v in sizes.values())]
        raise TPShapeError(
            f"tensor_parallel={world} does not divide {', '.join(bad)} of this "
            f"{cfg.architecture} model; each rank must own whole heads and equal MLP columns: "
            f"use one of {fits}"
        )


def shard_model(model: LlamaModel, tp: TPGroup) -> LlamaModel:
    """``model`` (full weights, on this rank's device) as rank ``tp.rank`` of ``tp.world``."""
    if tp.world == 1:
        return model
    if any(isinstance(layer.self_attn.o_proj, RowParallelLinear) for layer in model.layers):
        raise ValueError("the model is already sharded; shard a freshly loaded model")
    check_divisible(model.cfg, tp.world)
    for layer in model.layers:
        _shard_attention(layer.self_attn, tp)
        _shard_mlp(layer.mlp, model.cfg.intermediate_size, tp)
    return model


def _shard_attention(attn: Attention, tp: TPGroup) -> None:
    H, Hkv, D, N, r = attn.H, attn.Hkv, attn.D, tp.world, tp.rank
    # qkv_proj rows: [q: H*D | k: Hkv*D | v: Hkv*D]; this rank's heads of each, in that order.
    q = block_rows(0, H * D, r, N)
    k = block_rows(H * D, Hkv * D, r, N)
    v = block_rows((H + Hkv) * D, Hkv * D, r, N)
    attn.qkv_proj = column_linear(attn.qkv_proj, torch.cat([q, k, v]))
    attn.o_proj = row_linear(attn.o_proj, q, tp.group)  # o_proj's input columns are q's heads
    attn.H, attn.Hkv = H // N, Hkv // N
    attn.spec = replace(attn.spec, num_heads=H // N, num_kv_heads=Hkv // N)


def _shard_mlp(mlp: MLP, intermediate: int, tp: TPGroup) -> None:
    # gate_up_proj rows: [gate: I | up: I]; silu_mul splits its output in halves.
    gate = block_rows(0, intermediate, tp.rank, tp.world)
    up = block_rows(intermediate, intermediate, tp.rank, tp.world)
    mlp.gate_up_proj = column_linear(mlp.gate_up_proj, torch.cat([gate, up]))
    mlp.down_proj = row_linear(mlp.down_proj, gate, tp.group)  # down's input columns: gate's
