"""ShadowKV prefill math: low-rank key factors and chunk landmarks with outliers.

Pure functions over one sequence and one layer; the cache decides where the results live.
Shapes: ``T`` prompt tokens, ``Hkv`` KV heads, ``D`` head dim, ``R`` rank, ``C`` chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LowRankFactors:
    """``K ≈ a @ w_t`` with ``a [T, R]`` and ``w_t [R, Hkv*D]`` (orthonormal rows).

    ``eigenvalues [Hkv*D]``: those of ``KᵀK``, descending (the squared singular values of ``K``).
    """

    a: torch.Tensor
    w_t: torch.Tensor
    eigenvalues: torch.Tensor


def lowrank_factors(
    keys: torch.Tensor, rank: int, gram: torch.Tensor | None = None
) -> LowRankFactors:
    """Rank-``rank`` factors of pre-RoPE keys ``[T, Hkv*D]`` by the Gram route.

    ``G = KᵀK`` (fp32, or fp64 for fp64 input), ``eigh(G)``, ``W`` = the top ``rank``
    eigenvectors ``[Hkv*D, R]``, ``A = K W``. The squared Frobenius error of ``A Wᵀ`` is the sum
    of the dropped eigenvalues; at full rank ``W`` is orthogonal and ``A Wᵀ = K``. Cheaper than an
    SVD of the tall ``K`` and spans the same top singular subspace. ``gram``: ``KᵀK`` already
    summed (a prompt prefilled in chunks, ``shadow_staging``), instead of computing it here.
    """
    if keys.dim() != 2:
        raise ValueError(f"keys must be [T, Hkv*D], got {tuple(keys.shape)}")
    if not 1 <= rank <= keys.shape[1]:
        raise ValueError(f"rank={rank} must be in [1, {keys.shape[1]}] (the key width)")
    k = keys.to(torch.promote_types(keys.dtype, torch.float32))
    evals, evecs = torch.linalg.eigh(k.T @ k if gram is None else gram.to(k.dtype))  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    w = evecs[:, :rank]  # [Hkv*D, R]
    return LowRankFactors(a=k @ w, w_t=w.T.contiguous(), eigenvalues=evals.clamp_min(0))


@dataclass(frozen=True)
class ChunkSummary:
    """Landmarks of the candidate chunks and the outliers kept exact, per KV head.

    ``landmarks [N, Hkv, D]`` (fp32 chunk means), ``landmark_ids [N, Hkv]`` (chunk ids ascending
    per head), ``outlier_ids [O, Hkv]`` (chunk ids). Candidates are chunks ``[0, num_candidates)``;
    later tokens form the local window.
    """

    landmarks: torch.Tensor
    landmark_ids: torch.Tensor
    outlier_ids: torch.Tensor
    num_candidates: int


def summarize_chunks(
    keys: torch.Tensor, chunk_size: int, local_chunks: int, outlier_chunks: int
) -> ChunkSummary:
    """Chunk means of post-RoPE ``keys [T, Hkv, D]`` and the outlier chunks they summarise worst.

    The last ``local_chunks`` whole chunks and the ``T mod C`` tail are the local window and are
    not candidates. A chunk's outlier score is the minimum over its keys of cosine(key, mean); the
    ``outlier_chunks`` lowest per KV head are outliers and get no landmark.
    """
    T, Hkv, D = keys.shape
    C = chunk_size
    n = T // C - local_chunks
    if n < outlier_chunks:
        raise ValueError(
            f"{T} tokens give {max(n, 0)} candidate chunks, fewer than "
            f"outlier_chunks={outlier_chunks}"
        )
    chunks = keys[: n * C].float().view(n, C, Hkv, D)
    means = chunks.mean(dim=1)  # [n, Hkv, D]
    worst = F.cosine_similarity(chunks, means[:, None], dim=-1).amin(dim=1)  # [n, Hkv]
    outliers = worst.topk(outlier_chunks, dim=0, largest=False).indices  # [O, Hkv]
    is_outlier = torch.zeros(n, Hkv, dtype=torch.bool, device=keys.device)
    is_outlier.scatter_(0, outliers, True)
    # Stable sort puts each head's non-outliers first, in ascending chunk id.
    order = torch.sort(is_outlier.to(torch.int8), dim=0, stable=True).indices[: n - outlier_chunks]
    landmarks = means.gather(0, order[..., None].expand(-1, Hkv, D))
    return ChunkSummary(landmarks, order, outliers, n)


def exact_token_index(
    prompt_len: int, chunk_size: int, num_candidates: int, outlier_ids: torch.Tensor
) -> torch.Tensor:
    """Token ids ``[E, Hkv]`` kept exact per KV head: the local window, then each outlier chunk.

    ``E = (prompt_len - num_candidates*C) + O*C``; row ``i`` of head ``h`` is the token stored in
    exact-buffer row ``i`` of that head.
    """
    num_outliers, Hkv = outlier_ids.shape
    dev = outlier_ids.device
    local = torch.arange(num_candidates * chunk_size, prompt_len, device=dev)[:, None].expand(
        -1, Hkv
    )
    within = torch.arange(chunk_size, device=dev)[None, :, None]
    outlier = outlier_ids[:, None, :] * chunk_size + within  # [O, C, Hkv]
    outlier = outlier.reshape(num_outliers * chunk_size, Hkv)
    return torch.cat([local, outlier], dim=0)
