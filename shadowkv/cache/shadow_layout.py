"""Where a ShadowKV sequence's state lives: its buffer layout and the page pools it draws from.

A sequence's exact-attention buffer is ``[local | outliers | selected | generated]`` rows (or
``[prompt | generated]`` when its prompt is too short for sparsity and it falls back to dense).
Pools hand out fixed-size pages; page 0 of every pool is a null page that is never handed out,
so unused page-table entries (zero) always point at readable, finite memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from shadowkv.cache.base import CacheCapacityError
from shadowkv.config import CacheConfig, ConfigError

PAGE_CHUNKS = 16  # chunks per factor/landmark page and per value-store page
REFERENCE_NEW_TOKENS = 512  # generation length the device-pool split plans for


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
    """``num_pages`` fixed-size pages; page 0 is the null page, never handed out.

    Freed pages are reused first; fresh ones are counted, not listed, so a huge pool costs
    nothing until it is used. A pool with room for the null page only has capacity 0.
    """

    def __init__(self, name: str, num_pages: int, unit: str, fix: str) -> None:
        self.name, self.unit, self.fix = name, unit, fix
        self.num_pages = max(1, num_pages)
        self._recycled: list[int] = []
        self._next_fresh = 1
        self.owned: dict[int, list[int]] = {}

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._recycled) + self.num_pages - self._next_fresh

    def shortfall(self, num: int) -> str | None:
        """Why ``num`` pages cannot be reserved now, or None when they can."""
        if num <= self.num_free:
            return None
        return (
            f"{self.name}: needs {num} pages of {self.unit}, {self.num_free} free of "
            f"{self.capacity}; {self.fix}"
        )

    def reserve(self, seq_id: int, num: int) -> list[int]:
        why = self.shortfall(num)
        if why is not None:
            raise CacheCapacityError(why)
        reuse = min(num, len(self._recycled))
        pages = [self._recycled.pop() for _ in range(reuse)]
        pages += range(self._next_fresh, self._next_fresh + num - reuse)
        self._next_fresh += num - reuse
        self.owned[seq_id] = pages
        return pages

    def release(self, seq_id: int) -> None:
        self._recycled.extend(reversed(self.owned.pop(seq_id, [])))

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


def reference_layout(cfg: CacheConfig, max_model_len: int) -> SeqLayout:
    """The sequence the device-pool split is sized for: a full context less a typical answer."""
    new = min(REFERENCE_NEW_TOKENS, max_model_len // 4)
    lay = plan_sequence(cfg, max_model_len - new, new)
    return lay if not lay.dense else plan_sequence(cfg, max_model_len - 1, 1)


def check_engages(cfg: CacheConfig, max_model_len: int) -> None:
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
