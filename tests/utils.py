"""Shared test helpers: per-dtype tolerances, a verbose closeness check, the passkey prompt."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

# (atol, rtol) per dtype, starting from torch.testing's defaults; fp64 is the oracle's own dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1.3e-6),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (1e-3, 1e-3),
}

PASSKEY_NEEDLE = "The secret passkey is 71432."
PASSKEY_ANSWER = "71432"
PASSKEY_HEADER = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it.\n\n"
)
PASSKEY_QUESTION = "\n\nWhat is the secret passkey? The secret passkey is"

# Sentence end, then whitespace, then a capital: where a needle may go without splitting a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def assert_close_verbose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    atol: float | None = None,
    rtol: float | None = None,
    what: str = "tensor",
    show: int = 5,
) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, else fail naming the first
    ``show`` mismatching indices with both values. Tolerances default to ``TOLERANCES[dtype]``."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    d_atol, d_rtol = TOLERANCES[expected.dtype]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())
    if not bad.any():
        return
    idx = bad.nonzero()[:show]
    lines = [
        f"  at {tuple(i.tolist())}: got {a[tuple(i)].item():.8g}, expected {e[tuple(i)].item():.8g}"
        for i in idx
    ]
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol:g}, rtol={rtol:g}, "
        f"max abs err {err.max().item():.3g})\n" + "\n".join(lines)
    )


def read_essays(path: Path) -> str:
    """All essay texts of a ``{"text": ...}`` per line ``.jsonl`` file, joined by blank lines."""
    with open(path, encoding="utf-8") as fh:
        return "\n\n".join(json.loads(line)["text"].strip() for line in fh if line.strip())


def passkey_prompt(
    corpus: str,
    tokenizer,
    num_tokens: int,
    depth: float = 0.5,
    needle: str = PASSKEY_NEEDLE,
) -> str:
    """A passkey-retrieval prompt of about ``num_tokens`` tokens (header + haystack + question).

    The haystack is the start of ``corpus`` (whitespace runs collapsed), cut at a sentence end;
    ``needle`` goes at the sentence boundary nearest ``depth`` (0 = start, 1 = end) of it.
    ``tokenizer`` needs only ``encode(text) -> list[int]``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    text = re.sub(r"\s+", " ", corpus).strip()
    frame = len(tokenizer.encode(PASSKEY_HEADER + needle + PASSKEY_QUESTION))
    budget = num_tokens - frame
    if budget <= 0:
        raise ValueError(f"num_tokens={num_tokens} leaves no room for a haystack ({frame} needed)")
    # Characters per token estimated from a sample, then trimmed until the haystack fits.
    sample = text[:20000]
    chars = int(budget * len(sample) / max(1, len(tokenizer.encode(sample))))
    if chars > len(text):
        raise ValueError(f"the corpus is too short for a {num_tokens}-token haystack")
    haystack = text[:chars]
    while len(tokenizer.encode(haystack)) > budget:
        haystack = haystack[: int(len(haystack) * 0.98)]
    ends = [m.start() for m in _SENTENCE_END.finditer(haystack)]
    if not ends:
        raise ValueError("the haystack has no sentence boundary to put the needle at")
    haystack = haystack[: ends[-1]]  # end on a whole sentence
    target = depth * len(haystack)
    cut = min(ends, key=lambda i: abs(i - target))
    haystack = f"{haystack[:cut]} {needle} {haystack[cut:].lstrip()}"
    return PASSKEY_HEADER + haystack + PASSKEY_QUESTION


def cache_for(
    mcfg,
    cfg,
    max_len: int,
    seqs: int = 4,
    memory: int = 2**24,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """``(cache, rope)``: the cache ``cfg`` names for a model of ``mcfg`` (the engine's way:
    the model's attention specs and RoPE tables), holding ``seqs`` sequences of ``max_len``."""
    from shadowkv.cache import make_cache
    from shadowkv.models.llama import attention_spec
    from shadowkv.models.rope import rope_tables

    device = torch.device(device)
    rope = rope_tables(mcfg.rope, mcfg.head_dim, max_len, mcfg.rope_style, device)
    specs = (attention_spec(mcfg),) * mcfg.num_layers
    return make_cache(specs, cfg, rope, device, dtype, seqs, max_len, memory), rope


def run_model(model, ids, positions, rope, cache, phase: str, logits_index=None) -> torch.Tensor:
    """``model`` over ``ids`` at ``positions`` with a fresh per-step context."""
    return model(ids, model.context(phase, positions, rope, cache), logits_index)


def greedy_with_logits(
    model, rope, cache, prompt: list[int], steps: int, seq_id: int = 0, chunk: int | None = None
):
    """Prefill (in ``chunk``-token chunks, or whole) then ``steps`` greedy decode steps of one
    sequence: (tokens, logits [steps+1, V])."""
    n, dev = len(prompt), rope.cos.device
    chunk = chunk or n
    cache.add_sequence(seq_id, n, steps + 1, staged=chunk < n)  # chunks stage (ShadowKV)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        cache.begin_prefill(seq_id, end - start, start)
        ids, pos = torch.tensor(prompt[start:end], device=dev), torch.arange(start, end, device=dev)
        last = torch.tensor([end - start - 1], device=dev)
        out = run_model(model, ids, pos, rope, cache, "prefill", logits_index=last)[0]
        cache.end_prefill()
    logits = [out]
    for _ in range(steps):
        cache.begin_decode([seq_id])
        pos = torch.tensor([cache.length(seq_id)], device=dev)
        logits.append(run_model(model, logits[-1].argmax()[None], pos, rope, cache, "decode")[0])
        cache.end_decode()
    out = torch.stack(logits)
    cache.free_sequence(seq_id)
    return out.argmax(-1).tolist(), out


def full_budget(prompt_len: int, chunk: int = 8, local: int = 4, outliers: int = 2) -> int:
    """The sparse budget (tokens) that selects every landmark chunk of a prompt."""
    return (prompt_len // chunk - local - outliers) * chunk


def small_cache_cfg(method: str):
    """``method`` at a 32-token budget (ShadowKV: 2 outlier chunks, rank 16): sparse on the
    tiny models' 40+-token prompts, dense fallback below."""
    from shadowkv.cache.methods import DenseConfig, method_config

    if method == "dense":
        return DenseConfig()
    extra = {"outlier_chunks": 2, "rank": 16} if method == "shadowkv" else {}
    return method_config(method, sparse_budget=32, **extra)


def count_forwards(engine, monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    """Rows of each ``run_layers`` call of ``engine``'s model from now on: every forward that
    runs the layers as one packed batch (prefills, mixed steps, the eager decode runner's)."""
    calls: list[int] = []
    real = engine.model.run_layers

    def counted(hidden, ctx, start, stop):  # type: ignore[no-untyped-def]
        calls.append(hidden[0].shape[0])
        return real(hidden, ctx, start, stop)

    monkeypatch.setattr(engine.model, "run_layers", counted)
    return calls
