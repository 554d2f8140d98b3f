"""ShadowKV's budget arithmetic, in one place: what each pool's page costs and how many there are.

``size_shadowkv`` turns a config, a KV layout and a device budget into a ``ShadowSizing``: the
rank, the bytes of one factor page, buffer block, value page, per-sequence slot, staging page and
staging Gram slot, the number of factor pages, buffer blocks, staging pages and Gram slots, and
the sizes of the two value tiers. The staging pool (chunked prefill, ``shadow_staging.py``) is
taken off the budget first, like the slot state: it is fixed whatever the batch.
``ShadowKVCache`` only allocates what it says. Settings that cannot work are refused here with a
``ConfigError`` that names the knob to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from shadowkv.cache.layout import KVLayout, elem_size
from shadowkv.cache.methods import ShadowKVConfig
from shadowkv.cache.shadow_layout import PAGE_CHUNKS, SeqLayout, cdiv, plan_sequence
from shadowkv.cache.store import ValueLayout
from shadowkv.config import ConfigError
from shadowkv.kernels.fp8 import CODE_DTYPE, SCALE_DTYPE

REFERENCE_NEW_TOKENS = 512  # generation length the device-pool split plans for
# Share of host RAM the auto-sized host tier may take: CPU runs keep room for the model and the
# activations in the same memory; CUDA runs pin, and pinned pages cannot be swapped.
CPU_HOST_SHARE = 0.25
CUDA_HOST_SHARE = 0.5
SELECTION_ELEM = 4  # bytes per selection-state entry and per landmark chunk id (int32)
# Prompts that stage at once, at most (Gram slots of the staging pool): the engine chunks one
# prompt at a time, so a step's packed forward holds at most the partial prompt's last chunk, a
# new partial prompt's first and one prompt started from a stored prefix (``engine/engine.py``).
STAGED_PROMPTS = 3


def landmark_bytes(cfg: ShadowKVConfig, head_dim: int, elem: int) -> int:
    """Bytes of one landmark of one KV head: ``D`` values, or ``D`` fp8 codes and a scale."""
    fp8 = cfg.landmark_dtype == "fp8"
    return head_dim * elem_size(CODE_DTYPE) + elem_size(SCALE_DTYPE) if fp8 else head_dim * elem


@dataclass(frozen=True)
class StagingSize:
    """The chunked-prefill staging pool (``shadow_staging.py``). Byte counts cover all layers."""

    page_bytes: int  # one page of staged tokens: pre-RoPE keys and values, model dtype
    num_pages: int  # no null page
    gram_bytes: int  # one staged prompt's Gram KᵀK per layer (fp32, fp64 for fp64 keys)
    num_grams: int  # Gram slots: prompts that can stage at once

    @property
    def nbytes(self) -> int:
        """Device bytes of the whole pool."""
        return self.num_pages * self.page_bytes + self.num_grams * self.gram_bytes


@dataclass(frozen=True)
class ShadowSizing:
    """Sizes of every ShadowKV pool. Byte counts cover all layers of the layout."""

    rank: int  # R
    page_tokens: int  # P: tokens per factor page (PAGE_CHUNKS chunks)
    block_rows: int  # S: rows per buffer block
    max_slots: int  # selection slots per KV head: the budget at full context, in chunks
    slot_bytes: int  # per sequence slot: its basis W^T and selection state
    factor_page_bytes: int  # one factor page and the landmarks of its chunks
    block_bytes: int  # one buffer block of exact K and V
    values: ValueLayout  # value pages: dtype, element size, page bytes
    num_factor_pages: int  # page 0 is the null page
    num_blocks: int  # page 0 is the null page; one more block is padding scratch
    host_value_bytes: int
    device_value_bytes: int
    staging: StagingSize  # the chunked-prefill staging pool


def size_shadowkv(
    cfg: ShadowKVConfig,
    layout: KVLayout,
    device: torch.device,
    max_num_seqs: int,
    max_model_len: int,
    memory_bytes: int,
) -> ShadowSizing:
    """Split ``memory_bytes`` of device budget among ShadowKV's pools."""
    L, Hkv, D, C = layout.num_layers, layout.num_kv_heads, layout.head_dim, cfg.chunk_size
    elem, kv_dim = layout.elem_size, layout.kv_dim
    R = cfg.rank_for(kv_dim)
    check_engages(cfg, max_model_len)
    P, S = PAGE_CHUNKS * C, cfg.page_size
    max_slots = cfg.budget_tokens(max_model_len) // C
    slot_bytes = L * (R * kv_dim * elem + Hkv * max_slots * SELECTION_ELEM)
    lm_bytes = landmark_bytes(cfg, D, elem)
    factor_page_bytes = L * (P * R * elem + PAGE_CHUNKS * Hkv * (lm_bytes + SELECTION_ELEM))
    block_bytes = L * 2 * S * kv_dim * elem
    staging = size_staging(cfg, layout, P, max_model_len)
    # Per-sequence factors and selection state for every slot plus the padding row of
    # fixed-shape steps, one scratch buffer block that padding entries write to, and the
    # staging pool.
    slots = (max_num_seqs + 1) * slot_bytes
    fixed = slots + block_bytes + staging.nbytes
    least = 2 * (factor_page_bytes + block_bytes)
    if memory_bytes < fixed + least:
        raise ConfigError(
            f"a device budget of {memory_bytes / 2**20:.1f} MiB cannot hold ShadowKV state for "
            f"max_num_seqs={max_num_seqs} ({slots / 2**20:.1f} MiB of per-sequence factors) and "
            f"{staging.num_pages * P} tokens of chunked-prefill staging "
            f"({staging.nbytes / 2**20:.1f} MiB); raise EngineConfig.cache_memory_gb, or lower "
            "max_num_seqs or staging_tokens"
        )
    ref = reference_layout(cfg, max_model_len)
    values = ValueLayout(L, Hkv, D, C, PAGE_CHUNKS, layout.dtype, cfg.value_dtype == "fp8")
    seq_device = (
        cdiv(ref.prompt_len, P) * factor_page_bytes + cdiv(ref.buffer_rows, S) * block_bytes
    )
    host, device_value = _value_tier_bytes(
        cfg, values, ref, seq_device, device, max_num_seqs, max_model_len,
        memory_bytes - fixed - least,
    )
    if memory_bytes - fixed - device_value < least:
        raise ConfigError(
            f"device_value_memory_gb={cfg.device_value_memory_gb} leaves less than "
            f"{least / 2**20:.2f} MiB of the {memory_bytes / 2**30:.3f} GiB device budget for "
            "ShadowKV's keys and buffers; lower it or raise EngineConfig.cache_memory_gb"
        )
    num_pages, num_blocks = split_device_pages(
        memory_bytes - fixed - device_value, factor_page_bytes, block_bytes, P, S, ref
    )
    return ShadowSizing(
        rank=R,
        page_tokens=P,
        block_rows=S,
        max_slots=max_slots,
        slot_bytes=slot_bytes,
        factor_page_bytes=factor_page_bytes,
        block_bytes=block_bytes,
        values=values,
        num_factor_pages=num_pages,
        num_blocks=num_blocks,
        host_value_bytes=host,
        device_value_bytes=device_value,
        staging=staging,
    )


def size_staging(
    cfg: ShadowKVConfig, layout: KVLayout, page_tokens: int, max_model_len: int
) -> StagingSize:
    """The chunked-prefill staging pool: pages of ``page_tokens`` staged tokens (pre-RoPE keys
    and values of every layer) for ``cfg.staging_tokens`` tokens (``None``: one
    ``max_model_len`` prompt), and a Gram slot for each of at most ``STAGED_PROMPTS`` prompts
    (one prompt needs a page at least)."""
    L, kv_dim = layout.num_layers, layout.kv_dim
    tokens = max_model_len if cfg.staging_tokens is None else cfg.staging_tokens
    num_pages = cdiv(tokens, page_tokens)
    gram_elem = elem_size(torch.promote_types(layout.dtype, torch.float32))
    return StagingSize(
        page_bytes=L * page_tokens * 2 * kv_dim * layout.elem_size,
        num_pages=num_pages,
        gram_bytes=L * kv_dim * kv_dim * gram_elem,
        num_grams=min(STAGED_PROMPTS, num_pages),
    )


def _value_tier_bytes(
    cfg: ShadowKVConfig,
    values: ValueLayout,
    ref: SeqLayout,
    seq_device: int,
    device: torch.device,
    max_num_seqs: int,
    max_model_len: int,
    spare: int,
) -> tuple[int, int]:
    """(host, device) bytes of the value tiers; ``spare`` is the device budget the factor and
    buffer pools need not keep, ``seq_device`` what one reference sequence costs them. The auto
    sizes are documented on ``ShadowKVConfig``."""
    page = values.page_bytes
    if not cfg.offload_values:
        host = 0
    elif cfg.host_memory_gb is not None:
        host = int(cfg.host_memory_gb * 2**30)
    else:
        max_pages = cdiv(cdiv(max_model_len, cfg.chunk_size), PAGE_CHUNKS)
        host = auto_host_bytes((max_num_seqs * max_pages + 1) * page, device)
    if cfg.device_value_memory_gb is not None:
        return host, int(cfg.device_value_memory_gb * 2**30)
    if cfg.offload_values and device.type != "cuda":
        return host, 0
    ref_pages = cdiv(ref.num_chunks, PAGE_CHUNKS)
    host_seqs = max(0, host // page - 1) // ref_pages  # page 0 of a tier is the null page
    extra = device_tier_seqs(spare, seq_device, ref_pages * page, host_seqs, max_num_seqs)
    return host, (extra * ref_pages + 1) * page if extra else 0


def available_host_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * 2**30


def auto_host_bytes(need: int, device: torch.device) -> int:
    """The host tier size when ``host_memory_gb`` is None: the need, capped by a share of RAM."""
    share = CUDA_HOST_SHARE if device.type == "cuda" else CPU_HOST_SHARE
    return min(need, int(available_host_bytes() * share))


def device_tier_seqs(
    spare_bytes: int, seq_device_bytes: int, seq_value_bytes: int, host_seqs: int, max_seqs: int
) -> int:
    """How many reference sequences an auto-sized device tier holds.

    Of ``spare_bytes`` of device budget, a host-tier sequence takes ``seq_device_bytes`` (factors
    and buffers) and a device-tier one that plus ``seq_value_bytes``. The host tier fills first
    (up to ``host_seqs``); the device tier takes as many more as the rest of the budget holds at
    the higher cost, up to ``max_seqs`` sequences in all. Zero when the device budget, not the
    host tier, limits the batch.
    """
    on_host = min(host_seqs, max_seqs, spare_bytes // seq_device_bytes)
    left = spare_bytes - on_host * seq_device_bytes
    return max(0, min(max_seqs - on_host, left // (seq_device_bytes + seq_value_bytes)))


def split_device_pages(
    budget_bytes: int,
    prompt_page_bytes: int,
    block_bytes: int,
    prompt_page_tokens: int,
    block_rows: int,
    reference: SeqLayout,
) -> tuple[int, int]:
    """Split a device budget between factor/landmark pages and buffer blocks.

    The two pools grow differently (factors with the prompt, buffers with budget + generation),
    so the split follows what a ``reference`` sequence needs of each; both get at least 2 pages.
    """
    prompt_need = cdiv(reference.prompt_len, prompt_page_tokens) * prompt_page_bytes
    block_need = cdiv(reference.buffer_rows, block_rows) * block_bytes
    share = prompt_need / max(1, prompt_need + block_need)
    num_prompt = int(budget_bytes * share) // prompt_page_bytes
    num_blocks = (budget_bytes - num_prompt * prompt_page_bytes) // block_bytes
    return max(2, num_prompt), max(2, num_blocks)


def reference_layout(cfg: ShadowKVConfig, max_model_len: int) -> SeqLayout:
    """The sequence the device-pool split is sized for: a full context less a typical answer."""
    new = min(REFERENCE_NEW_TOKENS, max_model_len // 4)
    lay = plan_sequence(cfg, max_model_len - new, new)
    return lay if not lay.dense else plan_sequence(cfg, max_model_len - 1, 1)


def check_engages(cfg: ShadowKVConfig, max_model_len: int) -> None:
    """Refuse settings under which every prompt would fall back to dense attention."""
    if plan_sequence(cfg, max_model_len - 1, 1).dense:
        budget = cfg.budget_tokens(max_model_len - 1)
        need = (cfg.local_chunks + cfg.outlier_chunks) * cfg.chunk_size + budget
        raise ConfigError(
            f"ShadowKV needs prompts of at least {need} tokens (local_chunks={cfg.local_chunks} + "
            f"outlier_chunks={cfg.outlier_chunks} chunks of {cfg.chunk_size} + a {budget}-token "
            f"sparse_budget) but max_model_len is {max_model_len}, so every prompt would run "
            "dense; lower sparse_budget or outlier_chunks, or raise max_model_len"
        )
