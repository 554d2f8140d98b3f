"""Prefix sharing of ShadowKV memory: what a shared prefix keeps, and the rows of a sequence
started from it.

A sparse prefilled prompt ``p`` shares its first ``n`` tokens (a whole number of factor pages,
inside its candidate region) as segment 0 of later prompts ``p[0:n] + s``: its factor pages
(``A`` rows in ``p``'s basis and the landmarks of those tokens), its value pages, its basis slot,
and an exact copy of its outlier chunks in ``[0, n)`` (buffer blocks the prefix holds). A
sequence started from it (``T`` tokens) gets, per KV head ``h`` with ``k_h`` outliers in
``[0, n)`` (``k = max`` over heads and layers):

- ``N' = n/C - k`` landmarks: the first ``N'`` of each head's list, read from the shared pages
  as they are (``num_landmarks`` masks the rest);
- ``k`` exact chunks ("outlier" rows): the head's ``k_h`` outliers, copied exactly, and its
  next ``k - k_h`` landmark chunks, keys rebuilt low-rank (``A Wᵀ`` then RoPE) and values read
  from the store — together every chunk of ``[0, n)`` not among the ``N'``;
- its suffix ``[n, T)`` exact in the buffer, like generated tokens (the "local" rows), when
  it has at most ``shared_suffix_tokens``; a longer suffix is segment 1, factorised with its
  own basis (its ``A`` rows in its own factor pages after the shared ones), with its own local
  window, outliers and ``N_s`` landmarks (chunk ids from ``n/C``): one landmark list per head,
  segment 0's ``N'`` then the suffix's, under one budget. Landmark ``i`` is at page ``i // 16``
  of the sequence's landmark table: the shared factor pages holding whole seg-0 landmark pages,
  then one own page copying the partial last one (and continuing with the suffix's), then the
  suffix's own factor pages (their landmark slots).

Shapes: ``L`` layers, ``Hkv`` KV heads, ``D`` head dim, ``C`` chunk size, ``P`` tokens per
factor page, ``R`` rank, ``K`` chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shadowkv.cache.shadow_layout import SeqLayout
from shadowkv.kernels.rope import rotate

NO_CHUNK = torch.iinfo(torch.int64).max  # padding of a head with fewer outliers than others


@dataclass(frozen=True)
class ShadowPrefix:
    """ShadowKV's part of a ``SharedPrefix`` (its ``detail``).

    ``basis``: the basis slot (``w_t`` row) of the prefix's ``A`` rows; ``value_tier``: the tier
    its value pages are in; ``outlier_ids [L, Kc, Hkv]`` (host int64): each head's outlier chunks
    in ``[0, n)``, ascending, padded with ``NO_CHUNK``; ``copy_rows [Kc*C]`` (int64, flat buffer
    rows of the prefix's blocks): row ``i*C + j`` of head ``h`` holds token ``j`` of chunk
    ``outlier_ids[l, i, h]``, keys post-RoPE and values, exact (copied from ``p``'s buffer).
    """

    basis: int
    value_tier: int
    outlier_ids: torch.Tensor
    copy_rows: torch.Tensor

    def num_exact(self, num_chunks: int) -> int:
        """``k``: the most outlier chunks in ``[0, num_chunks)`` of any head in any layer."""
        if self.outlier_ids.shape[1] == 0:
            return 0
        return int((self.outlier_ids < num_chunks).sum(1).max())


def shared_layout(
    full: SeqLayout, prefix: ShadowPrefix, prefix_tokens: int, max_suffix: int,
    local_chunks: int, outlier_chunks: int,
) -> SeqLayout | None:
    """The rows of a sequence started from ``prefix_tokens`` tokens of ``prefix``, given the
    layout it would have prefilled from scratch (``full``: its budget); None when it cannot
    (it runs dense, no landmark is left, its suffix is longer than the prefix, or longer than
    ``max_suffix`` but too short to be sparse on its own: under ``local_chunks +
    outlier_chunks + 1`` chunks).

    A suffix of at most ``max_suffix`` tokens is exact (the local rows); a longer one is
    segment 1 (``suffix_layout``)."""
    T, C = full.prompt_len, full.chunk_size
    if full.dense:
        return None
    k = prefix.num_exact(prefix_tokens // C)
    num_landmarks = prefix_tokens // C - k
    if num_landmarks < 1:
        return None
    # A shared start shorter than the rest of the prompt (a common system prompt, another
    # document that begins with the same text) is not worth it: the prompt prefills from
    # scratch, and then it can itself be shared (a sequence started from a prefix cannot).
    if T - prefix_tokens > prefix_tokens:
        return None
    if T - prefix_tokens > max_suffix:
        return suffix_layout(full, prefix_tokens, k, local_chunks, outlier_chunks)
    return SeqLayout(
        T,
        full.max_new_tokens,
        C,
        dense=False,
        local_len=T - prefix_tokens,
        outlier_rows=k * C,
        num_landmarks=num_landmarks,
        num_select=min(full.num_select, num_landmarks),
    )


def suffix_layout(
    full: SeqLayout, prefix_tokens: int, k: int, local_chunks: int, outlier_chunks: int
) -> SeqLayout | None:
    """The rows of a sequence whose suffix ``[n, T)`` is segment 1: its local window (the
    suffix's last ``local_chunks`` chunks and ``T mod C`` tail), segment 0's ``k`` exact
    chunks, the suffix's ``outlier_chunks`` outliers; ``N' = n/C - k`` landmarks of segment 0
    then the suffix's ``N_s``, one budget over both. None when the suffix has fewer than
    ``local_chunks + outlier_chunks + 1`` chunks."""
    T, C, n = full.prompt_len, full.chunk_size, prefix_tokens
    candidates = (T - n) // C - local_chunks
    if candidates < outlier_chunks + 1:
        return None
    num_landmarks = n // C - k + candidates - outlier_chunks
    return SeqLayout(
        T,
        full.max_new_tokens,
        C,
        dense=False,
        local_len=T - n - candidates * C,
        outlier_rows=(k + outlier_chunks) * C,
        num_landmarks=num_landmarks,
        num_select=min(full.num_select, num_landmarks),
        segment_start=n,
        suffix_outlier_rows=outlier_chunks * C,
    )


def sorted_outliers(
    outlier_ids: torch.Tensor, num_chunks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, order)``, both ``[O, Hkv]``: a head's outliers in ``[0, num_chunks)`` ascending
    (the rest ``NO_CHUNK``, last), and the index of each in ``outlier_ids [O, Hkv]`` (the
    order of the sequence's buffer rows)."""
    ids = outlier_ids.long()
    return torch.where(ids < num_chunks, ids, NO_CHUNK).sort(dim=0)


def exact_chunks(
    outlier_ids: torch.Tensor, landmark_ids: torch.Tensor, num_chunks: int, num_landmarks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chunks, outlier)``, both ``[k, Hkv]``: the chunks of ``[0, num_chunks)`` a sequence
    started from a prefix keeps exact per head, and which of them are outliers (copied exactly;
    the rest are rebuilt). ``outlier_ids [k, Hkv]``: the prefix's first ``k`` sorted outlier
    slots; ``landmark_ids [num_landmarks + k, Hkv]``: the head's first landmark ids. Slot ``i``
    of head ``h`` is its ``i``-th outlier for ``i < k_h``, else landmark ``N' + i - k_h``."""
    k = outlier_ids.shape[0]
    outlier = outlier_ids < num_chunks  # [k, Hkv]: a prefix of each column
    entry = num_landmarks + torch.arange(k, device=outlier_ids.device)[:, None] - outlier.sum(0)
    later = landmark_ids.long().gather(0, entry.clamp_min(0))
    return torch.where(outlier, outlier_ids, later), outlier


def rebuild_keys(
    a: torch.Tensor, w_t: torch.Tensor, num_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
    style: str,
) -> torch.Tensor:
    """Post-RoPE keys ``[..., Hkv, D]`` rebuilt from factors and the basis ``w_t [R, Hkv*D]``,
    rotated by ``cos, sin [..., Hkv or 1, Dr/2]``: ``a [..., R]`` is one row for every head
    (times the whole basis), ``a [..., Hkv, R]`` a row per head (head ``h`` times its
    columns). Float32 accumulate and rotation, as ``reconstruct_keys`` computes them; the caller
    casts."""
    acc = torch.promote_types(a.dtype, torch.float32)
    w = w_t.to(acc).view(w_t.shape[0], num_kv_heads, -1)  # [R, Hkv, D]
    if a.dim() < cos.dim():  # every head: [..., R] @ [R, Hkv*D]
        k = (a.to(acc) @ w.flatten(1)).unflatten(-1, w.shape[1:])
    else:
        k = torch.einsum("...hr,rhd->...hd", a.to(acc), w)
    return rotate(k, cos, sin, style)
