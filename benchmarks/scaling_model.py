"""The paper model of docs/scaling.md: memory per GPU and decode-step arithmetic for tensor
parallelism (Llama-3.1-70B, TP=8) and replicas (Llama-3.1-8B, one engine per GPU).

Nothing here runs a model: byte counts come from the architectures' shapes (``bench/models.py``)
and ShadowKV's own sizing code (``cache.group_cost``, ``shadow_sizing``); the hardware figures
are the constants below (vendor specifications, not measurements). Prints one markdown table
per case; ``docs/scaling.md`` quotes them.

    python benchmarks/scaling_model.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shadowkv.bench.models import arch_config
from shadowkv.cache import group_cost
from shadowkv.cache.layout import KVLayout
from shadowkv.cache.methods import ShadowKVConfig
from shadowkv.cache.shadow_layout import PAGE_CHUNKS, cdiv
from shadowkv.cache.shadow_sizing import reference_layout, size_shadowkv
from shadowkv.config import ModelConfig
from shadowkv.models.llama import LlamaModel, attention_spec

GIB = 2**30
# NVIDIA H200 SXM (spec sheet): 141 GB HBM3e (139 GiB as torch reports it on the lent H200),
# 4.8 TB/s HBM, NVLink 900 GB/s per GPU (both directions: 450 GB/s each way), PCIe Gen5 x16
# (64 GB/s each way). An 8-GPU HGX node: 2 TB host RAM (DGX H200 spec sheet).
GPU_BYTES = 139 * GIB
HBM_BPS = 4.8e12
NVLINK_BPS = 450e9  # one direction: what a ring all-reduce's sends are bound by
PCIE_BPS = 64e9
NODE_HOST_BYTES = 2 * 10**12
GPUS_PER_NODE = 8
CACHE_SHARE = 0.85  # EngineConfig.cache_memory_gb default: 85 % of free GPU memory
HOST_SHARE = 0.5  # shadow_sizing.CUDA_HOST_SHARE: the auto host tier's share of free RAM
ALLREDUCE_LATENCY_S = 10e-6  # a small NCCL all-reduce on NVLink, order of magnitude (assumed)
CONTEXT = 122880  # 120 Ki tokens: the paper's "122K"
NEW_TOKENS = 512  # shadow_sizing.REFERENCE_NEW_TOKENS


@dataclass(frozen=True)
class Case:
    arch: str
    tp: int


def param_bytes(cfg: ModelConfig, tp: int, elem: int = 2) -> tuple[int, int]:
    """(sharded, replicated) weight bytes per GPU: decoder projections split over ``tp`` ranks;
    embeddings, LM head and norms on every rank."""
    with torch.device("meta"):
        model = LlamaModel(cfg)
    sharded = replicated = 0
    for name, p in model.named_parameters():  # tied weights are yielded once
        n = p.numel() * elem
        if "proj" in name:
            sharded += n // tp
        else:
            replicated += n
    return sharded, replicated


def rank_layout(cfg: ModelConfig, tp: int) -> KVLayout:
    spec = attention_spec(cfg)
    return KVLayout(
        type(spec)(**{**spec.__dict__, "num_heads": spec.num_heads // tp,
                      "num_kv_heads": spec.num_kv_heads // tp}),
        cfg.num_layers, torch.bfloat16,
    )


def report(case: Case) -> None:
    cfg = arch_config(case.arch)
    tp = case.tp
    sharded, replicated = param_bytes(cfg, tp)
    weights = sharded + replicated
    budget = int((GPU_BYTES - weights) * CACHE_SHARE)
    layout = rank_layout(cfg, tp)
    dense_seq = layout.dense_bytes(CONTEXT)
    scfg = ShadowKVConfig(host_memory_gb=NODE_HOST_BYTES * HOST_SHARE / GPUS_PER_NODE / GIB,
                          device_value_memory_gb=0.0)
    cuda = torch.device("cuda")  # sizing reads only the device type
    ref = reference_layout(scfg, CONTEXT)
    sz = size_shadowkv(scfg, layout, cuda, 1, CONTEXT, budget)
    host_seq = cdiv(ref.num_chunks, PAGE_CHUNKS) * sz.values.page_bytes
    host_tier = int(scfg.host_memory_gb * GIB)

    def shadow_batch() -> tuple[int, int, int]:
        n = 1
        while True:
            fixed, per = group_cost(scfg, layout, cuda, n + 1, CONTEXT, budget)
            if fixed + (n + 1) * per > budget or (n + 1) * host_seq > host_tier:
                fixed, per = group_cost(scfg, layout, cuda, n, CONTEXT, budget)
                return n, fixed, per
            n += 1

    batch, fixed, per_seq = shadow_batch()
    dense_batch = budget // dense_seq
    print(f"## {case.arch}, TP={tp}, context {CONTEXT}, bf16 (per GPU)\n")
    rows = [
        ("weights: sharded projections", sharded),
        ("weights: replicated embeddings + LM head + norms", replicated),
        ("KV cache budget (85% of what the weights leave)", budget),
        ("dense K+V per sequence", dense_seq),
        (f"ShadowKV device per sequence (rank {sz.rank})", per_seq),
        ("ShadowKV device fixed (slots, scratch, staging)", fixed),
        ("ShadowKV host values per sequence", host_seq),
        ("host tier (auto share of node RAM / GPUs)", host_tier),
    ]
    for what, b in rows:
        print(f"| {what} | {b / GIB:.2f} GiB |")
    bound = "host tier" if (batch + 1) * host_seq > host_tier else "device budget"
    print(f"| dense max batch | {dense_batch} |")
    print(f"| ShadowKV max batch | {batch} (bound by the {bound}) |")
    # Decode step, memory-bound: every GPU reads its weights once and each sequence's KV.
    # Tokens attended per step: the sparse budget (values fetched from the host tier) plus the
    # exact outlier and local chunks (on the device); K and V of each, model dtype.
    selected = scfg.budget_tokens(ref.prompt_len)
    exact = (scfg.local_chunks + scfg.outlier_chunks) * scfg.chunk_size
    token_kv = 2 * layout.num_layers * layout.kv_dim * layout.elem_size  # K and V, all layers
    dense_step = (weights + dense_batch * dense_seq) / HBM_BPS
    shadow_hbm = (weights + batch * (selected + exact) * token_kv) / HBM_BPS
    fetch = batch * selected * token_kv / 2 / PCIE_BPS  # the selected values, no cache hits
    print(f"| dense step (HBM roofline, batch {dense_batch}) | {dense_step * 1e3:.1f} ms |")
    print(f"| ShadowKV step, HBM part (batch {batch}) | {shadow_hbm * 1e3:.1f} ms |")
    print(f"| ShadowKV value fetch over PCIe, 0% hits | {fetch * 1e3:.1f} ms |")
    hit = 0.7  # the bench's driven hit rate (cache/shadow_drive.py), a real model's order
    shadow_step = max(shadow_hbm, fetch * (1 - hit))
    print(f"| dense decode tok/s per {tp} GPU(s), roofline | {dense_batch / dense_step:.0f} |")
    print(f"| ShadowKV decode tok/s per {tp} GPU(s), {hit:.0%} hits, fetch-bound | "
          f"{batch / shadow_step:.0f} |")
    if tp > 1:
        for b, step in ((dense_batch, dense_step), (batch, shadow_step)):
            msg = b * cfg.hidden_size * 2
            per_ar = 2 * (tp - 1) / tp * msg / NVLINK_BPS + ALLREDUCE_LATENCY_S
            total = 2 * cfg.num_layers * per_ar
            print(f"| all-reduce, batch {b}: {msg / 2**10:.0f} KiB x {2 * cfg.num_layers} | "
                  f"{total * 1e3:.2f} ms = {total / (total + step):.0%} of the step |")
    print()


if __name__ == "__main__":
    for case in (Case("llama-3.1-70b", 8), Case("llama-3.1-8b", 1)):
        report(case)
