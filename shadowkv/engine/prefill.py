"""Prefills in progress and how a step shares its prefill budget (token-chunked prefill).

A step first decodes one token for every running request; the rest of
``EngineConfig.max_num_batched_tokens`` (at least ``MIN_CHUNK`` tokens) is the step's prefill
budget, spent first come, first served:

1. The *partial* prefill — the one prompt whose earlier chunks ran in earlier steps (at most one
   at a time) — advances by a chunk. When the next waiting prompt would fit whole in the other
   half of the budget, the partial takes at most half (at least ``MIN_CHUNK``); otherwise it takes
   it all. So a 122K-token prompt never holds short prompts back by more than a step, and a
   stream of short prompts never takes more than half of any step from it.
2. Waiting prompts are admitted in order while each fits whole in what is left.
3. When no prefill is partial, the next waiting prompt that does not fit whole starts with a chunk
   of what is left (if at least ``MIN_CHUNK``) and becomes the partial prefill.
4. Otherwise the step's prefills stop there: no prompt overtakes an earlier one. With prefix
   sharing they stop too at a prompt that starts like one this step completes (it waits a step
   and reuses those stored blocks: packed prompts cannot read each other's K/V), and, with a cache
   that stages chunked prompts (ShadowKV: from admission to the step's forward end), at a second
   prompt that starts from a stored prefix.

The chunks chosen run in one packed forward (``engine/ragged.py``).

A replayed prefill (``PromptKV``) runs no layers and is never chunked: it goes when it fits, or
as the step's first prefill. With ``EngineConfig.chunked_prefill=False`` every prompt prefills
whole: the first of a step whatever its size, the others while they fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shadowkv.engine.prompt_kv import RecordingCache
from shadowkv.engine.request import Request

MIN_CHUNK = 8  # the smallest chunk a step runs (and the least prefill budget a step has)


@dataclass
class PrefillState:
    """A prompt being prefilled: tokens done so far, the recording of its K/V (when the request
    asks for them, or its samples need a replay), and its prompt logprobs so far."""

    request: Request
    recording: RecordingCache | None
    done: int = 0
    logprobs: list = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.request.prompt_ids) - self.done


def partial_share(budget: int, remaining: int, next_waiting: int | None) -> int:
    """Tokens the partial prefill runs in a step with ``budget`` prefill tokens, when the next
    waiting prompt has ``next_waiting`` tokens (None: nothing waits)."""
    half = max(MIN_CHUNK, budget // 2)
    if next_waiting is not None and next_waiting <= budget - half:
        budget = half  # leave the rest to the short prompt waiting
    return min(remaining, budget)
