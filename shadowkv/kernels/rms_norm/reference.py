"""RMSNorm (with the residual add fused in front) in plain PyTorch: the CPU path and the oracle.

Written with the same torch ops in the same order as ``models.llama.RMSNorm.forward`` so that it
is bit for bit the model's formula on any device.
"""

from __future__ import annotations

import torch


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, h)``: ``h = x + residual`` (or ``x``), ``out = weight * rmsnorm(h)``.

    Args:
        x: ``[..., hidden]``, the sublayer output (or the embeddings).
        weight: ``[hidden]``, fp32 or the model dtype.
        eps: added to the mean square.
        residual: ``[..., hidden]`` like ``x`` and in its dtype, or ``None``.

    Returns:
        ``out [..., hidden]`` in ``x``'s dtype, and ``h [..., hidden]``, the new residual stream
        (``x`` itself when ``residual`` is ``None``). The norm is taken in fp32, rounded to
        ``x``'s dtype, then scaled by ``weight``; with an fp32 ``weight`` and 16-bit ``x`` the
        product (fp32 in PyTorch) is rounded back to ``x``'s dtype.
    """
    h = x if residual is None else x + residual
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * hf.to(h.dtype)).to(x.dtype), h
