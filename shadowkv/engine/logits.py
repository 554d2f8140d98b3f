"""Per-request logit processors, applied to a step's batch before sampling, and logprobs.

Rows whose ``SamplingParams.processed`` is False are not touched (and a batch with none of them
costs one Python ``any``): penalties, logit bias, min_tokens and grammar masks are gathered over
the processed rows only, each as one batched tensor op.

* ``frequency_penalty`` / ``presence_penalty`` (OpenAI): ``l -= f * count + p * (count > 0)``
  over generated tokens.
* ``repetition_penalty`` (HF/vLLM): for tokens in the prompt or the output, ``l / r`` where
  ``l > 0``, ``l * r`` otherwise.
* ``logit_bias``: added to the named tokens.
* ``min_tokens``: EOS and stop tokens at ``-inf`` until that many tokens are out (unless a
  grammar allows nothing else: a complete document ends).
* ``json_schema``: the grammar matcher's mask (``engine/grammar.py``).

Logprobs are those of the model's own distribution (the raw logits), as vLLM reports by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from shadowkv.engine.grammar import Matcher, apply_masks
from shadowkv.engine.sampling import sample_batch

if TYPE_CHECKING:
    from shadowkv.engine.request import Request


MAX_LOGIT = 1e4  # processed logits are capped here, so a later ``/ temperature`` stays finite


@dataclass
class LogitState:
    """What a processed request carries between steps."""

    counts: torch.Tensor  # [V] fp32: generated tokens so far
    prompt_seen: torch.Tensor | None  # [V] bool: tokens of the prompt (repetition penalty only)
    bias_ids: torch.Tensor  # [n] int64
    bias_values: torch.Tensor  # [n] fp32
    matcher: Matcher | None = None
    stop_ids: list[int] = field(default_factory=list)  # masked while under min_tokens
    end_ids: list[int] = field(default_factory=list)  # EOS: what ends a row nothing else can


def new_state(
    req: Request, vocab: int, device: torch.device, stop_ids: Sequence[int],
    matcher: Matcher | None, end_ids: Sequence[int] = (),
) -> LogitState:
    p = req.params
    seen = None
    if p.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        ids = torch.tensor([t for t in req.prompt_ids if 0 <= t < vocab], dtype=torch.long)
        seen[ids.to(device)] = True
    bias = [(t, v) for t, v in p.logit_bias if t < vocab]  # type: ignore[misc]
    return LogitState(
        counts=torch.zeros(vocab, device=device),
        prompt_seen=seen,
        bias_ids=torch.tensor([t for t, _ in bias], dtype=torch.long, device=device),
        bias_values=torch.tensor([v for _, v in bias], dtype=torch.float32, device=device),
        matcher=matcher,
        stop_ids=sorted({t for t in (*stop_ids, *p.stop_token_ids) if t < vocab}),
        end_ids=sorted({t for t in (*end_ids, *stop_ids) if t < vocab}) or [0],
    )


def process(logits: torch.Tensor, reqs: Sequence[Request]) -> None:
    """Apply every processed request's processors to its row of ``logits [B, V]``, in place."""
    rows = [i for i, r in enumerate(reqs) if r.logit_state is not None]
    if not rows:
        return
    dev = logits.device
    sub_reqs = [reqs[i] for i in rows]
    states = [r.logit_state for r in sub_reqs]
    x = logits[rows]  # [R, V] (a copy, written back below)
    params = [r.params for r in sub_reqs]
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        counts = torch.stack([s.counts for s in states])  # type: ignore[union-attr]
        freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
        x -= freq * counts + pres * (counts > 0)
    reps = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0]
    if reps:
        seen = torch.stack(
            [states[j].prompt_seen | (states[j].counts > 0) for j in reps]  # type: ignore[operator,union-attr]
        )
        r = torch.tensor([params[j].repetition_penalty for j in reps], device=dev)[:, None]
        y = x[reps]
        y = torch.where(seen, torch.where(y > 0, y / r, y * r), y)
        x[reps] = y
    biased = [j for j, s in enumerate(states) if s.bias_ids.numel()]  # type: ignore[union-attr]
    if biased:
        row_ids = torch.cat(
            [torch.full_like(states[j].bias_ids, j) for j in biased]  # type: ignore[union-attr]
        )
        col_ids = torch.cat([states[j].bias_ids for j in biased])  # type: ignore[union-attr]
        vals = torch.cat([states[j].bias_values for j in biased])  # type: ignore[union-attr]
        x.index_put_((row_ids, col_ids), vals.to(x.dtype), accumulate=True)
    apply_masks(x, [s.matcher for s in states])  # type: ignore[union-attr]
    for j, (r_, s) in enumerate(zip(sub_reqs, states)):
        if len(r_.output_ids) < r_.params.min_tokens and s.stop_ids:  # type: ignore[union-attr]
            stops = x[j, s.stop_ids].clone()  # type: ignore[union-attr]
            x[j, s.stop_ids] = float("-inf")  # type: ignore[union-attr]
            if not torch.isfinite(x[j]).any():  # a complete JSON document: its end wins
                x[j, s.stop_ids] = stops  # type: ignore[union-attr]
    x.nan_to_num_(nan=float("-inf"), posinf=MAX_LOGIT).clamp_(max=MAX_LOGIT)
    dead = ~torch.isfinite(x).any(dim=-1)
    if dead.any():  # a grammar this vocabulary cannot write: the request ends (never NaNs)
        for j in dead.nonzero()[:, 0].tolist():
            x[j, states[j].end_ids] = 0.0  # type: ignore[union-attr]
    logits[rows] = x


@torch.inference_mode()
def sample_requests(logits: torch.Tensor, reqs: Sequence[Request]) -> list[int]:
    """One token per row of ``logits [B, V]`` for ``reqs``: processors applied, logprobs kept.

    A batch that asks for neither is exactly ``sample_batch`` (plus two ``any`` checks).
    """
    processed = any(r.logit_state is not None for r in reqs)
    want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    raw = logits[want] if want else None  # a copy: the model's own distribution
    if processed:
        process(logits, reqs)
    tokens = sample_batch(logits, [r.params for r in reqs], [r.generator for r in reqs])
    if raw is not None:
        ks = [reqs[i].params.logprobs or 0 for i in want]
        for i, lp in zip(want, logprobs_of(raw, [tokens[i] for i in want], ks)):
            reqs[i].logprobs.append(lp)
    if processed:
        accept(reqs, tokens)
    return tokens


def accept(reqs: Sequence[Request], tokens: Sequence[int]) -> None:
    """Advance each processed request's state by its sampled token."""
    for r, t in zip(reqs, tokens):
        s = r.logit_state
        if s is None:
            continue
        if 0 <= t < s.counts.shape[0]:
            s.counts[t] += 1
        if s.matcher is not None:
            s.matcher.accept(t)


TopLogprobs = list[tuple[int, float]]


def logprobs_of(
    logits: torch.Tensor, tokens: Sequence[int], k: Sequence[int]
) -> list[tuple[float, TopLogprobs]]:
    """Per row of ``logits [R, V]``: the log-probability of ``tokens[i]`` and the top ``k[i]``
    ``(id, logprob)`` pairs, best first (one host transfer)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(list(tokens), dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, idx[:, None])[:, 0]
    kmax = max(k, default=0)
    top = lp.topk(kmax, dim=-1) if kmax else None
    chosen_l = chosen.tolist()
    ids = top.indices.tolist() if top is not None else [[] for _ in tokens]
    vals = top.values.tolist() if top is not None else [[] for _ in tokens]
    return [
        (chosen_l[i], list(zip(ids[i][: k[i]], vals[i][: k[i]]))) for i in range(len(chosen_l))
    ]


def prompt_logprobs(
    logits_fn, prompt_ids: Sequence[int], k: int, chunk: int = 512
) -> list[tuple[float, TopLogprobs] | None]:
    """Logprobs of each prompt token given the ones before it (None for the first), computed in
    ``chunk``-position slices so ``[T, V]`` logits are never held at once.

    ``logits_fn(positions)`` gives the fp32 logits ``[n, V]`` at those positions.
    """
    n = len(prompt_ids)
    out: list[tuple[float, TopLogprobs] | None] = [None]
    for s in range(0, n - 1, chunk):
        e = min(n - 1, s + chunk)
        logits = logits_fn(torch.arange(s, e))
        out += logprobs_of(logits, prompt_ids[s + 1 : e + 1], [k] * (e - s))
    return out
