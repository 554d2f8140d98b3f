"""Which replica serves a request: the one holding its prompt's prefix, else the least loaded.

Plain Python (no Ray): the ingress deployment owns one ``PrefixRouter`` and asks it for every
generation request. Each replica's engine keeps its own prefix store (``engine/prefix.py``), so
a prompt that starts like an earlier one is cheaper on the replica that served the earlier one.

The router does not tokenise (that would load the tokenizer and chat template in the ingress and
put a tokenisation on every request's path): it hashes the request's *text* (``routing_text``)
with the engine's own chained block hashing (``block_hashes``) over character codes, in blocks
of ``BLOCK_CHARS`` characters (~16 tokens of English at ~4 characters a token, the engine's
``BLOCK``). Two prompts whose first ``k`` character blocks are equal start with the same tokens
up to where the tokenizer's merges could differ at the block edge, which is what the engine's
store needs to share them; the converse misses nothing that matters, since a shared prefix
shorter than a block is not shared by the engine either.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shadowkv.engine.prefix import BLOCK, block_hashes

BLOCK_CHARS = 4 * BLOCK  # characters per routing block: ~ the engine's 16-token block


@dataclass(frozen=True)
class RouterConfig:
    """``max_blocks``: leading blocks hashed per request (a prefix longer than this is told
    apart by its first ``max_blocks`` blocks alone; bounds the router's work per request).
    ``max_entries``: block hashes remembered (least recently used dropped first).
    ``max_imbalance``: a prefix's replica is preferred while it has at most this many more
    requests in flight than the least loaded live replica; beyond that the prefix is given up
    for balance (and re-homed on the replica that takes it)."""

    block_chars: int = BLOCK_CHARS
    max_blocks: int = 256
    max_entries: int = 65536
    max_imbalance: int = 4

    def __post_init__(self) -> None:
        for name in ("block_chars", "max_blocks", "max_entries"):
            if getattr(self, name) < 1:
                raise ValueError(f"RouterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_imbalance < 0:
            raise ValueError(f"RouterConfig.max_imbalance must be >= 0, got {self.max_imbalance}")


def routing_text(path: str, body: Any) -> str | None:
    """The text a generation request's prompt starts with, or None (no prefix to follow).

    ``/v1/completions``: the prompt string (or the first of a list of strings). Token-id prompts
    are hashed as their decimal ids. ``/v1/chat/completions``: the messages' roles and contents
    in order, which is what the chat template renders (tools and the template's own text are
    the same for every request, so they add nothing to tell prefixes apart).
    """
    if not isinstance(body, dict):
        return None
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        return "".join(_message_text(m) for m in messages)
    if path.endswith("/completions"):
        return _prompt_text(body.get("prompt"))
    return None


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):  # content parts: their text parts, in order
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return f"<{message.get('role', '')}>{content if isinstance(content, str) else ''}"


def _prompt_text(prompt: Any) -> str | None:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of prompts: route by the first
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return " ".join(map(str, prompt))
    return None


class PrefixRouter:
    """Picks a replica per request and remembers which replica each prompt prefix went to.

    ``choose(text, loads, up)``: ``loads[i]`` is replica ``i``'s requests in flight and
    ``up[i]`` whether it is taking requests. The longest remembered block-hash chain of ``text``
    names a preferred replica; it is taken when up and within ``max_imbalance`` of the least
    loaded up replica. Otherwise the least loaded up replica is taken (ties: the one after the
    last pick, so equal loads rotate). Every block hash of ``text`` then points at the pick, so
    the next request with that prefix follows it. ``forget(i)`` drops replica ``i``'s prefixes
    (it restarted with an empty prefix store).
    """

    def __init__(self, num_replicas: int, config: RouterConfig | None = None) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.num_replicas = num_replicas
        self.config = config or RouterConfig()
        self._owner: OrderedDict[int, int] = OrderedDict()  # block hash -> replica, LRU first
        self._last = -1  # the last least-loaded pick (rotates ties)
        self.prefix_picks = 0  # picks that followed a remembered prefix

    def hashes(self, text: str | None) -> list[int]:
        if not text:
            return []
        cfg = self.config
        head = text[: cfg.block_chars * cfg.max_blocks]
        return block_hashes([ord(c) for c in head], cfg.block_chars)

    def preferred(self, hashes: Sequence[int]) -> int | None:
        """The replica that served the longest remembered prefix of these hashes, if any."""
        owner = None
        for h in hashes:  # chained hashes: block i's hash names blocks 0..i
            if h not in self._owner:
                break
            owner = self._owner[h]
        return owner

    def choose(self, text: str | None, loads: Sequence[int], up: Sequence[bool]) -> int:
        if len(loads) != self.num_replicas or len(up) != self.num_replicas:
            raise ValueError(
                f"loads and up need one entry per replica ({self.num_replicas}), "
                f"got {len(loads)} and {len(up)}"
            )
        live = [i for i in range(self.num_replicas) if up[i]]
        if not live:
            raise NoReplicaError("no replica is up (all are starting or restarting)")
        hashes = self.hashes(text)
        least = min(loads[i] for i in live)
        pick = self.preferred(hashes)
        if pick is not None and up[pick] and loads[pick] - least <= self.config.max_imbalance:
            self.prefix_picks += 1
        else:
            pick = self._least_loaded(live, loads, least)
        self._remember(hashes, pick)
        return pick

    def _least_loaded(self, live: list[int], loads: Sequence[int], least: int) -> int:
        tied = [i for i in live if loads[i] == least]
        pick = next((i for i in tied if i > self._last), tied[0])
        self._last = pick
        return pick

    def _remember(self, hashes: Sequence[int], replica: int) -> None:
        for h in hashes:
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.config.max_entries:
            self._owner.popitem(last=False)

    def forget(self, replica: int) -> None:
        for h in [h for h, r in self._owner.items() if r == replica]:
            del self._owner[h]

    def __len__(self) -> int:
        return len(self._owner)


class NoReplicaError(RuntimeError):
    """Every replica is down: the ingress answers 503."""
