"""The value store: every prompt chunk's values, paged, in a host tier and a device tier.

Both tiers have the layout ``[num_pages, Pc, Hkv, C*D]`` per layer: one chunk of one KV head is
one contiguous row of ``C*D`` values, so fetching a selected chunk is one row copy, and the same
gather op reads either tier. A sequence's values live wholly in one tier, chosen at admission:
the host tier (pinned on CUDA) when it has the pages, else the device tier, which is carved out
of the device cache budget. The host arena is allocated at the first admission, not at
construction, so a host that cannot pin it does not fail engine start-up: the host tier is then
turned off (with a warning naming the cause) and sequences go to the device tier, or are refused
with a ``CacheCapacityError`` when it has no room. The device arena is allocated up front like
the other device pools.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence

import torch

from shadowkv.cache.base import CacheCapacityError, CacheMemory
from shadowkv.cache.shadow_layout import PagePool, cdiv

# Share of host RAM the auto-sized host tier may take: CPU runs keep room for the model and the
# activations in the same memory; CUDA runs pin, and pinned pages cannot be swapped.
CPU_HOST_SHARE = 0.25
CUDA_HOST_SHARE = 0.5
HOST, DEVICE = 0, 1  # tier indices, in admission order


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


def page_runs(pages: Sequence[int], chunks_per_page: int) -> list[tuple[int, int, int]]:
    """``(first page, pages, first chunk)`` of each run of consecutive pages."""
    runs: list[tuple[int, int, int]] = []
    for i, page in enumerate(pages):
        if runs and runs[-1][0] + runs[-1][1] == page:
            first, count, chunk = runs[-1]
            runs[-1] = (first, count + 1, chunk)
        else:
            runs.append((page, 1, i * chunks_per_page))
    return runs


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A host tensor page-locked in place (``cudaHostRegister``): exactly its own size.

    ``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which
    rounds every request up to a power of two: a 40 GiB arena would pin 64 GiB, and a 70 GiB one
    ask for 128 GiB and fail. Registering plain memory pins what the arena needs. The memory is
    mapped for the device too (unified addressing), which the zero-copy value gather reads.
    """
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0))
    if err != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed (cudaError {err})")
    return t


def unpin(t: torch.Tensor) -> None:
    """Undo ``pinned_empty`` (the tensor stays alive until this returns)."""
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class ValueTier:
    """One arena of value pages ``[L, num_pages, Pc, Hkv, C*D]`` and the pool handing them out."""

    def __init__(
        self,
        name: str,
        num_layers: int,
        page_shape: tuple[int, int, int],
        dtype: torch.dtype,
        capacity_bytes: int,
        device: torch.device,
        pin: bool,
        fix: str,
    ) -> None:
        self.name, self.num_layers, self.page_shape = name, num_layers, page_shape
        self.dtype = dtype
        self.device, self.pin, self.fix = device, pin, fix
        elem = torch.empty((), dtype=dtype).element_size()
        self.page_bytes = num_layers * math.prod(page_shape) * elem
        num_pages = capacity_bytes // self.page_bytes
        self.pool = PagePool(f"{name} value tier", num_pages, f"{page_shape[0]} chunks", fix)
        self._data: torch.Tensor | None = None  # [L, num_pages, Pc, Hkv, C*D]
        self.planning = False  # reservations count pages without allocating (see planning())

    def layer(self, layer: int) -> torch.Tensor:
        """``[num_pages, Pc, Hkv, C*D]`` values of one layer."""
        assert self._data is not None, "a tier is allocated before its first page is handed out"
        return self._data[layer]

    def reserve(self, seq_id: int, num_pages: int) -> list[int]:
        if num_pages and not self.planning:
            self.allocate()
        return self.pool.reserve(seq_id, num_pages)

    def write(self, layer: int, pages: Sequence[int], values: torch.Tensor) -> None:
        """Store one sequence's prompt values ``[T, Hkv, D]`` in its ``pages`` (in chunk order).

        Pages handed out in a row are consecutive in the arena, so each run of them is one copy
        into a slice of the store: a DMA straight into pinned memory when the values are on the
        GPU, not a gather through pageable memory and a CPU scatter.
        """
        T, Hkv, D = values.shape
        Pc, C = self.page_shape[0], self.page_shape[2] // D
        n = cdiv(T, C)
        padded = values.new_zeros(n * C, Hkv, D, dtype=self.dtype)
        padded[:T] = values
        rows = padded.view(n, C, Hkv, D).transpose(1, 2).reshape(n, Hkv, C * D)
        store = self.layer(layer)  # [num_pages, Pc, Hkv, C * D]
        for first, count, chunk in page_runs(pages[: cdiv(n, Pc)], Pc):
            end = min(n, chunk + count * Pc)
            dst = store[first : first + count].view(-1, Hkv, C * D)[: end - chunk]
            dst.copy_(rows[chunk:end], non_blocking=True)

    def disable(self) -> None:
        """Give the tier no pages (its arena could not be allocated)."""
        self.pool = PagePool(self.pool.name, 0, self.pool.unit, self.pool.fix)

    def allocate(self) -> None:
        if self._data is not None or self.pool.capacity == 0:
            return
        shape = (self.num_layers, self.pool.num_pages, *self.page_shape)
        try:
            if self.pin:
                self._data = pinned_empty(shape, self.dtype)
                weakref.finalize(self, unpin, self._data)  # unpinned before it can be freed
            else:
                self._data = torch.empty(shape, dtype=self.dtype, device=self.device)
        except RuntimeError as err:  # pinned or device allocation refused (e.g. ShadowKV issue #20)
            gib = self.pool.num_pages * self.page_bytes / 2**30
            where = "pinned host" if self.pin else str(self.device)
            raise CacheCapacityError(
                f"could not allocate the {gib:.1f} GiB {self.name} value tier in {where} memory "
                f"({err}); {self.fix}"
            ) from err


class ValueStore:
    """The two value tiers; each sequence's pages come wholly from one, host first."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        chunk_size: int,
        chunks_per_page: int,
        dtype: torch.dtype,
        host_bytes: int,
        device_bytes: int,
        device: torch.device,
    ) -> None:
        shape = (chunks_per_page, num_kv_heads, chunk_size * head_dim)
        self.page_tokens = chunks_per_page * chunk_size
        self.tiers = (
            ValueTier(
                "host",
                num_layers,
                shape,
                dtype,
                host_bytes,
                torch.device("cpu"),
                pin=device.type == "cuda",
                fix="set CacheConfig.host_memory_gb lower",
            ),
            ValueTier(
                "device",
                num_layers,
                shape,
                dtype,
                device_bytes,
                device,
                pin=False,
                fix="set CacheConfig.device_value_memory_gb or EngineConfig.cache_memory_gb lower",
            ),
        )
        self.tiers[DEVICE].allocate()  # part of the device budget, like the other device pools

    @contextlib.contextmanager
    def planning(self) -> Iterator[None]:
        """Reservations inside count pages but allocate no tier (a batch-size search)."""
        for t in self.tiers:
            t.planning = True
        try:
            yield
        finally:
            for t in self.tiers:
                t.planning = False

    @property
    def page_bytes(self) -> int:
        return self.tiers[HOST].page_bytes

    def pages_for(self, num_chunks: int) -> int:
        return cdiv(num_chunks, self.tiers[HOST].page_shape[0])

    def placement(self, num_chunks: int) -> int | None:
        """The tier a sequence of ``num_chunks`` chunks would go to now, or None if neither fits."""
        need = self.pages_for(num_chunks)
        return next((i for i, t in enumerate(self.tiers) if need <= t.pool.num_free), None)

    def fits_empty(self, num_chunks: int) -> bool:
        return any(self.pages_for(num_chunks) <= t.pool.capacity for t in self.tiers)

    def shortfall(self, num_chunks: int) -> str | None:
        """Why a sequence's values cannot be placed now, or None when one tier has the pages."""
        if self.placement(num_chunks) is not None:
            return None
        host, dev = (t.pool for t in self.tiers)
        return (
            f"value store: needs {self.pages_for(num_chunks)} pages of {self.page_tokens} tokens "
            f"in one tier, but the host tier has {host.num_free} free of {host.capacity} and "
            f"the device tier {dev.num_free} free of {dev.capacity}; enlarge the host tier "
            "(CacheConfig.host_memory_gb, --host-memory-gb) or the device tier "
            "(CacheConfig.device_value_memory_gb, --device-value-memory-gb, taken from "
            "EngineConfig.cache_memory_gb), lower the number of concurrent sequences, or wait "
            "for running requests to finish"
        )

    def reserve(self, seq_id: int, num_chunks: int) -> tuple[int, list[int]]:
        """A sequence's value pages: ``(tier, pages)``; no chunks => the host tier, no pages."""
        tier = self.placement(num_chunks)
        if tier is None:
            raise CacheCapacityError(self.shortfall(num_chunks))
        try:
            return tier, self.tiers[tier].reserve(seq_id, self.pages_for(num_chunks))
        except CacheCapacityError as err:
            # The host arena could not be had (pinning refused): give up on that tier for good,
            # rather than retrying a multi-GiB allocation at every admission, and go on with
            # the device tier.
            if tier != HOST:
                raise
            warnings.warn(f"{err}; continuing without the host value tier", RuntimeWarning,
                          stacklevel=2)
            self.tiers[HOST].disable()
            if self.placement(num_chunks) is None:
                raise
            return self.reserve(seq_id, num_chunks)

    def release(self, seq_id: int) -> None:
        for t in self.tiers:
            t.pool.release(seq_id)

    def pages_of(self, seq_id: int, tier: int) -> tuple[int, ...]:
        """A sequence's value pages in chunk order (none for a dense-fallback sequence)."""
        return tuple(self.tiers[tier].pool.owned.get(seq_id, ()))

    def live_tiers(self) -> tuple[int, ...]:
        """The tiers whose memory is allocated (a tier stays allocated once it is)."""
        return tuple(i for i, t in enumerate(self.tiers) if t._data is not None)

    def layer(self, tier: int, layer: int) -> torch.Tensor:
        return self.tiers[tier].layer(layer)

    def write(self, tier: int, layer: int, pages: Sequence[int], values: torch.Tensor) -> None:
        self.tiers[tier].write(layer, pages, values)

    def memory(self, seq_id: int) -> CacheMemory:
        """A sequence's value bytes: device tier as device bytes, host tier as host bytes."""
        host, dev = (t.pool.held(seq_id) * t.page_bytes for t in self.tiers)
        return CacheMemory(device_bytes=dev, host_bytes=host)
