"""Tokenizer-aware length fitting for the RULER generator.

`token_counter` turns a tokenizer into a `text -> number of tokens` function, and `fit_size`
finds the largest task size whose prompt fits a token budget by a bracketed binary search.
`LENGTH_SLACK` is how far below the target a fitted sample may fall before `ruler` refits it on
its own content.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

# A sample more than this fraction of the target below it is refitted on its own content.
LENGTH_SLACK = 0.02


class Tokenizer(Protocol):
    def encode(self, text: str) -> Any: ...


def token_counter(tokenizer: Tokenizer) -> Callable[[str], int]:
    """`text -> len(tokenizer.encode(text))`, passing `add_special_tokens=False` when supported.

    Accepts lists of ids and objects with `.ids` (a `tokenizers.Encoding`)."""
    encode = tokenizer.encode
    try:
        encode("", add_special_tokens=False)  # type: ignore[call-arg]
        kwargs: dict[str, Any] = {"add_special_tokens": False}
    except TypeError:
        kwargs = {}

    def count(text: str) -> int:
        encoded = encode(text, **kwargs)
        return len(getattr(encoded, "ids", encoded))

    return count


def fit_size(
    tokens_at: Callable[[int], int],
    budget: int,
    min_size: int,
    what: str = "",
    guess: int | None = None,
) -> int:
    """Largest `size >= min_size` with `tokens_at(size) <= budget`, assuming tokens grow with size.

    Without a `guess`, one is estimated linearly from probes at `min_size` and just above. A
    geometric bracket around the guess is then bisected."""
    cache: dict[int, int] = {}

    def fits(size: int) -> bool:
        if size not in cache:
            cache[size] = tokens_at(size)
        return cache[size] <= budget

    def too_short() -> ValueError:
        return ValueError(
            f"target too short for {what or 'this task'}: the smallest prompt needs "
            f"{cache[min_size]} tokens, the budget is {budget}"
        )

    if guess is None:
        if not fits(min_size):
            raise too_short()
        probe = 2 * min_size + 16
        fits(probe)
        per_unit = max(cache[probe] - cache[min_size], 1) / (probe - min_size)
        guess = min_size + int((budget - cache[min_size]) / per_unit)
    guess = max(guess, min_size)
    step = max(1, guess // 64)
    if fits(guess):
        lo = guess
        while fits(lo + step):
            lo, step = lo + step, 2 * step
        hi = lo + step
    else:
        hi = guess
        while True:
            lo = max(min_size, hi - step)
            if fits(lo):
                break
            if lo == min_size:
                raise too_short()
            hi, step = lo, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
