"""The per-layer attention-cache interface every method implements.

The model calls ``prefill`` / ``decode`` once per layer; the engine calls the lifecycle methods
(``add_sequence``, ``begin_*``, ``free_sequence``) once per step. A cache is told what it serves
by a ``KVLayout`` (``cache/layout.py``) and never sees a model config; the model never knows which
method is in use.

Admission and free happen here, once for every method: a method says what a sequence needs
(``plan_admission``: pages from which of its ``PageAllocator``s), the base checks, takes them all
or none, and keeps them in the sequence's one ``SeqRecord``; freeing returns them.

Shapes: ``T`` prompt tokens, ``B`` decoding sequences, ``H`` query heads, ``Hkv`` KV heads,
``D`` head dim.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from shadowkv.cache.errors import CacheCapacityError, CacheOptionsError
from shadowkv.cache.layout import KVLayout
from shadowkv.cache.methods import CacheConfig
from shadowkv.cache.pages import PageAllocator
from shadowkv.kernels.varlen_attention.reference import causal_attention

__all__ = [
    "Admission",
    "AttentionCache",
    "CacheCapacityError",
    "CacheMemory",
    "CacheOptions",
    "CacheOptionsError",
    "PrefillChunk",
    "SeqRecord",
    "SharedPrefix",
]


@dataclass(frozen=True)
class CacheOptions:
    """One request's cache settings, within the method the engine runs.

    ``exact``: attend every token of this request exactly (no sparse selection; ShadowKV keeps
    its whole KV on the device). ``sparse_budget``: this request's budget, tokens (>= 1) or a
    fraction of its prompt (< 1), instead of the engine's; ShadowKV caps it at its own budget,
    which sizes the selection state.
    """

    exact: bool = False
    sparse_budget: float | None = None

    def __post_init__(self) -> None:
        if self.sparse_budget is not None and not self.sparse_budget > 0:
            raise CacheOptionsError(
                f"sparse_budget={self.sparse_budget} must be > 0 (tokens, or a fraction < 1)"
            )
        if self.exact and self.sparse_budget is not None:
            raise CacheOptionsError("exact attention has no budget: give exact or sparse_budget")


@dataclass(frozen=True)
class CacheMemory:
    """Bytes held by the cache: on the compute device, in host memory, and what dense would take."""

    device_bytes: int = 0
    host_bytes: int = 0
    dense_bytes: int = 0

    def __add__(self, other: CacheMemory) -> CacheMemory:
        return CacheMemory(
            self.device_bytes + other.device_bytes,
            self.host_bytes + other.host_bytes,
            self.dense_bytes + other.dense_bytes,
        )

    @property
    def device_ratio(self) -> float:
        """Dense bytes over device bytes (the paper's "GPU memory reduction")."""
        return self.dense_bytes / self.device_bytes if self.device_bytes else float("inf")

    def as_dict(self) -> dict[str, float]:
        return {
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "dense_bytes": self.dense_bytes,
            "device_reduction": round(self.device_ratio, 3) if self.device_bytes else None,
        }


@dataclass(frozen=True)
class Admission:
    """What admitting one sequence takes: ``needs`` pages from each named allocator (taken in
    this order), ``problem`` a reason it cannot fit that is not a page count, and ``detail`` the
    method's own plan for the sequence (ShadowKV: its row layout and value tier)."""

    needs: tuple[tuple[str, int], ...]
    detail: Any = None
    problem: str | None = None


@dataclass(frozen=True)
class PrefillChunk:
    """A planned prefill chunk: prompt tokens ``[start, start + num_tokens)`` of ``seq_id``, and
    ``detail``, the method's own plan of it (``AttentionCache.plan_chunk``)."""

    seq_id: int
    start: int
    num_tokens: int
    detail: Any = None

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(eq=False)
class SharedPrefix:
    """The cached state of the first ``num_tokens`` tokens of a prefilled prompt, kept for later
    sequences whose prompts start with the same tokens (prefix sharing, ``engine/prefix.py``).

    It holds one reference to each page in ``pages`` (by allocator) until ``release_prefix``;
    a sequence started from it holds one more reference to the pages it uses. Nothing writes
    those pages while a reference is held: shared state is read-only. ``detail`` is the
    method's own (ShadowKV: its basis slot, value tier and landmark counts).
    """

    num_tokens: int
    pages: dict[str, list[int]]
    detail: Any = None
    released: bool = False


@dataclass
class SeqRecord:
    """Everything a cache holds for one sequence: its slot row (index into per-sequence tables),
    its sizes and options, tokens cached so far, and the pages it holds per allocator (the
    pages of a shared prefix first, then its own)."""

    seq_id: int
    row: int
    prompt_len: int
    max_new_tokens: int
    options: CacheOptions
    pages: dict[str, list[int]] = field(default_factory=dict)
    length: int = 0  # tokens cached (prompt + generated)
    prefix: SharedPrefix | None = None  # the shared prefix it started from, if any
    prefix_tokens: int = 0  # its leading prompt tokens that prefix gave it


class AttentionCache(ABC):
    """Base class: shapes, the sequence records, and admission / free for every method."""

    def __init__(
        self,
        cfg: CacheConfig,
        layout: KVLayout,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
    ) -> None:
        self.cfg = cfg
        self.layout = layout
        self.device = device
        self.dtype = layout.dtype
        self.num_layers = layout.num_layers
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.scale = layout.spec.scale
        self.seqs: dict[int, SeqRecord] = {}
        self.allocators: dict[str, PageAllocator] = {}  # every pool a sequence draws pages from
        # Slot rows of per-sequence tables; row ``pad_row`` belongs to padding entries of
        # fixed-shape steps.
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.pad_row = max_num_seqs
        # Bumped when something a captured decode step bakes in changes (ShadowKV's selection
        # policy): the decode runner then drops its CUDA graphs.
        self.step_epoch = 0
        # Planned prefill chunks by sequence, and the one the per-layer calls serve.
        self._chunks: dict[int, PrefillChunk] = {}
        self._chunk: PrefillChunk

    # admission ---------------------------------------------------------------------------------
    def check_options(self, options: CacheOptions) -> None:
        """Raise ``CacheOptionsError`` when this method cannot honour ``options``."""

    def planning(self) -> contextlib.AbstractContextManager[None]:
        """Inside: reservations only count pages; memory a pool allocates lazily (ShadowKV's
        host value tier) is not allocated. For batch-size searches that free what they add."""
        return contextlib.nullcontext()

    def seq_config(self, options: CacheOptions | None) -> CacheConfig:
        """The cache settings one sequence runs with: the engine's, with its budget override."""
        if options is None or options.sparse_budget is None:
            return self.cfg
        return replace(self.cfg, sparse_budget=options.sparse_budget)  # type: ignore[call-arg]

    def new_tokens(self, prompt_len: int, max_new_tokens: int) -> int:
        """Generated tokens a sequence gets room for: what it asks, within the context."""
        return max(0, min(max_new_tokens, self.max_model_len - prompt_len))

    @abstractmethod
    def plan_admission(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions
    ) -> Admission:
        """What a sequence of this size needs (``max_new_tokens`` already within the context).
        Reads the pools' current state only to choose among them (ShadowKV's value tiers)."""

    def _problem(self, prompt_len: int, adm: Admission) -> str | None:
        if prompt_len > self.max_model_len:
            return (
                f"the prompt has {prompt_len} tokens, more than "
                f"max_model_len={self.max_model_len}"
            )
        if not self._free_rows:
            return f"all {self.max_num_seqs} sequence slots are in use"
        for name, num in adm.needs:
            why = self.allocators[name].shortfall(num)
            if why is not None:
                return why
        return adm.problem

    def _plan(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions | None, staged: bool,
        prefix: SharedPrefix | None = None, prefix_tokens: int = 0,
    ) -> tuple[Admission, dict[str, list[int]]]:
        """The sequence's own needs, and the pages of ``prefix`` it will hold (by allocator)."""
        new = self.new_tokens(prompt_len, max_new_tokens)
        options = options or CacheOptions()
        shared: dict[str, list[int]] = {}
        if prefix is not None and prefix_tokens > 0:
            if prefix.released:
                raise ValueError("a released shared prefix cannot start a sequence")
            adm, shared = self.plan_shared(prompt_len, new, options, prefix, prefix_tokens)
        else:
            adm = self.plan_admission(prompt_len, new, options)
        if staged and not shared:  # a sequence started from a shared prefix: plan_shared's
            adm = replace(adm, needs=adm.needs + self.staging_needs(prompt_len, new, options))
        return adm, shared

    def staging_needs(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions
    ) -> tuple[tuple[str, int], ...]:
        """Pages a prompt prefilled in chunks holds from its admission until its last chunk
        ends (ShadowKV's staging), on top of ``plan_admission``'s; reads only fixed sizes.
        Methods that store each chunk as it comes need none."""
        return ()

    def can_stage(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions | None = None
    ) -> bool:
        """Whether a prompt of this size could prefill in chunks with the staging pools empty
        (otherwise it must prefill whole). Reads only fixed sizes."""
        new = self.new_tokens(prompt_len, max_new_tokens)
        needs = self.staging_needs(prompt_len, new, options or CacheOptions())
        return all(num <= self.allocators[name].capacity for name, num in needs)

    def can_add(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions | None = None,
        staged: bool = False, prefix: SharedPrefix | None = None, prefix_tokens: int = 0,
    ) -> bool:
        """Whether a sequence of this worst-case size fits now (with ``staged``: and its
        staging, for a prompt that will prefill in chunks; with ``prefix``: starting from its
        first ``prefix_tokens`` tokens, whose pages it shares rather than takes)."""
        adm, _ = self._plan(prompt_len, max_new_tokens, options, staged, prefix, prefix_tokens)
        return self._problem(prompt_len, adm) is None

    def fits_empty(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions | None = None
    ) -> bool:
        """Whether a sequence of this size would fit with no other sequence in the cache.

        Must read only fixed sizes (the server calls it off the engine thread). Methods that
        cannot tell say True, and the engine then refuses the request when it reaches admission.
        """
        return True

    def add_sequence(
        self, seq_id: int, prompt_len: int, max_new_tokens: int,
        options: CacheOptions | None = None, staged: bool = False,
        prefix: SharedPrefix | None = None, prefix_tokens: int = 0,
    ) -> None:
        """Reserve room for a sequence's prompt and ``max_new_tokens`` new tokens (the engine's
        worst case, or less under optimistic admission: see ``grow``); raises
        ``CacheCapacityError`` when it cannot fit (then nothing is held). ``staged``: its prompt
        will prefill in chunks (or start from a stored prefix), so it also takes what staging
        needs (``staging_needs``) until its last chunk ends.

        ``prefix``, ``prefix_tokens``: the sequence starts from the first ``prefix_tokens``
        tokens of a shared prefix (``prefix_start`` says how many it may): it holds one more
        reference to the pages of the prefix it uses instead of taking its own, and its first
        ``prefix_tokens`` prompt tokens count as cached (its prefill starts there)."""
        options = options or CacheOptions()
        adm, shared = self._plan(
            prompt_len, max_new_tokens, options, staged, prefix, prefix_tokens
        )
        why = self._problem(prompt_len, adm)
        if why is not None:
            raise CacheCapacityError(why)
        self.prepare(adm)
        held = self._take(adm.needs)
        for name, pages in shared.items():
            self.allocators[name].retain(pages)
            held[name] = pages + held.get(name, [])
        new = self.new_tokens(prompt_len, max_new_tokens)
        rec = self.new_record(seq_id, self._free_rows.pop(), prompt_len, new, options, adm)
        rec.pages = held
        if shared or (prefix is not None and prefix_tokens > 0):
            rec.prefix, rec.prefix_tokens, rec.length = prefix, prefix_tokens, prefix_tokens
        self.seqs[seq_id] = rec
        self.on_admit(rec)

    def _take(self, needs: tuple[tuple[str, int], ...]) -> dict[str, list[int]]:
        """``needs`` pages from each named allocator, all or none (raises
        ``CacheCapacityError`` naming the short pool; then nothing is held)."""
        held: dict[str, list[int]] = {}
        try:
            for name, num in needs:
                held[name] = self.allocators[name].alloc(num)
        except CacheCapacityError:
            for name, pages in held.items():
                self.allocators[name].release(pages)
            raise
        return held

    # prefix sharing: read-only pages several sequences hold ------------------------------------
    # A prefilled sequence's first tokens can outlive it as a ``SharedPrefix`` (``share_prefix``:
    # one more reference to their pages). A later sequence whose prompt starts with the same
    # tokens is admitted with it (``add_sequence(..., prefix=, prefix_tokens=)``): the method
    # says which of the prefix's pages it holds and what it needs of its own (``plan_shared``),
    # and its prefill starts after the shared tokens. A page is freed by its last holder.
    supports_shared_prefix = False
    share_unit = 1  # a shared prefix is a whole number of these tokens (the page size)

    def will_share_prefixes(self) -> None:
        """The engine will keep prefixes of this cache's pages (its prefix store is on): a
        method may then keep, per prompt, what only a sequence started from one of its prefixes
        reads (ShadowKV: exact keys for the suffix prefill). Called once, before admissions."""

    def share_prefix(self, seq_id: int, num_tokens: int) -> SharedPrefix | None:
        """Keep the state of ``seq_id``'s first ``num_tokens`` prompt tokens (rounded down to
        whole ``share_unit``s) for later sequences; None when the method or this sequence has
        nothing to share. Its prompt must be wholly cached."""
        rec = self.seqs[seq_id]
        if rec.length < rec.prompt_len:
            raise ValueError(
                f"sequence {seq_id} has {rec.length} of {rec.prompt_len} prompt tokens cached; "
                "only a prefilled prompt can be shared"
            )
        n = min(num_tokens, rec.prompt_len) // self.share_unit * self.share_unit
        if not self.supports_shared_prefix or n == 0:
            return None
        prefix = self.make_prefix(rec, n)
        if prefix is not None:
            for name, pages in prefix.pages.items():
                self.allocators[name].retain(pages)
        return prefix

    def make_prefix(self, rec: SeqRecord, num_tokens: int) -> SharedPrefix | None:
        """The pages (and method detail) of ``rec``'s first ``num_tokens`` tokens (a whole
        number of ``share_unit``s); the base takes the references. None: nothing to share."""
        raise NotImplementedError(f"{type(self).__name__} cannot share a prefix")

    def release_prefix(self, prefix: SharedPrefix) -> None:
        """Drop the prefix's own references (sequences started from it keep theirs)."""
        if prefix.released:
            return
        prefix.released = True
        for name, pages in prefix.pages.items():
            self.allocators[name].release(pages)

    def prefix_start(
        self, prefix: SharedPrefix, prompt_len: int, max_new_tokens: int,
        options: CacheOptions | None, matched: int,
    ) -> int:
        """Leading tokens a sequence of this size whose prompt matches ``matched`` tokens of
        ``prefix`` may start from it: whole ``share_unit``s, leaving at least one token to
        prefill; 0 when it cannot (it then prefills them itself)."""
        if prefix.released or not self.supports_shared_prefix:
            return 0
        n = min(matched, prefix.num_tokens, prompt_len - 1)
        return max(0, n) // self.share_unit * self.share_unit

    def plan_shared(
        self, prompt_len: int, max_new_tokens: int, options: CacheOptions,
        prefix: SharedPrefix, prefix_tokens: int,
    ) -> tuple[Admission, dict[str, list[int]]]:
        """Admission of a sequence whose first ``prefix_tokens`` tokens come from ``prefix``:
        what it takes of its own (staging included, if its suffix needs any: ``staged`` adds
        nothing to it), and the prefix's pages it holds, by allocator (they go first in
        ``rec.pages``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot start from a shared prefix")

    # growth: optimistic admission (``EngineConfig.admission_reserve``) ------------------------
    # A sequence admitted with room for fewer new tokens than it may generate grows its
    # reservation while it decodes: the method re-plans it with the larger count
    # (``plan_growth``), the base takes the extra pages all or none and the method extends its
    # tables (``on_grow``). The prompt's own pages never change.
    def reserved_tokens(self, seq_id: int) -> int:
        """New tokens the sequence has room for (its reservation, beyond the prompt)."""
        return self.seqs[seq_id].max_new_tokens

    def plan_growth(self, rec: SeqRecord, max_new_tokens: int) -> Admission:
        """What ``rec`` needs in all with room for ``max_new_tokens`` (within the context): by
        default its admission re-planned. Pools it holds enough of already take nothing."""
        return self.plan_admission(rec.prompt_len, max_new_tokens, rec.options)

    def _growth(self, seq_id: int, max_new_tokens: int) -> tuple[SeqRecord, int, Admission]:
        """``(record, new tokens within the context, extra pages per allocator)``: growth
        never shrinks a pool's pages, and an empty ``needs`` means nothing to take."""
        rec = self.seqs[seq_id]
        new = max(rec.max_new_tokens, self.new_tokens(rec.prompt_len, max_new_tokens))
        adm = self.plan_growth(rec, new)
        extra = tuple(
            (name, num - len(rec.pages.get(name, [])))
            for name, num in adm.needs
            if num > len(rec.pages.get(name, []))
        )
        return rec, new, replace(adm, needs=extra)

    def growth_problem(self, seq_id: int, max_new_tokens: int) -> str | None:
        """Why ``seq_id`` cannot grow to room for ``max_new_tokens`` now, or None."""
        _, _, adm = self._growth(seq_id, max_new_tokens)
        for name, num in adm.needs:
            why = self.allocators[name].shortfall(num)
            if why is not None:
                return why
        return adm.problem

    def can_grow(self, seq_id: int, max_new_tokens: int) -> bool:
        """Whether ``grow(seq_id, max_new_tokens)`` would succeed now (takes nothing)."""
        return self.growth_problem(seq_id, max_new_tokens) is None

    def grow(self, seq_id: int, max_new_tokens: int) -> None:
        """Give a decoding sequence room for ``max_new_tokens`` new tokens in all (capped at the
        context; a smaller count than it holds changes nothing). Takes the extra pages all or
        none: raises ``CacheCapacityError`` naming the short pool, and then holds what it held."""
        why = self.growth_problem(seq_id, max_new_tokens)
        if why is not None:
            raise CacheCapacityError(why)
        rec, new, adm = self._growth(seq_id, max_new_tokens)
        added = self._take(adm.needs)
        for name, pages in added.items():
            rec.pages.setdefault(name, []).extend(pages)
        rec.max_new_tokens = new
        self.on_grow(rec, adm, added)

    def on_grow(self, rec: SeqRecord, adm: Admission, added: dict[str, list[int]]) -> None:
        """Extend the per-sequence tables of a grown sequence: ``added`` are the pages just
        appended to ``rec.pages``, ``adm`` its growth plan (``detail``: the method's new plan)."""

    def prepare(self, adm: Admission) -> None:
        """Before pages are taken: allocate memory a pool holds lazily (may raise)."""

    def new_record(
        self, seq_id: int, row: int, prompt_len: int, max_new_tokens: int,
        options: CacheOptions, adm: Admission,
    ) -> SeqRecord:
        """The record of an admitted sequence (methods with more per-sequence state extend it)."""
        return SeqRecord(seq_id, row, prompt_len, max_new_tokens, options)

    def on_admit(self, rec: SeqRecord) -> None:
        """Fill the per-sequence tables of a newly admitted sequence."""

    def free_sequence(self, seq_id: int) -> None:
        """Return a sequence's memory to the pools (nothing when it is not admitted)."""
        rec = self.seqs.pop(seq_id, None)
        if rec is None:
            return
        self._chunks.pop(seq_id, None)  # a chunk planned but never ended (a failed forward)
        self.on_free(rec)
        for name, pages in rec.pages.items():
            self.allocators[name].release(pages)
        self._free_rows.append(rec.row)

    def on_free(self, rec: SeqRecord) -> None:
        """Clear the per-sequence tables of a sequence being freed."""

    # Samples of one prompt (OpenAI's ``n``) share its prefill: the engine admits them all, runs
    # the prefill for the first and then forks its cache into the others. A method that cannot
    # fork leaves ``supports_fork`` False; the engine then replays the recorded prefill into
    # each sample (``store_prompt``: no model layers run, but the method's own prompt work does).
    supports_fork = False

    def fork(self, src_seq: int, dst_seq: int) -> None:
        """Copy prefilled ``src_seq``'s cached prompt into ``dst_seq``, admitted with the same
        prompt length and not yet prefilled; afterwards both decode independently."""
        raise NotImplementedError(f"{type(self).__name__} cannot fork a sequence")

    def length(self, seq_id: int) -> int:
        """Tokens cached for a sequence (prompt + generated)."""
        return self.seqs[seq_id].length

    # steps -------------------------------------------------------------------------------------
    # A prompt prefills in one or more chunks (token-chunked prefill): ``begin_prefill(seq, n,
    # start)`` plans prompt tokens ``[start, start + n)``, the layers' ``prefill`` calls store
    # them and attend over ``[0, start + n)``, and ``end_prefill`` makes them part of the
    # sequence. Only a sequence whose whole prompt is cached may decode.
    #
    # Several sequences' chunks may be planned at once (one ragged forward packs a step's
    # prefills, ``engine/ragged.py``): each ``begin_prefill`` keeps its ``PrefillChunk`` and makes
    # it the current one; ``select_prefill(seq)`` makes a planned chunk current again (no side
    # effects: a method's one-off work at a chunk's start runs in ``begin_prefill`` alone), and
    # the per-layer calls (``prefill``, ``store_prompt``, ``read_prompt``) serve the current one.
    # Whether a prompt split in chunks holds memory from its admission to its last chunk
    # (ShadowKV's staging pages, ``staging_needs``): the engine then starts at most one prompt
    # from a stored prefix per step, since that prefix is a first chunk planned at admission.
    stages_prompts = False

    def begin_prefill(self, seq_id: int, num_tokens: int, start: int = 0) -> None:
        """Plan a prefill of prompt tokens ``[start, start + num_tokens)`` of one sequence
        (chunks in order: ``start`` is the tokens already prefilled) and make it current."""
        rec = self.seqs[seq_id]
        if start != rec.length or start + num_tokens > rec.prompt_len or num_tokens < 1:
            raise ValueError(
                f"sequence {seq_id} has {rec.length} of {rec.prompt_len} prompt tokens cached; "
                f"it cannot prefill tokens [{start}, {start + num_tokens})"
            )
        chunk = PrefillChunk(seq_id, start, num_tokens)
        self._chunk = replace(chunk, detail=self.plan_chunk(chunk))
        self._chunks[seq_id] = self._chunk

    def plan_chunk(self, chunk: PrefillChunk) -> Any:
        """The method's own plan of a chunk (``PrefillChunk.detail``: dense, its pool slots)."""
        return None

    def select_prefill(self, seq_id: int) -> None:
        """Make the planned chunk of ``seq_id`` the current one."""
        self._chunk = self._chunks[seq_id]

    @property
    def prefill_end(self) -> int:
        """One past the last prompt token of the current prefill chunk."""
        return self._chunk.end

    def prefill_completes(self) -> bool:
        """Whether the current chunk is its prompt's last."""
        return self._chunk.end == self.seqs[self._chunk.seq_id].prompt_len

    def end_prefill(self, seq_id: int | None = None) -> None:
        """End the planned chunk of ``seq_id`` (default: the current one): its tokens are
        cached."""
        if seq_id is not None:
            self.select_prefill(seq_id)
        chunk = self._chunks.pop(self._chunk.seq_id)
        self.seqs[chunk.seq_id].length = chunk.end

    def check_decodable(self, seq_ids: list[int]) -> None:
        """Raise unless every sequence's whole prompt is cached (a partly prefilled prompt
        must not decode) and it holds room for one more token (else ``CacheCapacityError``:
        it must ``grow`` first)."""
        for s in seq_ids:
            rec = self.seqs[s]
            if rec.length < rec.prompt_len:
                raise ValueError(
                    f"sequence {s} has {rec.length} of its {rec.prompt_len} prompt tokens "
                    "prefilled; it cannot decode yet"
                )
            if rec.length >= rec.prompt_len + rec.max_new_tokens:
                raise CacheCapacityError(
                    f"sequence {s} generates past the {rec.max_new_tokens} new tokens reserved "
                    "at admission and by growth; grow it first (AttentionCache.grow)"
                )

    # A decode step is planned in two halves. On the host, ``decode_columns`` turns the step's
    # sequences into per-sequence integers and ``decode_widths`` into the plan's sizes; on the
    # device, ``plan_decode`` builds every index tensor the layers read from those columns with
    # device ops only. Because the device half reads nothing from the host, a fixed-shape step
    # (padded batch, widths rounded up: ``static=True``) can be captured in a CUDA graph together
    # with the model and replayed after copying in new columns (``engine/decode_runner.py``).
    supports_static_decode = False  # whether the three methods below are implemented

    def begin_decode(self, seq_ids: list[int]) -> None:
        """Plan one decode step (one new token per sequence): build index tensors once."""
        self.check_decodable(seq_ids)
        self._decode_seqs = list(seq_ids)
        cols = device_columns(self.decode_columns(seq_ids), self.device)
        self.plan_decode(cols, self.decode_widths(seq_ids, static=False))

    def begin_static_decode(self, seq_ids: list[int]) -> tuple[dict[str, list[int]], object]:
        """Host half of a fixed-shape step: ``(columns, widths)``; the caller pads the columns
        with ``pad_columns()`` and runs ``plan_decode`` (usually inside a CUDA graph)."""
        self.check_decodable(seq_ids)
        self._decode_seqs = list(seq_ids)
        return self.decode_columns(seq_ids), self.decode_widths(seq_ids, static=True)

    def decode_columns(self, seq_ids: list[int]) -> dict[str, list[int]]:
        """Per-sequence integers that plan a decode step (raises when a sequence cannot step)."""
        raise NotImplementedError(f"{type(self).__name__} plans decode steps in begin_decode")

    def pad_columns(self) -> dict[str, int]:
        """Column values of a padding entry of a fixed-shape batch: its token is written to
        scratch rows and attends to itself alone, touching no sequence's state."""
        raise NotImplementedError(f"{type(self).__name__} has no fixed-shape decode step")

    def decode_widths(self, seq_ids: list[int], static: bool) -> object:
        """The plan's sizes (hashable): exact for this batch, or with ``static`` rounded up to a
        few buckets that stay fixed while the batch's sequences do (a CUDA-graph key)."""
        raise NotImplementedError(f"{type(self).__name__} has no fixed-shape decode step")

    def plan_decode(self, cols: dict[str, torch.Tensor], widths: object) -> None:
        """Build the step's index tensors from device columns ``[B]`` (device ops only)."""
        raise NotImplementedError(f"{type(self).__name__} plans decode steps in begin_decode")

    def end_decode(self) -> None:
        for s in self._decode_seqs:
            self.seqs[s].length += 1

    # per layer -------------------------------------------------------------------------------
    def prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> torch.Tensor:
        """Cache a prompt chunk's keys/values and return exact causal attention ``[T, H, D]``
        of its queries over the earlier prompt tokens and the chunk.

        ``q [T, H, D]`` and ``k [T, Hkv, D]`` are post-RoPE; ``k_pre`` is the pre-RoPE key (after
        any projection bias), which low-rank methods factorise. Prefill attention is exact in
        every method (the paper's protocol), so only what is stored differs.
        """
        k_all, v_all = self.prefill_kv(layer, k, v, k_pre)
        return self.prompt_attention(q, k_all, v_all)

    # Whether ``prefill`` is ``prompt_attention`` = plain lower-right causal attention with
    # ``self.scale`` over ``prefill_kv``'s keys: a ragged forward then attends every segment of
    # such a layer in one ``varlen_attention`` call (``engine/ragged.py``). Window layers mask
    # differently and keep their own.
    causal_prefill = True

    def prefill_scale(self, layer: int) -> float | None:
        """The softmax scale of ``layer``'s prefill when it is plain causal (``causal_prefill``)
        over ``prefill_kv``'s keys, else None (then only ``prefill`` attends it)."""
        return self.scale if self.causal_prefill else None

    def prefill_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache a prompt chunk's keys/values (as ``prefill`` does) and return the post-RoPE keys
        and values ``[S, Hkv, D]`` its queries attend to: the earlier tokens from
        ``prompt_attend_from`` on, then the chunk's own ``T`` (``S >= T``). The earlier tokens
        are read back (``read_prompt``) before the chunk is stored: a ring (``WindowCache``) may
        overwrite them."""
        start = self._chunk.start
        lo = self.prompt_attend_from(start)
        if lo < start:
            k_old, v_old = self.read_prompt(layer, lo, start)  # [start - lo, Hkv, D]
            k_all = torch.cat([k_old.to(k.dtype), k])
            v_all = torch.cat([v_old.to(v.dtype), v])
        else:
            k_all, v_all = k, v
        self.store_prompt(layer, k, v, k_pre)
        return k_all, v_all

    def prompt_attend_from(self, start: int) -> int:
        """The first earlier prompt token a chunk starting at ``start`` attends to."""
        return 0

    def prompt_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Exact attention of a chunk's queries ``q [T, H, D]`` over keys ``[S >= T, Hkv, D]``
        ending with the chunk's own (lower-right causal)."""
        return causal_attention(q, k, v, self.scale)

    def read_prompt(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys and values ``[end - start, Hkv, D]`` of the planned sequence's prompt
        tokens ``[start, end)``, cached by earlier chunks (chunked prefill reads them)."""
        raise NotImplementedError(f"{type(self).__name__} cannot prefill a prompt in chunks")

    @abstractmethod
    def store_prompt(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> None:
        """Cache one layer of the planned prompt chunk (tokens ``[start, start + T)``), without
        attending.

        Also the replay path: a recorded prompt (``engine.prompt_kv``) is stored through it.
        """

    @abstractmethod
    def decode(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor
    ) -> torch.Tensor:
        """Append one token per sequence and return attention ``[B, H, D]`` for it."""

    # accounting ------------------------------------------------------------------------------
    def memory(self, seq_id: int | None = None) -> CacheMemory:
        """Bytes held for one sequence, or for all live sequences when ``seq_id`` is None: the
        pages held (device or host, by allocator), fixed per-sequence state, and what a dense
        cache of the tokens would take. A page several sequences share (a shared prefix) counts
        in each one's own figure, and once in the total."""
        ids = [seq_id] if seq_id is not None else list(self.seqs)
        recs = [self.seqs[s] for s in ids if s in self.seqs]
        device, host = self._page_bytes(rec.pages for rec in recs)
        device += sum(self.fixed_bytes(rec) for rec in recs)
        dense = sum(self.layout.dense_bytes(self.held_tokens(rec.length)) for rec in recs)
        return CacheMemory(device, host, dense)

    def prefix_memory(self, prefixes: list[SharedPrefix]) -> CacheMemory:
        """Bytes of the pages ``prefixes`` hold, each page once (``dense_bytes``: what a dense
        cache of their tokens would take)."""
        live = [p for p in prefixes if not p.released]
        device, host = self._page_bytes(p.pages for p in live)
        dense = sum(self.layout.dense_bytes(p.num_tokens) for p in live)
        return CacheMemory(device, host, dense)

    def _page_bytes(self, holdings: Iterable[dict[str, list[int]]]) -> tuple[int, int]:
        """(device, host) bytes of the pages in ``holdings`` (per-allocator page lists), each
        page counted once however many hold it."""
        seen: dict[str, set[int]] = {}
        for pages in holdings:
            for name, held in pages.items():
                seen.setdefault(name, set()).update(held)
        device = host = 0
        for name, held in seen.items():
            alloc = self.allocators[name]
            if alloc.on_host:
                host += len(held) * alloc.page_bytes
            else:
                device += len(held) * alloc.page_bytes
        return device, host

    def held_tokens(self, num_tokens: int) -> int:
        """Tokens of a sequence of ``num_tokens`` whose K/V the layers must keep: all of them,
        except in sliding-window layers (``cache/window.py``), which keep the window."""
        return num_tokens

    def fixed_bytes(self, rec: SeqRecord) -> int:
        """Device bytes a sequence holds outside page pools (per-slot state)."""
        return 0


def bucket(n: int, cap: int) -> int:
    """``n`` rounded up to a power of two, at most ``cap`` (and at least 1)."""
    return min(cap, 1 << max(0, n - 1).bit_length()) if n > 1 else 1


def device_columns(columns: dict[str, list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-sequence integer columns of a step plan, as ``int64 [B]`` tensors on ``device``.

    All columns travel in one copy of one ``[n, B]`` tensor; on CUDA it is staged in pinned
    memory and copied without blocking, so planning a step issues one transfer and no stream
    sync (a copy from pageable memory waits for the GPU to drain first).
    """
    host = torch.tensor(list(columns.values()), dtype=torch.int64).reshape(len(columns), -1)
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    elif host.device != device:
        host = host.to(device)
    return dict(zip(columns, host.unbind(0)))
