"""Sampling parameters and the samplers (greedy, temperature, top-k, top-p, seed).

``sample`` picks one row; ``sample_batch`` picks a decode step's rows with one host transfer.
What reshapes logits before sampling (penalties, logit bias, min_tokens, a JSON grammar) is in
``engine/logits.py``; a request that sets none of it takes neither that path nor its cost.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


class SamplingError(ValueError):
    """Invalid sampling parameters; the message names the field and the allowed range."""


GREEDY_BELOW = 1e-5  # temperatures under this sample greedily


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature=0`` (or below 1e-5) is greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # OpenAI's penalties on generated tokens: logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # HF/vLLM's: logits of tokens seen in the prompt or the output, divided by it when positive,
    # multiplied when negative (1 = off).
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()  # token id -> added
    min_tokens: int = 0  # EOS and stop tokens are masked until this many tokens are generated
    logprobs: int | None = None  # per sampled token its log-probability and this many top ones
    prompt_logprobs: int | None = None  # the same for every prompt token (from the prefill)
    # Output constrained to JSON that matches this schema ({"type": "object"}: any object),
    # by a grammar engine's token mask (``engine/grammar.py``).
    json_schema: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.stop_token_ids, int):
            object.__setattr__(self, "stop_token_ids", (self.stop_token_ids,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SamplingError(f"{name} must be a number, got {value!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(
                f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise SamplingError(
                f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}"
            )
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise SamplingError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        self._check_processors()

    def _check_processors(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SamplingError(f"{name} must be a number, got {value!r}")
            if not -2.0 <= value <= 2.0:
                raise SamplingError(f"{name} must be in [-2, 2], got {value!r}")
        rep = self.repetition_penalty
        if isinstance(rep, bool) or not isinstance(rep, (int, float)) or not 0.01 <= rep <= 10:
            raise SamplingError(f"repetition_penalty must be in [0.01, 10] (1 = off), got {rep!r}")
        bias = self.logit_bias
        pairs = tuple(bias.items()) if isinstance(bias, Mapping) else tuple(bias)
        for token, value in pairs:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise SamplingError(f"logit_bias keys must be token ids >= 0, got {token!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SamplingError(f"logit_bias values must be numbers, got {value!r}")
            if not -100 <= value <= 100:
                raise SamplingError(f"logit_bias values must be in [-100, 100], got {value!r}")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(v)) for t, v in pairs))
        m = self.min_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= self.max_tokens:
            raise SamplingError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {m!r}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20
            ):
                raise SamplingError(f"{name} must be an integer in [0, 20] or None, got {value!r}")
        if self.json_schema is not None:
            if not isinstance(self.json_schema, Mapping):
                raise SamplingError(
                    f"json_schema must be a JSON schema object, got {type(self.json_schema)}"
                )
            try:
                json.dumps(self.json_schema)
            except (TypeError, ValueError) as err:
                raise SamplingError(f"json_schema is not JSON: {err}") from err

    @property
    def processed(self) -> bool:
        """Whether logits are reshaped before sampling (``engine/logits.py``)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
            or self.json_schema is not None
        )

    @property
    def greedy(self) -> bool:
        # Below ~1e-5, logits / temperature overflows fp32 into NaN probabilities; argmax is the
        # limit of sampling there anyway.
        return self.temperature < GREEDY_BELOW


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
    gen.manual_seed(seed)
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from ``logits [V]`` (fp32)."""
    return int(_pick(logits, params, generator))


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token id per row of ``logits [B, V]`` (fp32), with one device->host transfer in all.

    Row ``i`` gives the same id as ``sample(logits[i], params[i], generators[i])`` and consumes
    ``generators[i]`` the same way, so seeded requests draw the same tokens either way.
    """
    if logits.dim() != 2:
        raise SamplingError(
            f"sample_batch needs logits [B, V], got shape {tuple(logits.shape)}; "
            "use sample() for a single row [V]"
        )
    if not len(params) == len(generators) == logits.shape[0]:
        raise SamplingError(
            f"sample_batch needs one SamplingParams and one generator per logits row: got "
            f"{logits.shape[0]} rows, {len(params)} params, {len(generators)} generators"
        )
    # All greedy rows in one argmax over the whole batch; non-greedy rows overwrite their slot
    # below. Arithmetic on a few extra rows is far cheaper than gathering the greedy ones.
    if any(p.greedy for p in params):
        ids = logits.argmax(dim=-1)  # [B] int64
    else:
        ids = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for i, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            ids[i] = _pick(logits[i], p, gen)  # device-to-device copy, no host sync
    return ids.tolist()  # the one host sync of the step


def _pick(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """The chosen id from ``logits [V]`` as a 0-d int64 tensor on the logits' device (no sync)."""
    if params.greedy:
        return logits.argmax()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        # Exactly k survivors even when logits tie at the k-th value (a threshold would keep all).
        top = torch.topk(logits, params.top_k)
        logits = torch.full_like(logits, float("-inf")).scatter_(0, top.indices, top.values)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        drop[0] = False  # a top_p under fp32's smallest value (5e-324) must not drop all
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]
