"""``gather_values``: values of missed chunks from one value-store tier into the buffer.

The store is one layer of either tier: host memory (pinned on CUDA, read zero-copy by the
kernel) or the compute device's own memory (read like any device tensor). It keeps its own dtype
(the value store's ``ValueLayout``); values are converted to the buffer's dtype as they land, so
what crosses PCIe is the store's bytes. An fp8 store holds ``uint8`` e4m3 codes and comes with
its scales (one float32 per token and KV head), applied on the device. Arguments are checked for
their layout (rows of whole chunks of ``D``, one KV-head axis), not for equal dtypes.
"""

from __future__ import annotations

import torch

from shadowkv.kernels._dispatch import use_triton
from shadowkv.kernels.gather_values.reference import gather_values as gather_values_ref

__all__ = ["gather_values", "gather_values_ref"]


def gather_values(
    v_cache: torch.Tensor,
    store: torch.Tensor,
    store_table: torch.Tensor,
    slot_ids: torch.Tensor,
    miss: torch.Tensor,
    dst_rows: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> None:
    """Fill missed slots' values in place; see ``reference.gather_values``."""
    if v_cache.dim() != 4 or store.dim() != 4 or slot_ids.dim() != 3:
        raise ValueError(
            "gather_values wants v_cache [blocks, S, Hkv, D], store [pages, Pc, Hkv, C*D] and "
            f"slot_ids [B, Hkv, K], got {tuple(v_cache.shape)}, {tuple(store.shape)}, "
            f"{tuple(slot_ids.shape)}"
        )
    B, Hkv, K = slot_ids.shape
    D = v_cache.shape[3]
    if v_cache.shape[2] != Hkv or store.shape[2] != Hkv or store.shape[3] % D:
        raise ValueError(
            f"store {tuple(store.shape)} and v_cache {tuple(v_cache.shape)} must share Hkv={Hkv} "
            f"and the store rows must hold whole chunks of D={D}"
        )
    C = store.shape[3] // D
    if miss.shape != slot_ids.shape or dst_rows.shape != (B, K * C):
        raise ValueError(
            f"miss must match slot_ids {tuple(slot_ids.shape)} and dst_rows must be "
            f"[B, K*C] = [{B}, {K * C}], got {tuple(dst_rows.shape)}"
        )
    if store.device not in (v_cache.device, torch.device("cpu")):
        raise ValueError(
            f"the store must be in host memory or on v_cache's device {v_cache.device}, "
            f"not {store.device}"
        )
    if scales is None and not store.is_floating_point():
        raise ValueError(
            f"the store holds {store.dtype}; gather_values reads floating-point values, or fp8 "
            "codes (uint8) with their scales"
        )
    if scales is not None and (
        store.dtype != torch.uint8
        or scales.dtype != torch.float32
        or scales.shape != (*store.shape[:3], C)
        or scales.device != store.device
    ):
        raise ValueError(
            f"an fp8 store is uint8 codes [pages, Pc, Hkv, C*D] with float32 scales "
            f"[pages, Pc, Hkv, C] beside it, got {store.dtype} {tuple(store.shape)} and "
            f"{None if scales is None else (scales.dtype, tuple(scales.shape))}"
        )
    args = (v_cache, store, store_table, slot_ids, miss, dst_rows, scales)
    if use_triton(v_cache, "gather_values"):
        from shadowkv.kernels.gather_values.triton import gather_values as impl

        impl(*args)
        return
    gather_values_ref(*args)
