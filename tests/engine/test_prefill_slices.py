"""Sliced prefill (running sequences keep decoding while a long prompt prefills) and recorded
prefills replayed into other cache methods.

A tiny random 4-layer Llama; prompts are token ids. With ``prefill_slice_tokens=100`` a 200-token
prompt prefills 2 layers per step, so its prefill spans two steps, each after a decode.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from utils import small_cache_cfg as cache_cfg

from shadowkv import LLM, EngineConfig, SamplingParams
from shadowkv.config import ConfigError
from shadowkv.engine.engine import Engine, PromptError
from shadowkv.engine.prompt_kv import PromptKV

SHORT = list(range(5, 25))  # 20 tokens
LONG = [(7 * i) % 90 + 3 for i in range(200)]  # 200 tokens
METHODS = ["dense", "shadowkv", "quest", "loki", "streaming", "oracle"]


@pytest.fixture(scope="module")
def path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", num_layers=4, vocab_size=96)


def make_llm(path: Path, method: str, slice_tokens: int | None = 100) -> LLM:
    engine = EngineConfig(cache_memory_gb=0.01, prefill_slice_tokens=slice_tokens)
    return LLM(str(path), cache=cache_cfg(method), engine=engine, device="cpu")


def run_all(engine: Engine) -> list[tuple[str | None, list[int]]]:
    """Step to the end; per step, what it worked on and which requests got a token."""
    trace = []
    while engine.has_unfinished():
        outs = engine.step()
        trace.append((engine.last_step, [o.request.request_id for o in outs]))
    return trace


@pytest.mark.parametrize("method", METHODS)
def test_decodes_continue_during_a_sliced_prefill(path: Path, method: str) -> None:
    llm = make_llm(path, method)
    alone = [
        llm.generate(p, SamplingParams(max_tokens=n))[0].token_ids
        for p, n in ((SHORT, 12), (LONG, 6))
    ]
    engine = llm.engine
    a = engine.add_request(SHORT, SamplingParams(max_tokens=12))
    engine.step()  # a's whole prefill: nothing else runs
    assert a in engine.running
    b = engine.add_request(LONG, SamplingParams(max_tokens=6))
    outs = engine.step()  # a decodes, then the first half of b's layers
    assert [o.request for o in outs] == [a] and engine.prefilling is b
    assert engine.last_step == "mixed"
    outs = engine.step()  # a decodes, then the second half: b's first token
    assert engine.last_step == "mixed" and [o.request for o in outs] == [a, b]
    assert engine.prefilling is None
    run_all(engine)
    assert [a.output_ids, b.output_ids] == alone


def test_no_slicing_when_nothing_runs_or_when_disabled(path: Path) -> None:
    for slice_tokens, running in ((100, False), (None, True)):
        engine = make_llm(path, "dense", slice_tokens).engine
        a = None
        if running:
            a = engine.add_request(SHORT, SamplingParams(max_tokens=8))
            engine.step()
        b = engine.add_request(LONG, SamplingParams(max_tokens=2))
        outs = engine.step()
        assert [o.request for o in outs] == [r for r in (a, b) if r is not None]
        assert engine.prefilling is None


@pytest.mark.parametrize("method", ["dense", "shadowkv"])
def test_abort_mid_prefill_frees_its_memory(path: Path, method: str) -> None:
    engine = make_llm(path, method).engine
    engine.add_request(SHORT, SamplingParams(max_tokens=8))
    engine.step()
    idle = engine.cache.memory()
    b = engine.add_request(LONG, SamplingParams(max_tokens=4))
    engine.step()  # a decodes, b's first slice
    assert engine.prefilling is b and engine.cache.memory().device_bytes > idle.device_bytes
    engine.abort(b.request_id)
    assert b.finish_reason == "abort" and engine.prefilling is None
    after = engine.cache.memory()  # dense_bytes grew: the running sequence decoded a token
    assert (after.device_bytes, after.host_bytes) == (idle.device_bytes, idle.host_bytes)
    trace = run_all(engine)
    assert trace and all(step == "decode" for step, _ in trace)


def record(path: Path, prompt: list[int], max_tokens: int) -> tuple[list[int], PromptKV]:
    engine = make_llm(path, "dense").engine
    req = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens), record_prompt_kv=True)
    run_all(engine)
    assert req.prompt_kv is not None
    return req.output_ids, req.prompt_kv


@pytest.mark.parametrize("method", METHODS)
def test_replayed_prefill_decodes_like_a_real_one(path: Path, method: str) -> None:
    dense_tokens, kv = record(path, LONG, 6)
    assert len(kv.layers) == 4 and kv.layers[0][0].shape == (200, 2, 16)
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


def test_slice_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="prefill_slice_tokens"):
        EngineConfig(prefill_slice_tokens=0)


def test_cli_flag_sets_the_slice() -> None:
    import argparse

    from shadowkv.commands.common import add_model_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert engine_config_from_args(p.parse_args([])).prefill_slice_tokens == 8192
    def sliced(value: str) -> int | None:
        args = p.parse_args(["--prefill-slice-tokens", value])
        return engine_config_from_args(args).prefill_slice_tokens

    assert sliced("512") == 512
    assert sliced("none") is None


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
