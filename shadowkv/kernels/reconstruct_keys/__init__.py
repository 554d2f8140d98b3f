"""``reconstruct_keys``: low-rank factors -> post-RoPE keys of missed chunks, into the buffer."""

from __future__ import annotations

import torch

from shadowkv.kernels._dispatch import use_triton
from shadowkv.kernels.reconstruct_keys.reference import reconstruct_keys as reconstruct_keys_ref
from shadowkv.kernels.rope.reference import check_style

__all__ = ["reconstruct_keys", "reconstruct_keys_ref"]


def reconstruct_keys(
    k_cache: torch.Tensor,
    a_pages: torch.Tensor,
    page_table: torch.Tensor,
    w_t: torch.Tensor,
    seg_basis: torch.Tensor,
    seg_starts: torch.Tensor,
    slot_ids: torch.Tensor,
    miss: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dst_rows: torch.Tensor,
    chunk_size: int,
    style: str = "neox",
) -> None:
    """Rebuild missed slots' keys in place; see ``reference.reconstruct_keys``."""
    if k_cache.dim() != 4 or a_pages.dim() != 3 or w_t.dim() != 3 or slot_ids.dim() != 3:
        raise ValueError(
            "reconstruct_keys wants k_cache [blocks, S, Hkv, D], a_pages [pages, P, R], "
            "w_t [rows, R, Hkv*D] and slot_ids [B, Hkv, K]"
        )
    B, Hkv, K = slot_ids.shape
    D = k_cache.shape[3]
    if k_cache.shape[2] != Hkv or w_t.shape[1:] != (a_pages.shape[2], Hkv * D):
        raise ValueError(
            f"w_t {tuple(w_t.shape)} must be [rows, R={a_pages.shape[2]}, Hkv*D={Hkv * D}] and "
            f"k_cache {tuple(k_cache.shape)} must have Hkv={Hkv}"
        )
    if miss.shape != slot_ids.shape or dst_rows.shape != (B, K * chunk_size):
        raise ValueError(
            f"miss must match slot_ids {tuple(slot_ids.shape)} and dst_rows must be "
            f"[B, K*C] = [{B}, {K * chunk_size}], got {tuple(dst_rows.shape)}"
        )
    if seg_basis.dim() != 2 or seg_basis.shape[0] != B or seg_basis.shape[1] < 1:
        raise ValueError(
            f"seg_basis must be [B={B}, segments >= 1] (the w_t row of each prompt segment), "
            f"got {tuple(seg_basis.shape)}"
        )
    if seg_starts.shape != seg_basis.shape:
        raise ValueError(
            f"seg_starts {tuple(seg_starts.shape)} must match seg_basis {tuple(seg_basis.shape)} "
            "(one first token per segment)"
        )
    if seg_basis.dtype not in (torch.int32, torch.int64) or seg_starts.dtype != torch.int32:
        raise ValueError(
            f"seg_basis must be int32 or int64 and seg_starts int32, got {seg_basis.dtype} and "
            f"{seg_starts.dtype}"
        )
    if cos.dim() != 2 or cos.shape != sin.shape or not 0 < 2 * cos.shape[1] <= D:
        raise ValueError(
            f"RoPE tables must both be [max_position, Dr/2] with 0 < Dr <= D={D}, got cos "
            f"{tuple(cos.shape)} and sin {tuple(sin.shape)}"
        )
    check_style(style)
    args = (
        k_cache,
        a_pages,
        page_table,
        w_t,
        seg_basis,
        seg_starts,
        slot_ids,
        miss,
        cos,
        sin,
        dst_rows,
        chunk_size,
        style,
    )
    if use_triton(k_cache, "reconstruct_keys"):
        from shadowkv.kernels.reconstruct_keys.triton import reconstruct_keys as impl

        impl(*args)
        return
    reconstruct_keys_ref(*args)
