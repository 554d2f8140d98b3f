"""The rows of one ShadowKV sequence: its exact-attention buffer and what it selects.

A sequence's exact-attention buffer is ``[local | outliers | selected | generated]`` rows (or
``[prompt | generated]`` when its prompt is too short for sparsity and it falls back to dense).
A sequence whose long suffix is its own low-rank segment 1 (``segment_start > 0``, prefix
sharing: ``shadow_share.py``) has two groups of outlier rows: segment 0's exact chunks, then the
suffix's outliers (the last ``suffix_outlier_rows``); its local window is the suffix's.
"""

from __future__ import annotations

from dataclasses import dataclass

from shadowkv.cache.methods import ShadowKVConfig

PAGE_CHUNKS = 16  # chunks per factor/landmark page and per value-store page


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SeqLayout:
    """Row counts of one sequence. ``dense`` sequences hold every prompt token exact."""

    prompt_len: int
    max_new_tokens: int
    chunk_size: int
    dense: bool
    local_len: int = 0  # local-window rows: local chunks + the T mod C tail
    outlier_rows: int = 0  # O * C
    num_landmarks: int = 0  # N per KV head
    num_select: int = 0  # K chunks selected per KV head
    segment_start: int = 0  # first token of segment 1 (its own basis); 0: one segment
    suffix_outlier_rows: int = 0  # segment 1's outlier rows, the last of ``outlier_rows``

    @property
    def num_candidates(self) -> int:
        """Chunks before the local window (landmarks + outliers)."""
        return (self.prompt_len - self.local_len) // self.chunk_size if not self.dense else 0

    @property
    def seg0_landmarks(self) -> int:
        """``N'``: the landmarks of segment 0, the first of each head's list (all of them when
        the prompt is one segment)."""
        if not self.segment_start:
            return self.num_landmarks
        shared_exact = (self.outlier_rows - self.suffix_outlier_rows) // self.chunk_size
        return self.segment_start // self.chunk_size - shared_exact

    @property
    def select_start(self) -> int:
        return self.local_len + self.outlier_rows

    @property
    def gen_start(self) -> int:
        """First buffer row of generated tokens."""
        if self.dense:
            return self.prompt_len
        return self.select_start + self.num_select * self.chunk_size

    @property
    def buffer_rows(self) -> int:
        return self.gen_start + self.max_new_tokens

    @property
    def num_chunks(self) -> int:
        """Value-store chunks: every prompt token, the last chunk zero-padded."""
        return 0 if self.dense else cdiv(self.prompt_len, self.chunk_size)


def plan_sequence(cfg: ShadowKVConfig, prompt_len: int, max_new_tokens: int) -> SeqLayout:
    """The layout ShadowKV gives a prompt; too short for local + outliers + budget => dense."""
    C = cfg.chunk_size
    select = cfg.budget_tokens(prompt_len) // C
    if prompt_len < (cfg.local_chunks + cfg.outlier_chunks + select) * C:
        return SeqLayout(prompt_len, max_new_tokens, C, dense=True)
    candidates = prompt_len // C - cfg.local_chunks
    return SeqLayout(
        prompt_len,
        max_new_tokens,
        C,
        dense=False,
        local_len=prompt_len - candidates * C,
        outlier_rows=cfg.outlier_chunks * C,
        num_landmarks=candidates - cfg.outlier_chunks,
        num_select=select,
    )
