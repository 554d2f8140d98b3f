"""Token-chunked prefill in the engine (running sequences keep decoding while a long prompt
prefills a chunk per step), the budget's sharing between a long prompt and short ones, and
recorded prefills replayed into other cache methods.

A tiny random 4-layer Llama; prompts are token ids. With ``max_num_batched_tokens=64`` a
200-token prompt prefills over several steps, each after the running requests' decode.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from utils import full_budget
from utils import small_cache_cfg as cache_cfg

from shadowkv import LLM, EngineConfig, SamplingParams, method_config
from shadowkv.cache.methods import DenseConfig
from shadowkv.engine.engine import Engine, PromptError
from shadowkv.engine.prompt_kv import PromptKV

SHORT = list(range(5, 25))  # 20 tokens
LONG = [(7 * i) % 90 + 3 for i in range(200)]  # 200 tokens
METHODS = ["dense", "shadowkv", "quest", "loki", "streaming", "oracle"]
# 20 (ShadowKV's dense fallback), 200, 97 and 33 tokens, and the tokens each generates.
PROMPTS = [SHORT, LONG, [(11 * i) % 90 + 3 for i in range(97)],
           [(17 * i) % 90 + 3 for i in range(33)]]
MAX_TOKENS = [9, 6, 7, 8]


@pytest.fixture(scope="module")
def path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", num_layers=4, vocab_size=96)


def make_llm(path: Path, method, **engine) -> LLM:
    engine.setdefault("cache_memory_gb", 0.01)
    engine.setdefault("max_num_batched_tokens", 64)
    cache = cache_cfg(method) if isinstance(method, str) else method
    return LLM(str(path), cache=cache, engine=EngineConfig(**engine), device="cpu")


def run_all(engine: Engine) -> list[tuple[str | None, list[int]]]:
    """Step to the end; per step, what it worked on and which requests got a token."""
    trace = []
    while engine.has_unfinished():
        outs = engine.step()
        trace.append((engine.last_step, [o.request.request_id for o in outs]))
    return trace


def one_by_one(llm: LLM) -> list[list[int]]:
    """Each prompt alone, prefilled whole (the reference)."""
    return [
        llm.generate(p, SamplingParams(max_tokens=n))[0].token_ids
        for p, n in zip(PROMPTS, MAX_TOKENS)
    ]


def staggered(engine: Engine) -> list[list[int]]:
    """Two prompts at once, the other two after two steps: chunks of the long prompts mix with
    decodes and with other prompts' prefills in one step."""
    params = [SamplingParams(max_tokens=n) for n in MAX_TOKENS]
    reqs = [engine.add_request(p, s) for p, s in zip(PROMPTS[:2], params)]
    steps = 0
    while engine.has_unfinished():
        if steps == 2:
            reqs += [engine.add_request(p, s) for p, s in zip(PROMPTS[2:], params[2:])]
        engine.step()
        steps += 1
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("method", METHODS)
def test_chunked_prefills_and_mixed_steps_equal_one_by_one(path: Path, method: str) -> None:
    want = one_by_one(make_llm(path, method, chunked_prefill=False))
    assert any(len(set(t)) > 1 for t in want), "constant outputs would make this vacuous"
    for budget in (13, 40, 96):
        engine = make_llm(path, method, max_num_batched_tokens=budget).engine
        assert staggered(engine) == want, budget
        assert engine.counters["prefill_chunks"] > len(PROMPTS)  # some prompts were chunked


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("method", ["dense", "shadowkv"])
def test_decodes_continue_during_a_chunked_prefill(path: Path, method: str, mode: str) -> None:
    llm = make_llm(path, method, decode_mode=mode)
    alone = [
        llm.generate(p, SamplingParams(max_tokens=n))[0].token_ids
        for p, n in ((SHORT, 12), (LONG, 6))
    ]
    engine = llm.engine
    a = engine.add_request(SHORT, SamplingParams(max_tokens=12))
    engine.step()  # a's whole prefill
    b = engine.add_request(LONG, SamplingParams(max_tokens=6))
    for _ in range(3):  # 63 prompt tokens a step after a's decode row: 63 + 63 + 63
        outs = engine.step()
        assert [o.request for o in outs] == [a] and engine.prefilling is b
        assert engine.last_step == "mixed"
    outs = engine.step()  # the last 11 tokens: b's first token
    assert [o.request for o in outs] == [a, b] and engine.prefilling is None
    run_all(engine)
    assert [a.output_ids, b.output_ids] == alone


def test_shadowkv_chunked_full_rank_full_budget_equals_dense(path: Path) -> None:
    want = one_by_one(make_llm(path, DenseConfig(), chunked_prefill=False))
    full = method_config("shadowkv", sparse_budget=full_budget(200), outlier_chunks=2, rank=1.0)
    assert staggered(make_llm(path, full, max_num_batched_tokens=24).engine) == want


def test_a_long_prompt_and_short_ones_both_progress(path: Path) -> None:
    engine = make_llm(path, "dense", max_num_batched_tokens=48).engine
    long = engine.add_request(LONG, SamplingParams(max_tokens=2))
    engine.step()  # the long prompt's first chunk: 48 tokens
    shorts = []
    done = [engine.counters["prefill_tokens"]]
    while engine.prefilling is long:
        shorts.append(engine.add_request(SHORT[:10], SamplingParams(max_tokens=30)))
        engine.step()
        done.append(engine.counters["prefill_tokens"])
        # Every short prompt so far has its first token: none waits behind the long one.
        assert not engine.waiting and all(r.output_ids for r in shorts)
    # ... and the long prompt advanced every step, by at least half the budget left after the
    # decode rows (it keeps at least half while short prompts wait).
    assert len(shorts) >= 3 and long.output_ids
    steps = list(zip(done, done[1:]))
    assert all(b - a >= 10 + 8 for a, b in steps[:-1])


@pytest.mark.parametrize("method", ["dense", "shadowkv"])
def test_abort_mid_prefill_frees_its_memory(path: Path, method: str) -> None:
    engine = make_llm(path, method).engine
    engine.add_request(SHORT, SamplingParams(max_tokens=8))
    engine.step()
    idle = engine.cache.memory()
    b = engine.add_request(LONG, SamplingParams(max_tokens=4))
    engine.step()  # a decodes, b's first chunk
    assert engine.prefilling is b and engine.cache.memory().device_bytes > idle.device_bytes
    engine.abort(b.request_id)
    assert b.finish_reason == "abort" and engine.prefilling is None
    after = engine.cache.memory()  # dense_bytes grew: the running sequence decoded a token
    assert (after.device_bytes, after.host_bytes) == (idle.device_bytes, idle.host_bytes)
    if method == "shadowkv":
        staging = engine.cache.staging
        assert staging.pages.num_used == staging.grams.num_used == 0
    trace = run_all(engine)
    assert trace and all(step == "decode" for step, _ in trace)


@pytest.mark.parametrize("method", ["dense", "shadowkv"])
def test_samples_logprobs_and_progress_span_the_chunks(path: Path, method: str) -> None:
    """``n`` samples (dense forks, ShadowKV replays the recording, which must hold every
    chunk), prompt logprobs and progress over a chunked prefill equal a whole prefill's."""

    def run(**engine) -> tuple[list[list[int]], list, list[tuple[int, int]]]:
        e = make_llm(path, method, **engine).engine
        seen: list[tuple[int, int]] = []
        e.progress = lambda req, done, total: seen.append((done, total))
        params = [SamplingParams(max_tokens=5, temperature=1.0, seed=s, prompt_logprobs=2)
                  for s in (1, 2, 3)]
        reqs = e.add_requests(LONG, params)
        run_all(e)
        return [r.output_ids for r in reqs], reqs[0].prompt_logprobs, seen

    want, want_lp, _ = run(chunked_prefill=False)
    got, got_lp, seen = run(max_num_batched_tokens=56)
    assert got == want and len(set(map(tuple, want))) > 1
    assert len(got_lp) == len(LONG) and got_lp[0] is None
    for (g, gtop), (w, wtop) in zip(got_lp[1:], want_lp[1:]):
        assert g == pytest.approx(w, abs=1e-4)
        assert [t for t, _ in gtop] == [t for t, _ in wtop]
        assert [x for _, x in gtop] == pytest.approx([x for _, x in wtop], abs=1e-4)
    assert seen[-1] == (200 * 4, 200 * 4) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def record(path: Path, prompt: list[int], max_tokens: int, **engine) -> tuple[list[int], PromptKV]:
    engine_ = make_llm(path, "dense", **engine).engine
    req = engine_.add_request(prompt, SamplingParams(max_tokens=max_tokens), record_prompt_kv=True)
    run_all(engine_)
    assert req.prompt_kv is not None
    return req.output_ids, req.prompt_kv


@pytest.mark.parametrize("method", METHODS)
def test_replayed_prefill_decodes_like_a_real_one(path: Path, method: str) -> None:
    dense_tokens, kv = record(path, LONG, 6)  # recorded over 4 chunks
    _, whole = record(path, LONG, 1, chunked_prefill=False)
    assert len(kv.layers) == 4 and kv.layers[0][0].shape == (200, 2, 16)
    for got, want in zip(kv.layers[3], whole.layers[3]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    llm = make_llm(path, method)
    direct = llm.generate(LONG, SamplingParams(max_tokens=6))[0].token_ids
    req = llm.engine.add_request(LONG, SamplingParams(max_tokens=6), prompt_kv=kv)
    trace = run_all(llm.engine)
    assert req.output_ids == direct
    assert len(set(direct)) > 1, "a constant output would make the comparison vacuous"
    assert trace[0] == ("prefill", [req.request_id])  # replay is one step, no model layers run
    if method == "dense":
        assert direct == dense_tokens


def test_replay_checks_the_tokens(path: Path) -> None:
    _, kv = record(path, SHORT, 1)
    engine = make_llm(path, "dense").engine
    with pytest.raises(PromptError, match="other prompt tokens"):
        engine.add_request(SHORT[:-1] + [3], SamplingParams(max_tokens=1), prompt_kv=kv)
    assert torch.equal(kv.logits, kv.logits.float()) and kv.logits.shape == (96,)


def test_cli_flag_turns_chunking_off() -> None:
    import argparse

    from shadowkv.commands.common import add_model_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert engine_config_from_args(p.parse_args([])).chunked_prefill is True
    args = p.parse_args(["--no-chunked-prefill", "--max-num-batched-tokens", "512"])
    cfg = engine_config_from_args(args)
    assert (cfg.chunked_prefill, cfg.max_num_batched_tokens) == (False, 512)


def test_failed_allocation_at_admission_keeps_the_request_queued(path: Path, monkeypatch) -> None:
    from shadowkv.cache.base import CacheCapacityError

    engine = make_llm(path, "dense").engine
    a = engine.add_request(SHORT, SamplingParams(max_tokens=6))
    engine.step()
    real, fails = engine.cache.add_sequence, [1]

    def flaky(*args, **kw):
        if fails:
            fails.pop()
            raise CacheCapacityError("could not pin host memory")
        return real(*args, **kw)

    monkeypatch.setattr(engine.cache, "add_sequence", flaky)
    b = engine.add_request(LONG[:50], SamplingParams(max_tokens=2))
    engine.step()  # a decodes; b's admission fails: b waits, a keeps going
    assert list(engine.waiting) == [b] and a in engine.running
    run_all(engine)
    assert len(a.output_ids) == 6 and len(b.output_ids) == 2
    fails.append(1)
    c = engine.add_request(SHORT, SamplingParams(max_tokens=1))
    with pytest.raises(CacheCapacityError, match="pin"):  # nothing runs: nothing will free memory
        engine.step()
    assert list(engine.waiting) == [c]


LONG_B = [(13 * i) % 90 + 3 for i in range(200)]  # another 200-token prompt


def shadow_cfg(**knobs):
    return replace(cache_cfg("shadowkv"), **knobs)


def test_staging_is_reserved_at_admission_only_for_chunked_prompts(
    path: Path, monkeypatch
) -> None:
    """A prompt split in chunks reserves its staging at admission (counted in its memory, given
    back at its last chunk); a prompt prefilled whole reserves none."""
    engine = make_llm(path, "shadowkv", max_num_batched_tokens=128).engine
    cache = engine.cache
    real, asked = cache.add_sequence, {}

    def spy(seq_id, *args, staged=False, **kw):
        asked[seq_id] = staged
        return real(seq_id, *args, staged=staged, **kw)

    monkeypatch.setattr(cache, "add_sequence", spy)
    a = engine.add_request(PROMPTS[2], SamplingParams(max_tokens=3))  # 97 tokens: whole
    engine.step()
    assert asked == {a.request_id: False} and cache.staging.pages.num_used == 0
    b = engine.add_request(LONG, SamplingParams(max_tokens=3))
    engine.step()  # a decodes; b's first chunk
    assert engine.prefilling is b and asked[b.request_id] is True
    pages, grams = cache.staging.pages, cache.staging.grams
    assert (pages.num_used, grams.num_used) == (2, 1)  # 200 tokens: 2 pages of 128
    staged = cache.memory(b.request_id).device_bytes
    while engine.prefilling is b:
        engine.step()
    assert (pages.num_used, grams.num_used) == (0, 0)
    stored = cache.memory(b.request_id).device_bytes
    assert staged - stored == 2 * pages.page_bytes + grams.page_bytes


@pytest.mark.parametrize("staging_tokens", [256, 512])
def test_a_long_prompt_waits_while_the_staging_pool_is_full(
    path: Path, staging_tokens: int
) -> None:
    """Two 200-token prompts, a 64-token budget: the second would start with the first's last
    chunk. A pool for one prompt (256 tokens) makes it wait a step (not admitted), a pool for two
    lets it start; either way both give the tokens they give alone."""
    cfg = shadow_cfg(staging_tokens=staging_tokens)
    alone = make_llm(path, cfg, chunked_prefill=False)
    want = [alone.generate(p, SamplingParams(max_tokens=5))[0].token_ids for p in (LONG, LONG_B)]
    engine = make_llm(path, cfg).engine
    a, b = (engine.add_request(p, SamplingParams(max_tokens=5)) for p in (LONG, LONG_B))
    for _ in range(3):  # a's chunks of 64, 64, 64; b waits (one partial prompt at a time)
        engine.step()
        assert engine.prefilling is a and list(engine.waiting) == [b]
    engine.step()  # a's last 8 tokens: 56 left for b's first chunk, if b can stage
    assert a.output_ids
    if staging_tokens == 256:
        assert engine.prefilling is None and list(engine.waiting) == [b]
        assert engine.cache.staging.pages.num_used == 0  # a's pages are back
        engine.step()
    assert engine.prefilling is b and not engine.waiting
    run_all(engine)
    assert [a.output_ids, b.output_ids] == want
    assert len(set(want[0])) > 1


def test_a_prompt_bigger_than_the_staging_pool_prefills_whole(path: Path) -> None:
    """No prompt hangs on a pool too small to stage it: it prefills whole, as without chunking
    (and does not start from a stored prefix, which would stage it)."""
    want = make_llm(path, "shadowkv", chunked_prefill=False).generate(
        LONG, SamplingParams(max_tokens=5)
    )[0].token_ids
    for tokens in (128, 0):
        engine = make_llm(path, shadow_cfg(staging_tokens=tokens), prefix_cache=True).engine
        assert engine.fits_ever(len(LONG), 5)
        req = engine.add_request(LONG, SamplingParams(max_tokens=5))
        engine.step()
        assert req.output_ids and engine.counters["prefill_chunks"] == 1
        run_all(engine)
        assert req.output_ids == want
        again = engine.add_request(LONG, SamplingParams(max_tokens=5))  # stored, not reused
        run_all(engine)
        assert again.output_ids == want and engine.counters["prefix_hits"] == 0
