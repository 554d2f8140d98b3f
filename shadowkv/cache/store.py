"""The value store: every prompt chunk's values, paged, in a host tier and a device tier.

Both tiers have the layout ``[num_pages, Pc, Hkv, C*D]`` per layer: one chunk of one KV head is
one contiguous row of ``C*D`` values, so fetching a selected chunk is one row copy, and the same
gather op reads either tier. With ``value_dtype="fp8"`` a row holds e4m3 codes (one byte each,
``kernels/fp8.py``) and a parallel arena ``[num_pages, Pc, Hkv, C]`` holds a float32 scale per
token and KV head: values are quantised once, as they are written, and cross PCIe as bytes.

A sequence's values live wholly in one tier, chosen at admission: the host tier (pinned on
CUDA) when it has the pages, else the device tier, which is carved out of the device cache
budget. The host arena is allocated at the first admission, not at construction, so a host that
cannot pin it does not fail engine start-up: the host tier is then turned off (with a warning
naming the cause) and sequences go to the device tier, or are refused with a
``CacheCapacityError`` when it has no room. The device arena is allocated up front like
the other device pools.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from shadowkv.cache.errors import CacheCapacityError
from shadowkv.cache.layout import elem_size
from shadowkv.cache.pages import PageAllocator
from shadowkv.kernels.fp8 import CODE_DTYPE, SCALE_DTYPE, fp8_to_float, quantize_fp8

HOST, DEVICE = 0, 1  # tier indices, in admission order


class TierUnavailable(CacheCapacityError):
    """The host tier's memory could not be had; the tier is off from now on."""

TIER_NAMES = ("host", "device")


@dataclass(frozen=True)
class ValueLayout:
    """How values are stored: pages of ``Pc`` chunks, one row of ``C*D`` values per chunk and
    KV head, over ``num_layers`` layers, in ``dtype`` (the model's), or as fp8 codes with one
    float32 scale per token and KV head when ``quantized``. The one place a value page's bytes
    are computed."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    chunk_size: int
    page_chunks: int
    dtype: torch.dtype
    quantized: bool = False

    @property
    def page_shape(self) -> tuple[int, int, int]:
        """One layer's page: ``[Pc, Hkv, C*D]``."""
        return (self.page_chunks, self.num_kv_heads, self.chunk_size * self.head_dim)

    @property
    def scale_shape(self) -> tuple[int, int, int]:
        """One layer's page of scales (quantized stores): ``[Pc, Hkv, C]``."""
        return (self.page_chunks, self.num_kv_heads, self.chunk_size)

    @property
    def store_dtype(self) -> torch.dtype:
        """What a row element is stored as: the model dtype, or a byte of fp8 code."""
        return CODE_DTYPE if self.quantized else self.dtype

    @property
    def elem_size(self) -> int:
        return elem_size(self.store_dtype)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all layers, scales included."""
        scales = math.prod(self.scale_shape) * elem_size(SCALE_DTYPE) if self.quantized else 0
        return self.num_layers * (math.prod(self.page_shape) * self.elem_size + scales)

    @property
    def page_tokens(self) -> int:
        return self.page_chunks * self.chunk_size

    def pages_for(self, num_chunks: int) -> int:
        return -(-num_chunks // self.page_chunks)


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
    """One arena of value pages ``[L, num_pages, Pc, Hkv, C*D]`` (plus their scales
    ``[L, num_pages, Pc, Hkv, C]`` when quantized) and the allocator handing them out (page 0 is
    the null page)."""

    def __init__(
        self,
        tier: int,
        layout: ValueLayout,
        capacity_bytes: int,
        device: torch.device,
        pin: bool,
        fix: str,
    ) -> None:
        self.name = TIER_NAMES[tier]
        self.layout = layout
        self.device, self.pin, self.fix = device, pin, fix
        self.pages = PageAllocator(
            f"{self.name} value tier",
            capacity_bytes // layout.page_bytes,
            f"{layout.page_chunks} chunks",
            fix,
            layout.page_bytes,
            on_host=tier == HOST,
        )
        self._data: torch.Tensor | None = None  # [L, num_pages, Pc, Hkv, C*D]
        self._scales: torch.Tensor | None = None  # [L, num_pages, Pc, Hkv, C], quantized only

    @property
    def allocated(self) -> bool:
        return self._data is not None

    def layer(self, layer: int) -> torch.Tensor:
        """``[num_pages, Pc, Hkv, C*D]`` values of one layer."""
        assert self._data is not None, "a tier is allocated before its first page is handed out"
        return self._data[layer]

    def scales(self, layer: int) -> torch.Tensor | None:
        """``[num_pages, Pc, Hkv, C]`` float32 scales of one layer (None: not quantized)."""
        return None if self._scales is None else self._scales[layer]

    def write(self, layer: int, pages: Sequence[int], values: torch.Tensor) -> None:
        """Store one sequence's prompt values ``[T, Hkv, D]`` in its ``pages`` (in chunk order).

        Pages handed out in a row are consecutive in the arena, so each run of them is one copy
        into a slice of the store: a DMA straight into pinned memory when the values are on the
        GPU, not a gather through pageable memory and a CPU scatter. A quantized store encodes
        on the values' device first, so only codes and scales are copied.
        """
        T, Hkv, D = values.shape
        Pc, C = self.layout.page_chunks, self.layout.chunk_size
        n = -(-T // C)
        parts = [(values, self._data, D)]  # (per-token rows [T, Hkv, W], arena, W)
        if self.layout.quantized:
            codes, scales = quantize_fp8(values)  # [T, Hkv, D] uint8, [T, Hkv] float32
            parts = [(codes, self._data, D), (scales[..., None], self._scales, 1)]
        for src, arena, W in parts:
            assert arena is not None, "a tier is allocated before its first page is handed out"
            # Padding tokens of a chunk: zero codes (0.0) and zero scales.
            padded = src.new_zeros(n * C, Hkv, W, dtype=arena.dtype)
            padded[:T] = src
            rows = padded.view(n, C, Hkv, W).transpose(1, 2).reshape(n, Hkv, C * W)
            store = arena[layer]  # [num_pages, Pc, Hkv, C * W]
            for first, count, chunk in page_runs(pages[: -(-n // Pc)], Pc):
                end = min(n, chunk + count * Pc)
                dst = store[first : first + count].view(-1, Hkv, C * W)[: end - chunk]
                dst.copy_(rows[chunk:end], non_blocking=True)

    def read(
        self, layer: int, pages: torch.Tensor, chunks: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Stored values ``[K, C, Hkv, D]`` (float32 for fp8 codes, else the store dtype) of
        chunk ``chunks[k, h]`` of KV head ``h``, for a sequence whose ``pages [n]`` (int64, on
        ``device``) hold its chunks in order: what ``gather_values`` fetches, read whole."""
        assert self._data is not None, "a tier is allocated before its first page is handed out"
        K, Hkv = chunks.shape
        Pc, C = self.layout.page_chunks, self.layout.chunk_size
        src = pages[chunks // Pc] * Pc + chunks % Pc  # [K, Hkv] store rows
        at = (src.to(self._data.device), torch.arange(Hkv, device=self._data.device)[None, :])
        vals = self._data[layer].reshape(-1, Hkv, self._data.shape[-1])[at].to(device)
        vals = vals.view(K, Hkv, C, -1)
        if self._scales is not None:  # fp8 codes times each token's scale
            s = self._scales[layer].reshape(-1, Hkv, C)[at].to(device)  # [K, Hkv, C]
            vals = fp8_to_float(vals) * s[..., None]
        return vals.transpose(1, 2)

    def disable(self) -> None:
        """Hand out no pages from now on (the arena could not be allocated)."""
        self.pages.retire()

    def allocate(self) -> None:
        if self._data is not None or self.pages.capacity == 0:
            return
        lay = self.layout
        head = (lay.num_layers, self.pages.num_pages)
        try:
            data = self._empty((*head, *lay.page_shape), lay.store_dtype)
            scales = self._empty((*head, *lay.scale_shape), SCALE_DTYPE) if lay.quantized else None
        except RuntimeError as err:  # pinned or device allocation refused (e.g. ShadowKV issue #20)
            gib = self.pages.num_pages * self.layout.page_bytes / 2**30
            where = "pinned host" if self.pin else str(self.device)
            raise CacheCapacityError(
                f"could not allocate the {gib:.1f} GiB {self.name} value tier in {where} memory "
                f"({err}); {self.fix}"
            ) from err
        self._data, self._scales = data, scales  # both or neither

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not self.pin:
            return torch.empty(shape, dtype=dtype, device=self.device)
        t = pinned_empty(shape, dtype)
        weakref.finalize(self, unpin, t)  # unpinned before it can be freed
        return t


class ValueStore:
    """The two value tiers of one layout; each sequence's pages come wholly from one, host first.

    The store owns the values' dtype and element size (``layout``): what the device reads back
    is converted to the buffer's dtype by ``gather_values``.
    """

    def __init__(
        self, layout: ValueLayout, host_bytes: int, device_bytes: int, device: torch.device
    ) -> None:
        self.layout = layout
        self.tiers = (
            ValueTier(
                HOST, layout, host_bytes, torch.device("cpu"), pin=device.type == "cuda",
                fix="set ShadowKVConfig.host_memory_gb lower",
            ),
            ValueTier(
                DEVICE, layout, device_bytes, device, pin=False,
                fix="set ShadowKVConfig.device_value_memory_gb or EngineConfig.cache_memory_gb "
                "lower",
            ),
        )
        self.tiers[DEVICE].allocate()  # part of the device budget, like the other device pools
        self.planning = False  # reservations count pages without allocating (see planning())

    @contextlib.contextmanager
    def planning_mode(self) -> Iterator[None]:
        """Reservations inside count pages but allocate no tier (a batch-size search)."""
        self.planning = True
        try:
            yield
        finally:
            self.planning = False

    def placement(self, num_chunks: int) -> int | None:
        """The tier a sequence of ``num_chunks`` chunks would go to now, or None if neither fits."""
        need = self.layout.pages_for(num_chunks)
        return next((i for i, t in enumerate(self.tiers) if need <= t.pages.num_free), None)

    def fits_empty(self, num_chunks: int) -> bool:
        return any(self.layout.pages_for(num_chunks) <= t.pages.capacity for t in self.tiers)

    def shortfall(self, num_chunks: int) -> str:
        """Why a sequence's values cannot be placed now (neither tier has the pages)."""
        host, dev = (t.pages for t in self.tiers)
        return (
            f"value store: needs {self.layout.pages_for(num_chunks)} pages of "
            f"{self.layout.page_tokens} tokens in one tier, but the host tier has "
            f"{host.num_free} free of {host.capacity} and the device tier {dev.num_free} free of "
            f"{dev.capacity}; enlarge the host tier (ShadowKVConfig.host_memory_gb, "
            "--host-memory-gb) or the device tier (ShadowKVConfig.device_value_memory_gb, "
            "--device-value-memory-gb, taken from EngineConfig.cache_memory_gb), lower the "
            "number of concurrent sequences, or wait for running requests to finish"
        )

    def prepare(self, tier: int) -> None:
        """Allocate ``tier``'s arena before its first pages are handed out (not while planning).

        A host arena that cannot be had (pinning refused) turns the host tier off for good,
        with a warning, rather than retrying a multi-GiB allocation at every admission; the
        ``TierUnavailable`` tells the caller to place the sequence again.
        """
        if self.planning:
            return
        try:
            self.tiers[tier].allocate()
        except CacheCapacityError as err:
            if tier != HOST:
                raise
            warnings.warn(
                f"{err}; continuing without the host value tier", RuntimeWarning, stacklevel=3
            )
            self.tiers[HOST].disable()
            raise TierUnavailable(str(err)) from err

    def live_tiers(self) -> tuple[int, ...]:
        """The tiers whose memory is allocated (a tier stays allocated once it is)."""
        return tuple(i for i, t in enumerate(self.tiers) if t.allocated)

    def layer(self, tier: int, layer: int) -> torch.Tensor:
        return self.tiers[tier].layer(layer)

    def scales(self, tier: int, layer: int) -> torch.Tensor | None:
        return self.tiers[tier].scales(layer)

    def write(self, tier: int, layer: int, pages: Sequence[int], values: torch.Tensor) -> None:
        self.tiers[tier].write(layer, pages, values)

    def read(
        self, tier: int, layer: int, pages: torch.Tensor, chunks: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        return self.tiers[tier].read(layer, pages, chunks, device)
