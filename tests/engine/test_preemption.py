"""Optimistic admission and preemption (``EngineConfig.admission_reserve``).

A small cache and a small reserve: requests are admitted with room for a few new tokens, grow
while they decode, and when the cache cannot grow the newest running request is preempted
(freed, requeued first) and later resumed by prefilling its prompt again and replaying its
tokens. The invariant: every request ends with exactly the tokens, text and finish reason it
gets generated alone, for every method, greedy and seeded sampling, with a stop string.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from utils import small_cache_cfg as cache_cfg

from shadowkv import LLM, EngineConfig, SamplingParams
from shadowkv.cache import CacheCapacityError
from shadowkv.engine.engine import Engine
from shadowkv.engine.prefix import frees_pages
from shadowkv.engine.request import Request, Status

METHODS = ["dense", "shadowkv", "quest", "loki", "streaming", "oracle"]
# Long enough for every sparse method to run sparse at the 32-token budget (ShadowKV: 80+).
LENGTHS = [90, 100, 84, 120, 96, 88, 110, 93]
PROMPTS = [[(k * i + k) % 90 + 3 for i in range(n)] for k, n in zip(range(5, 13), LENGTHS)]
MAX_TOKENS = [24, 20, 28, 16, 24, 22, 18, 26]
STOPPED = 4  # the request that gets a stop string (taken from its own unstopped text)
RESERVE = 4
# Per method: cache GiB where the default (worst-case) admission runs a few requests at a time
# and a reserve of 4 admits more than fit to the end, so some are preempted (asserted).
MEMORY = {
    "dense": 0.0008, "shadowkv": 0.0006, "quest": 0.0008, "loki": 0.0008, "streaming": 0.0008,
    "oracle": 0.0008,
}


@pytest.fixture(scope="module")
def path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", num_layers=4, vocab_size=96)


def make_engine(path: Path, method: str, staging_tokens: int = 0, **engine) -> Engine:
    """``staging_tokens``: ShadowKV's chunked-prefill staging pool; none by default, since
    these prompts prefill whole (the pool would come out of the budgets tuned above)."""
    cfg = EngineConfig(**{"cache_memory_gb": 0.01, "max_num_seqs": 8, **engine})
    cache = cache_cfg(method)
    if method == "shadowkv":
        cache = replace(cache, staging_tokens=staging_tokens)
    return LLM(str(path), cache=cache, engine=cfg, device="cpu").engine


def base_params() -> list[SamplingParams]:
    """Greedy, and seeded sampling with and without top-p and a frequency penalty (each request
    its own seed); every
    token's log-probability is reported (compared too: a wrong replayed token shows there even
    where the tiny model's choice does not change)."""
    out = []
    for i, n in enumerate(MAX_TOKENS):
        if i % 3 == 0:
            out.append(SamplingParams(max_tokens=n, logprobs=0))
        else:
            top_p, penalty = (0.9, 0.5) if i % 3 == 2 else (1.0, 0.0)  # + a logit state
            out.append(SamplingParams(
                max_tokens=n, temperature=0.8, top_p=top_p, seed=100 + i, logprobs=0,
                frequency_penalty=penalty, ignore_eos=True,  # long enough to be preempted
            ))
    return out


class Result:
    """A finished request's tokens, text, finish reason and token log-probabilities; equal
    to another when all are (log-probabilities to float rounding: batches differ)."""

    def __init__(self, req: Request) -> None:
        self.key = (req.output_ids, req.text, req.finish_reason)
        self.logprobs = [lp for lp, _ in req.logprobs]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Result) and self.key == other.key
            and self.logprobs == pytest.approx(other.logprobs, abs=1e-2)
        )

    def __repr__(self) -> str:
        return f"Result({self.key}, {self.logprobs})"


def run(
    engine: Engine, params: list[SamplingParams], one_by_one: bool = False,
    prompts: list[list[int]] = PROMPTS,
) -> list[Result]:
    """Every prompt with its params: all queued at once, or each run alone to its end."""
    reqs = []
    for prompt, p in zip(prompts, params):
        reqs.append(engine.add_request(prompt, p))
        while one_by_one and engine.has_unfinished():
            engine.step()
    while engine.has_unfinished():
        engine.step()
    return [Result(r) for r in reqs]


def idle(engine: Engine) -> None:
    assert not engine.has_unfinished()
    mem = engine.cache.memory()
    assert mem.device_bytes == 0 and mem.host_bytes == 0


def with_stop(path: Path, method: str) -> list[SamplingParams]:
    """The params, request ``STOPPED`` stopping at a word from the middle of its own text."""
    params = base_params()
    engine = make_engine(path, method)
    alone = engine.add_request(PROMPTS[STOPPED], params[STOPPED])
    while engine.has_unfinished():
        engine.step()
    word = engine.tokenizer.decode([alone.output_ids[len(alone.output_ids) // 2]]).strip()
    params[STOPPED] = replace(params[STOPPED], stop=(word,))
    return params


@pytest.mark.parametrize("method", METHODS)
def test_preempted_batch_equals_one_by_one(path: Path, method: str) -> None:
    params = with_stop(path, method)
    want = run(make_engine(path, method), params, one_by_one=True)
    assert want[STOPPED].key[2] == "stop"  # the stop string is met (it is a word of its text)
    assert any(len(set(r.key[0])) > 1 for r in want)
    worst = make_engine(path, method, cache_memory_gb=MEMORY[method])
    assert run(worst, params) == want
    assert worst.counters["preemptions"] == 0
    engine = make_engine(
        path, method, cache_memory_gb=MEMORY[method], admission_reserve=RESERVE
    )
    assert run(engine, params) == want
    assert engine.counters["preemptions"] > 0
    assert engine.counters["replayed_tokens"] > 0
    idle(engine)


@pytest.mark.parametrize("method", ["dense", "shadowkv"])
def test_fixed_shape_steps_follow_growth(path: Path, method: str) -> None:
    """Static (CUDA-graph-shaped) steps size their widths from the pages held, which growth
    changes: the tokens stay the eager ones."""
    params = base_params()
    want = run(make_engine(path, method), params, one_by_one=True)
    engine = make_engine(
        path, method, cache_memory_gb=MEMORY[method], admission_reserve=RESERVE,
        decode_mode="static",
    )
    assert run(engine, params) == want
    assert engine.counters["preemptions"] > 0
    idle(engine)


def step_until_preempted(engine: Engine) -> Request:
    """Step until a request with outputs waits again (preempted); returns it."""
    for _ in range(200):
        engine.step()
        for req in engine.waiting:
            if req.output_ids:
                return req
    raise AssertionError("no request was preempted")


def test_aborting_a_preempted_request_returns_memory(path: Path) -> None:
    engine = make_engine(path, "dense", cache_memory_gb=MEMORY["dense"], admission_reserve=2)
    reqs = [engine.add_request(p, s) for p, s in zip(PROMPTS, base_params())]
    victim = step_until_preempted(engine)
    assert victim.status is Status.WAITING and engine.waiting[0] is victim  # requeued first
    engine.abort(victim.request_id)
    assert victim.finish_reason == "abort" and victim not in engine.waiting
    while engine.has_unfinished():
        engine.step()
    assert all(r.finish_reason in ("stop", "length") for r in reqs if r is not victim)
    idle(engine)


def test_aborting_everything_mid_run_returns_memory(path: Path) -> None:
    engine = make_engine(path, "shadowkv", cache_memory_gb=MEMORY["shadowkv"], admission_reserve=2)
    reqs = [engine.add_request(p, s) for p, s in zip(PROMPTS, base_params())]
    step_until_preempted(engine)
    engine.step()  # the preempted one may be readmitted and replaying
    for r in reqs:
        engine.abort(r.request_id)
    idle(engine)


def test_a_preempted_request_keeps_prompt_logprobs_and_samples(path: Path, monkeypatch) -> None:
    """The newest request (two samples, prompt logprobs) is the one preempted: it resumes
    without computing its prompt logprobs again, each sample with its own generator."""
    params = [replace(p, max_tokens=24, ignore_eos=True) for p in base_params()[:3]]
    plp = SamplingParams(max_tokens=20, temperature=0.8, seed=7, prompt_logprobs=1,
                         ignore_eos=True)
    pair = [plp, replace(plp, seed=8)]

    def go(engine: Engine) -> tuple[list[Result], list[Request]]:
        first = [engine.add_request(p, s) for p, s in zip(PROMPTS, params)]
        samples = engine.add_requests(PROMPTS[3], pair)
        while engine.has_unfinished():
            engine.step()
        return [Result(r) for r in first + samples], samples

    want, want_samples = go(make_engine(path, "dense"))
    engine = make_engine(path, "dense", cache_memory_gb=0.0006, admission_reserve=2)
    victims: list[int] = []
    preempt = engine._preempt

    def recorded(req: Request) -> None:
        victims.append(req.request_id)
        preempt(req)

    monkeypatch.setattr(engine, "_preempt", recorded)
    got, samples = go(engine)
    assert got == want
    assert {s.request_id for s in samples} & set(victims)
    for s, w in zip(samples, want_samples):
        assert s.prompt_logprobs == w.prompt_logprobs and s.prompt_logprobs is not None
    idle(engine)


def test_a_request_that_never_fits_keeps_its_error(path: Path) -> None:
    """Optimistic admission does not admit what could never finish: the worst case must fit
    the empty cache, as without a reserve."""
    engine = make_engine(path, "dense", cache_memory_gb=0.0002, admission_reserve=RESERVE)
    with pytest.raises(CacheCapacityError, match="cannot fit in the cache even when it is empty"):
        engine.add_request(PROMPTS[3], SamplingParams(max_tokens=400))
    idle(engine)


def test_gemma3_window_layers_grow_with_the_global_ones(tiny_checkpoint, monkeypatch) -> None:
    """A LayeredCache (two sliding-window layers, one global) grows all its parts together:
    prompts shorter than the 24-token window start with one ring block and grow a second."""
    path = tiny_checkpoint(
        "gemma3", num_layers=3, vocab_size=96, sliding_window=24, query_pre_attn_scalar=16,
        layer_types=["sliding_attention"] * 2 + ["full_attention"],
    )
    short = [p[: len(p) // 7] for p in PROMPTS]  # 12 to 17 tokens

    def engine(**kw) -> Engine:
        cfg = EngineConfig(max_num_seqs=8, max_model_len=256, **kw)
        return LLM(str(path), engine=cfg, device="cpu").engine

    params = base_params()
    want = run(engine(cache_memory_gb=0.01), params, one_by_one=True, prompts=short)
    small = engine(cache_memory_gb=0.0003, admission_reserve=RESERVE)
    added = {type(c).__name__: 0 for c in small.cache.parts}
    for part in small.cache.parts:
        def on_grow(rec, adm, new, part=part, real=part.on_grow):  # type: ignore[no-untyped-def]
            added[type(part).__name__] += len(new.get("blocks", []))
            real(rec, adm, new)

        monkeypatch.setattr(part, "on_grow", on_grow)
    assert run(small, params, prompts=short) == want
    assert small.counters["preemptions"] > 0
    assert added["WindowCache"] > 0 and added["DenseCache"] > 0
    idle(small)


def test_admission_reserve_must_be_positive() -> None:
    with pytest.raises(ValueError, match="admission_reserve must be >= 1"):
        EngineConfig(admission_reserve=0)


@pytest.mark.parametrize("method", ["dense", "shadowkv"])
def test_resumption_through_chunked_prefill_and_the_prefix_store(path: Path, method: str) -> None:
    """Prompts prefill in 48-token chunks (ShadowKV stages them) and are stored as cache pages:
    the store gives up every entry it alone holds before a request is preempted, so here (every
    page is needed) a resumed request may find its prompt evicted and prefill it again; either
    way it answers as it did alone."""
    params = base_params()
    want = run(make_engine(path, method), params, one_by_one=True)
    # ShadowKV: a staging pool for one prompt (128 tokens), out of a budget that still preempts.
    memory, staging = (0.0014, 128) if method == "shadowkv" else (MEMORY[method], 0)
    engine = make_engine(
        path, method, staging, cache_memory_gb=memory, admission_reserve=RESERVE,
        max_num_batched_tokens=48, prefix_cache=True,
    )
    store, preempt = engine.prefix_store, engine._preempt
    reclaimable = []  # per preemption: stored prefixes whose eviction would have freed pages

    def preempting(req: Request) -> None:
        reclaimable.append(
            [p for p in store.shared_prefixes() if frees_pages(engine.cache, p)]  # type: ignore[union-attr]
        )
        preempt(req)

    engine._preempt = preempting  # type: ignore[method-assign]
    assert run(engine, params) == want
    assert engine.counters["preemptions"] > 0 and reclaimable == [[]] * len(reclaimable)
    assert engine.shares_pages  # both store their cache pages
    assert engine.counters["prefill_chunks"] > len(PROMPTS)
    idle(engine)


def test_a_resumed_request_streams_each_token_once(path: Path) -> None:
    """Replayed rows send nothing: every request's streamed tokens are its outputs, once each,
    and its streamed text is its final text."""
    engine = make_engine(path, "dense", cache_memory_gb=MEMORY["dense"], admission_reserve=2)
    streamed: dict[int, list[int]] = {}
    text: dict[int, str] = {}

    def collect(outs) -> None:  # type: ignore[no-untyped-def]
        for o in outs:
            streamed.setdefault(o.request.request_id, []).append(o.new_token)
            text[o.request.request_id] = text.get(o.request.request_id, "") + o.text_delta

    engine.on_outputs = collect
    reqs = [engine.add_request(p, s) for p, s in zip(PROMPTS, with_stop(path, "dense"))]
    while engine.has_unfinished():
        engine.step()
    assert engine.counters["preemptions"] > 0
    for r in reqs:
        assert streamed[r.request_id] == r.output_ids
        assert text[r.request_id] == r.text
