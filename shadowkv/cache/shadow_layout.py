"""Where a ShadowKV sequence's state lives: its buffer layout and the page pools it draws from.

A sequence's exact-attention buffer is ``[local | outliers | selected | generated]`` rows (or
``[prompt | generated]`` when its prompt is too short for sparsity and it falls back to dense).
Pools hand out fixed-size pages; page 0 of every pool is a null page that is never handed out,
so unused page-table entries (zero) always point at readable, finite memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from shadowkv.cache.base import CacheCapacityError
from shadowkv.config import CacheConfig


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

    @property
    def num_candidates(self) -> int:
        """Chunks before the local window (landmarks + outliers)."""
        return (self.prompt_len - self.local_len) // self.chunk_size if not self.dense else 0

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


def plan_sequence(cfg: CacheConfig, prompt_len: int, max_new_tokens: int) -> SeqLayout:
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


class PagePool:
    """A free list of ``num_pages`` fixed-size pages; page 0 is the null page, never handed out."""

    def __init__(self, name: str, num_pages: int, unit: str, fix: str) -> None:
        self.name, self.unit, self.fix = name, unit, fix
        self.num_pages = max(2, num_pages)
        self.free: list[int] = list(range(self.num_pages - 1, 0, -1))
        self.owned: dict[int, list[int]] = {}

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def can_reserve(self, num: int) -> bool:
        return num <= len(self.free)

    def shortfall(self, num: int) -> str | None:
        """Why ``num`` pages cannot be reserved now, or None when they can."""
        if num <= len(self.free):
            return None
        return (
            f"{self.name}: needs {num} pages of {self.unit}, {len(self.free)} free of "
            f"{self.capacity}; {self.fix}"
        )

    def reserve(self, seq_id: int, num: int) -> list[int]:
        why = self.shortfall(num)
        if why is not None:
            raise CacheCapacityError(why)
        self.owned[seq_id] = [self.free.pop() for _ in range(num)]
        return self.owned[seq_id]

    def release(self, seq_id: int) -> None:
        self.free.extend(reversed(self.owned.pop(seq_id, [])))

    def held(self, seq_id: int) -> int:
        return len(self.owned.get(seq_id, ()))


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
