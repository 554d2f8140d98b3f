"""The value store: every prompt chunk's values, paged, in host memory (pinned on CUDA).

Layout per layer ``[num_pages, Pc, Hkv, C*D]``: one chunk of one KV head is one contiguous row of
``C*D`` values, so fetching a selected chunk is one row copy. The arena is allocated at the first
admission, not at construction, so a host that cannot pin it refuses that request with a
``CacheCapacityError`` instead of failing engine start-up.
"""

from __future__ import annotations

import os

import torch

from shadowkv.cache.base import CacheCapacityError
from shadowkv.cache.shadow_layout import PagePool, cdiv

# Share of host RAM the auto-sized store may take: CPU runs keep room for the model and the
# activations in the same memory; CUDA runs pin, and pinned pages cannot be swapped.
CPU_HOST_SHARE = 0.25
CUDA_HOST_SHARE = 0.5


def available_host_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * 2**30


def auto_host_bytes(need: int, device: torch.device) -> int:
    """The store size when ``host_memory_gb`` is None: what is needed, capped by a share of RAM."""
    share = CUDA_HOST_SHARE if device.type == "cuda" else CPU_HOST_SHARE
    return min(need, int(available_host_bytes() * share))


class HostValueStore:
    """Paged value chunks for all layers; sequences reserve pages of ``chunks_per_page`` chunks."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        chunk_size: int,
        chunks_per_page: int,
        dtype: torch.dtype,
        capacity_bytes: int,
        device: torch.device,
        pin: bool,
    ) -> None:
        self.shape = (chunks_per_page, num_kv_heads, chunk_size * head_dim)
        self.num_layers, self.chunk_size, self.dtype = num_layers, chunk_size, dtype
        self.device, self.pin = device, pin
        elem = torch.empty((), dtype=dtype).element_size()
        self.page_bytes = num_layers * chunks_per_page * num_kv_heads * chunk_size * head_dim * elem
        self.pool = PagePool(
            "host value store",
            capacity_bytes // self.page_bytes,
            f"{chunks_per_page * chunk_size} tokens",
            "give the store more host memory (CacheConfig.host_memory_gb), lower the number of "
            "concurrent sequences, or wait for running requests to finish",
        )
        self._data: torch.Tensor | None = None  # [L, num_pages, Pc, Hkv, C*D], allocated lazily

    @property
    def chunks_per_page(self) -> int:
        return self.shape[0]

    def pages_for(self, num_chunks: int) -> int:
        return cdiv(num_chunks, self.chunks_per_page)

    def shortfall(self, num_chunks: int) -> str | None:
        return self.pool.shortfall(self.pages_for(num_chunks))

    def reserve(self, seq_id: int, num_chunks: int) -> list[int]:
        self._allocate()
        return self.pool.reserve(seq_id, self.pages_for(num_chunks))

    def release(self, seq_id: int) -> None:
        self.pool.release(seq_id)

    def held_bytes(self, seq_id: int) -> int:
        return self.pool.held(seq_id) * self.page_bytes

    def layer(self, layer: int) -> torch.Tensor:
        """``[num_pages, Pc, Hkv, C*D]`` values of one layer."""
        assert self._data is not None, "the store is allocated at the first reserve()"
        return self._data[layer]

    def write(self, layer: int, pages: torch.Tensor, values: torch.Tensor) -> None:
        """Store one sequence's prompt values ``[T, Hkv, D]`` in its ``pages`` (int64, in order)."""
        T, Hkv, D = values.shape
        C, Pc = self.chunk_size, self.chunks_per_page
        n = cdiv(T, C)
        padded = values.new_zeros(n * C, Hkv, D)
        padded[:T] = values
        rows = padded.view(n, C, Hkv, D).transpose(1, 2).reshape(n, Hkv, C * D)
        chunk = torch.arange(n, device=pages.device)
        dst = pages[chunk // Pc] * Pc + chunk % Pc
        store = self.layer(layer).view(-1, Hkv, C * D)
        store[dst.to(store.device)] = rows.to(store.device, self.dtype)

    def _allocate(self) -> None:
        if self._data is not None:
            return
        shape = (self.num_layers, self.pool.num_pages, *self.shape)
        try:
            self._data = torch.empty(
                shape, dtype=self.dtype, device=self.device, pin_memory=self.pin
            )
        except RuntimeError as err:  # pinned or device allocation refused (e.g. ShadowKV issue #20)
            gib = self.pool.num_pages * self.page_bytes / 2**30
            where = "pinned host" if self.pin else str(self.device)
            raise CacheCapacityError(
                f"could not allocate the {gib:.1f} GiB value store in {where} memory ({err}); "
                "set CacheConfig.host_memory_gb lower"
            ) from err
