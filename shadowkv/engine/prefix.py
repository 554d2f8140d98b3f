"""Prefix sharing: an LRU store of prefilled prompts, found again by hashes of token blocks.

After a prompt's prefill the engine keeps its per-layer keys and values (``PromptKV`` layers,
host memory) cut to whole ``BLOCK``-token blocks. A later prompt that starts with the same
tokens — another question about the same document, or the next turn of a conversation (previous
prompt + answer + new message) — gets the stored prefix as its first prefill chunk, replayed
into the cache without running the model (``replay_prefix``), and runs the model on its suffix
alone: the suffix's chunks attend to the earlier tokens as any later chunk of a token-chunked
prefill does (``AttentionCache.prefill``). Prefill attention is exact in every method, so a
shared prefill computes what an unshared one does, for fewer tokens (up to float rounding of
the prefix K/V computed in a longer batch).

Matching is vLLM-style: block ``i`` of a prompt hashes ``(hash of block i-1, its tokens)``, so
one hash names a whole prefix; the longest stored hash chain wins and its tokens are compared
exactly before use. Entries are evicted least recently used under ``budget_bytes``. A prefix is
copied into the cache when its request is admitted (``PrefixUse``, read at once), so an entry
evicted while a request waits is simply not found when it is admitted (it prefills the prefix
again), and one evicted later takes nothing from a prefill already under way.

With a cache that shares its own pages (``AttentionCache.supports_shared_prefix``: dense and
the sparse baselines' paged pool) an entry holds a ``SharedPrefix`` instead of a host copy: one
reference to the cache pages of the prompt's first whole blocks, kept when its prefill ends
(``put_shared``). A later prompt is admitted holding those pages too and prefills only its
suffix, so the prefix's memory is shared as well as its computation. Such entries take no host
memory and do not count against ``budget_bytes``: the cache pool bounds them, and the engine
evicts them, least recently used first, whenever it needs their pages for a sequence
(``evict_shared``). Evicting one drops the store's reference alone: sequences started from it
hold their own, so a page is never read after it is freed.

Without such a cache (ShadowKV, window layers) what is shared is the prefill computation (time
to first token), not the cache's memory: each sequence stores its own copy of the prompt in its
method's representation.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shadowkv.cache.base import AttentionCache, SharedPrefix
from shadowkv.cache.layered import LayeredCache
from shadowkv.engine.prompt_kv import RecordingCache

BLOCK = 16  # tokens per hashed block: the granularity of a match

KV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (k post-RoPE, v, k_pre), each [M, Hkv, D]


def block_hashes(tokens: Sequence[int], block: int = BLOCK) -> list[int]:
    """Chained hashes of the whole blocks of ``tokens``: entry ``i`` names blocks ``0..i``."""
    out: list[int] = []
    parent = 0
    for s in range(0, len(tokens) - block + 1, block):
        parent = hash((parent, tuple(tokens[s : s + block])))
        out.append(parent)
    return out


def shared_tokens(tokens: Sequence[int], other: Sequence[int], block: int = BLOCK) -> int:
    """Leading whole blocks of ``tokens`` that ``other`` starts with too, in tokens, leaving at
    least one token to prefill: what ``other``'s stored prompt would give ``tokens``."""
    limit, n = (len(tokens) - 1) // block, 0
    while n < limit and tokens[n * block : (n + 1) * block] == other[n * block : (n + 1) * block]:
        n += 1
    return n * block


@dataclass(eq=False)
class PrefixEntry:
    """One stored prompt prefix: its tokens (whole blocks), block hashes, and either its
    per-layer K/V (host copies, ``nbytes``) or the cache's own pages of it (``shared``)."""

    tokens: tuple[int, ...]
    hashes: list[int]
    layers: tuple[KV, ...]
    nbytes: int
    shared: SharedPrefix | None = None


@dataclass(frozen=True)
class PrefixUse:
    """The first ``num_tokens`` tokens of a stored entry, as one request's prompt starts. It is
    read at once (``replay_prefix`` copies it into the cache at admission), so an entry is never
    held across steps: evicting it later takes nothing from a running prefill."""

    entry: PrefixEntry
    num_tokens: int

    def layer(self, layer: int) -> KV:
        """The prefix's ``(k, v, k_pre)`` of one layer, ``[num_tokens, Hkv, D]`` each."""
        k, v, k_pre = self.entry.layers[layer]
        n = self.num_tokens
        return k[:n], v[:n], k_pre[:n]


class PrefixStore:
    """Stored prompt prefixes, least recently used first, host copies within ``budget_bytes``.
    ``release`` drops an evicted entry's reference to shared cache pages."""

    def __init__(
        self, budget_bytes: int, block: int = BLOCK,
        release: Callable[[SharedPrefix], None] | None = None,
    ) -> None:
        self.budget_bytes, self.block, self.release = budget_bytes, block, release
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # by id, LRU first
        self._index: dict[int, PrefixEntry] = {}  # block hash -> an entry holding that chain
        self._ids = itertools.count()
        self._id_of: dict[int, int] = {}  # id(entry) -> key in _entries
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _match(self, tokens: Sequence[int]) -> tuple[PrefixEntry | None, int]:
        """The entry holding the longest stored whole-block prefix of ``tokens`` that leaves at
        least one token to prefill (its logits start the answer), and that prefix's length."""
        limit = (len(tokens) - 1) // self.block
        best: PrefixEntry | None = None
        num_blocks = 0
        for i, h in enumerate(block_hashes(tokens[: limit * self.block], self.block)):
            entry = self._index.get(h)
            if entry is None:
                break
            best, num_blocks = entry, i + 1
        n = num_blocks * self.block
        if best is None or tuple(tokens[:n]) != best.tokens[:n]:  # a hash collision: never
            return None, 0  # share wrong tokens
        return best, n

    def cached_tokens(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` a ``find_prefix`` now would give (the
        scheduler charges a prompt only its other tokens)."""
        return self._match(tokens)[1]

    def find_prefix(self, tokens: Sequence[int], touch: bool = True) -> PrefixUse | None:
        """The longest stored whole-block prefix of ``tokens`` that leaves at least one token to
        prefill (with ``touch``, the entry becomes the most recently used); None when none
        matches."""
        best, n = self._match(tokens)
        if best is None:
            return None
        if touch:
            self._entries.move_to_end(self._id_of[id(best)])
        return PrefixUse(best, n)

    def holds(self, tokens: Sequence[int]) -> bool:
        """Whether an entry holds exactly the whole blocks of ``tokens`` (it is then the most
        recently used: storing them again would add nothing)."""
        n = len(tokens) // self.block * self.block
        if n == 0:
            return False
        held = self._index.get(block_hashes(tokens[:n], self.block)[-1])
        if held is None or len(held.tokens) != n or held.tokens != tuple(tokens[:n]):
            return False
        self._entries.move_to_end(self._id_of[id(held)])
        return True

    def put(self, tokens: Sequence[int], layers: Sequence[KV]) -> bool:
        """Store a prefilled prompt's whole blocks (``layers``: per layer ``(k, v, k_pre)``
        ``[T, Hkv, D]``, kept by reference); evicts entries, least recently used first, to
        fit. Says whether it was stored."""
        n = len(tokens) // self.block * self.block
        if n == 0 or self.holds(tokens):
            return False
        kept = tuple(tuple(t[:n] for t in kv) for kv in layers)
        nbytes = sum(t.numel() * t.element_size() for kv in kept for t in kv)
        if nbytes > self.budget_bytes:
            return False
        self._make_room(nbytes)
        self._add(self._entry(tokens[:n], kept, nbytes))
        return True

    def put_shared(self, tokens: Sequence[int], prefix: SharedPrefix) -> bool:
        """Store ``prefix`` (the cache's pages of the first ``prefix.num_tokens`` of
        ``tokens``; the store takes over its reference) under its whole blocks. Says whether it
        was stored; when not, the reference is released at once."""
        n = min(len(tokens), prefix.num_tokens) // self.block * self.block
        if n == 0 or self.holds(tokens[:n]):
            self._release(prefix)
            return False
        self._add(self._entry(tokens[:n], (), 0, prefix))
        return True

    def _entry(
        self, tokens: Sequence[int], layers: tuple[KV, ...], nbytes: int,
        shared: SharedPrefix | None = None,
    ) -> PrefixEntry:
        return PrefixEntry(tuple(tokens), block_hashes(tokens, self.block), layers, nbytes, shared)

    def _release(self, prefix: SharedPrefix) -> None:
        if self.release is None:
            raise RuntimeError("a PrefixStore holding shared cache pages needs release=")
        self.release(prefix)

    def _add(self, entry: PrefixEntry) -> None:
        """Index a new entry (the most recently used); drop entries it makes redundant."""
        hashes, nbytes = entry.hashes, entry.nbytes
        key = next(self._ids)
        self._entries[key] = entry
        self._id_of[id(entry)] = key
        for h in hashes:  # the newest entry answers for every chain it holds
            self._index[h] = entry
        self.nbytes += nbytes
        # An entry whose blocks the new one holds all of (the previous turn of this
        # conversation) adds nothing: drop it.
        for old in list(self._entries.values()):
            if old is not entry and self._index.get(old.hashes[-1]) is entry:
                self.evict(old)

    def _make_room(self, nbytes: int) -> None:
        """Evict least recently used entries until ``nbytes`` more fit the budget."""
        for old in list(self._entries.values()):
            if self.nbytes + nbytes <= self.budget_bytes:
                break
            self.evict(old)

    def evict(self, entry: PrefixEntry) -> None:
        """Forget ``entry``."""
        key = self._id_of.pop(id(entry), None)
        if key is None:
            return
        del self._entries[key]
        self.nbytes -= entry.nbytes
        if entry.shared is not None:
            self._release(entry.shared)
        for h in entry.hashes:
            if self._index.get(h) is entry:
                other = next((e for e in reversed(self._entries.values()) if h in e.hashes), None)
                if other is None:
                    del self._index[h]
                else:
                    self._index[h] = other

    def evict_shared(
        self, frees: Callable[[SharedPrefix], bool], keep: PrefixEntry | None = None
    ) -> bool:
        """Evict the least recently used entry of cache pages whose eviction ``frees`` memory
        now (pages no sequence or other entry holds; evicting an entry whose pages running
        sequences hold gains nothing), other than ``keep`` (the one a waiting request is about
        to start from); says whether there was one."""
        old = next(
            (
                e for e in self._entries.values()
                if e.shared is not None and e is not keep and frees(e.shared)
            ),
            None,
        )
        if old is None:
            return False
        self.evict(old)
        return True

    def shared_prefixes(self) -> list[SharedPrefix]:
        """The cache pages every entry holds (``AttentionCache.prefix_memory`` counts them)."""
        return [e.shared for e in self._entries.values() if e.shared is not None]

    def clear(self) -> None:
        """Evict everything."""
        for e in list(self._entries.values()):
            self.evict(e)


def frees_pages(cache: AttentionCache | LayeredCache, prefix: SharedPrefix) -> bool:
    """Whether releasing ``prefix`` would free a page now: one it alone holds."""
    if isinstance(cache, LayeredCache):
        return any(frees_pages(c, part) for c, part in zip(cache.parts, prefix.detail))
    return any(
        cache.pool(name).refcount(page) == 1
        for name, pages in prefix.pages.items()
        for page in pages
    )


def replay_prefix(
    use: PrefixUse, cache: AttentionCache, seq_id: int, recording: RecordingCache | None
) -> None:
    """Store a stored prefix into ``cache`` as the first ``use.num_tokens`` prompt tokens of
    ``seq_id`` (a prefill chunk that runs no layers), and into ``recording`` when the prompt is
    recorded (it then holds the whole prompt, for the store and for replays)."""
    cache.begin_prefill(seq_id, use.num_tokens, 0)
    dev = cache.device
    for layer in range(len(use.entry.layers)):
        kv = use.layer(layer)
        cache.store_prompt(layer, *(t.to(dev) for t in kv))
        if recording is not None:
            recording.layers.setdefault(layer, []).append(kv)  # read-only host tensors
    cache.end_prefill()
