"""Mixed steps (``EngineConfig.mixed_step``): a step's decode rows and prompt chunks in one forward.

A tiny random 4-layer Llama with a 40-token step budget: a 200-token and a 97-token prompt
prefill in chunks while earlier requests decode, so most steps mix decode rows with chunks of
prompts of different lengths (the 20-token one is ShadowKV's dense fallback). The tokens must
equal the same requests with the decode in its own forward, and each prompt generated alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from utils import count_forwards, full_budget
from utils import small_cache_cfg as cache_cfg

from shadowkv import LLM, EngineConfig, SamplingParams, method_config
from shadowkv.cache.methods import DenseConfig
from shadowkv.engine.engine import Engine, StepOutput

METHODS = ["dense", "shadowkv", "quest", "loki", "streaming", "oracle"]
SHORT = list(range(5, 25))  # 20 tokens: ShadowKV's dense fallback
LONG = [(7 * i) % 90 + 3 for i in range(200)]
PROMPTS = [SHORT, [(11 * i) % 90 + 3 for i in range(97)], LONG,
           [(17 * i) % 90 + 3 for i in range(33)], [(13 * i) % 90 + 3 for i in range(9)]]
MAX_TOKENS = [12, 9, 6, 8, 7]


@pytest.fixture(scope="module")
def path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", num_layers=4, vocab_size=96)


def make_engine(path: Path, cache, **engine) -> Engine:
    engine.setdefault("cache_memory_gb", 0.01)
    engine.setdefault("max_num_batched_tokens", 40)
    return LLM(str(path), cache=cache, engine=EngineConfig(**engine), device="cpu").engine


def alone(path: Path, cache) -> list[list[int]]:
    engine = make_engine(path, cache, chunked_prefill=False, max_num_batched_tokens=8192)
    out = []
    for prompt, n in zip(PROMPTS, MAX_TOKENS):
        req = engine.add_request(prompt, SamplingParams(max_tokens=n))
        while engine.has_unfinished():
            engine.step()
        out.append(req.output_ids)
    return out


def staggered(engine: Engine, monkeypatch) -> tuple[list[list[int]], list[tuple[str, int]]]:
    """Two short prompts first, the rest one per step while they decode: per step, what it
    worked on and how many forwards it ran."""
    calls = count_forwards(engine, monkeypatch)
    params = [SamplingParams(max_tokens=n) for n in MAX_TOKENS]
    reqs = [engine.add_request(p, s) for p, s in zip(PROMPTS[:1], params)]
    trace = []
    while engine.has_unfinished() or len(reqs) < len(PROMPTS):
        if len(reqs) < len(PROMPTS) and engine.running:
            i = len(reqs)
            reqs.append(engine.add_request(PROMPTS[i], params[i]))
        before = len(calls)
        engine.step()
        trace.append((engine.last_step, len(calls) - before))
    return [r.output_ids for r in reqs], trace


@pytest.mark.parametrize("method", METHODS)
def test_mixed_steps_equal_separate_forwards_and_one_by_one(
    path: Path, method: str, monkeypatch
) -> None:
    want = alone(path, cache_cfg(method))
    assert len({t for out in want for t in out}) > 3, "constant outputs would prove nothing"
    got, trace = staggered(make_engine(path, cache_cfg(method)), monkeypatch)
    sep, sep_trace = staggered(make_engine(path, cache_cfg(method), mixed_step=False), monkeypatch)
    assert got == want and sep == want
    mixed = [n for step, n in trace if step == "mixed"]
    assert len(mixed) >= 5 and set(mixed) == {1}, trace  # one forward per mixed step
    assert {n for step, n in sep_trace if step == "mixed"} == {2}, sep_trace


def test_shadowkv_full_rank_full_budget_mixed_equals_dense(path: Path, monkeypatch) -> None:
    full = method_config("shadowkv", sparse_budget=full_budget(200), outlier_chunks=2, rank=1.0)
    got, trace = staggered(make_engine(path, full), monkeypatch)
    assert ("mixed", 1) in trace
    assert got == alone(path, DenseConfig())


@pytest.mark.parametrize("method", ["dense", "shadowkv"])
def test_mixed_steps_between_static_decode_steps(path: Path, method: str, monkeypatch) -> None:
    """Mixed steps plan their decode rows eagerly; decode-only steps in between run the
    fixed-shape step (what a CUDA graph replays): tokens as one by one."""
    got, trace = staggered(make_engine(path, cache_cfg(method), decode_mode="static"), monkeypatch)
    assert ("mixed", 1) in trace and ("decode", 1) in trace
    assert got == alone(path, cache_cfg(method))


def test_a_mixed_step_is_one_forward_and_decode_only_steps_use_the_runner(
    path: Path, monkeypatch
) -> None:
    engine = make_engine(path, cache_cfg("dense"), max_num_batched_tokens=64)
    a = engine.add_request(SHORT, SamplingParams(max_tokens=5))
    engine.step()
    runner = []
    real = engine.runner.step
    monkeypatch.setattr(engine.runner, "step", lambda *args: runner.append(1) or real(*args))
    calls = count_forwards(engine, monkeypatch)
    b = engine.add_request(PROMPTS[3], SamplingParams(max_tokens=5))
    seen: list[list[StepOutput]] = []
    engine.on_outputs = seen.append
    outs = engine.step()
    assert engine.last_step == "mixed" and calls == [1 + 33] and not runner
    # The decode's token is emitted on its own, before the prefill's first token.
    ids = [[o.request.request_id for o in part] for part in seen]
    assert ids == [[a.request_id], [b.request_id]], ids
    assert [o.request.request_id for o in outs] == [a.request_id, b.request_id]
    engine.step()
    assert engine.last_step == "decode" and runner == [1] and calls == [34, 2]


def injected_failure(x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("injected")


@pytest.mark.parametrize("method", ["dense", "shadowkv"])
def test_failure_in_a_mixed_forward_frees_the_prefills_and_keeps_the_decodes(
    path: Path, method: str, monkeypatch
) -> None:
    """The prefills of the failed step are dropped (memory back to the running requests'); the
    running requests stay, their decode not counted, and the next step decodes the same token:
    their outputs equal a run without the failure."""

    def run(fail: bool) -> list[list[int]]:
        engine = make_engine(path, cache_cfg(method), max_num_batched_tokens=64)
        a = engine.add_request(LONG[:60], SamplingParams(max_tokens=8))
        c = engine.add_request(SHORT, SamplingParams(max_tokens=8))
        engine.step()
        engine.step()
        running = engine.cache.memory()
        b = engine.add_request(LONG, SamplingParams(max_tokens=3))
        engine.step()  # b's first chunk beside a's and c's decode
        assert engine.prefilling is b
        if fail:
            d = engine.add_request(PROMPTS[4], SamplingParams(max_tokens=3))
            mlp = engine.model.layers[2].mlp
            real = mlp.forward
            monkeypatch.setattr(mlp, "forward", injected_failure)
            lengths = [engine.cache.length(r.request_id) for r in (a, c)]
            with pytest.raises(RuntimeError, match="injected"):
                engine.step()  # a, c decode; b's second chunk and d whole: layers 0-1 ran
            assert b.finish_reason == d.finish_reason == "abort" and engine.prefilling is None
            assert engine.running == [a, c] and not engine.waiting
            assert [engine.cache.length(r.request_id) for r in (a, c)] == lengths
            after = engine.cache.memory()
            assert (after.device_bytes, after.host_bytes) == (
                running.device_bytes, running.host_bytes
            )
            if method == "shadowkv":
                staging = engine.cache.staging
                assert staging.pages.num_used == staging.grams.num_used == 0
            monkeypatch.setattr(mlp, "forward", real)
        while engine.has_unfinished():
            engine.step()
        return [a.output_ids, c.output_ids]

    assert run(fail=True) == run(fail=False)



@pytest.mark.parametrize("method", ["dense", "shadowkv"])
def test_mixed_steps_through_the_triton_varlen_kernel(path: Path, method: str, monkeypatch) -> None:
    """The ragged prefill's one varlen call per layer, run by the Triton kernel (interpreted on
    the CPU; what CUDA runs), gives the tokens of each prompt alone."""
    import shadowkv.kernels.varlen_attention as varlen
    from shadowkv.kernels.varlen_attention import triton as kernel

    want = alone(path, cache_cfg(method))  # the reference path
    launches = []
    real = kernel.varlen_attention

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        launches.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(varlen, "use_triton", lambda t, op=None: True)
    monkeypatch.setattr(kernel, "varlen_attention", counted)
    got, trace = staggered(make_engine(path, cache_cfg(method)), monkeypatch)
    assert ("mixed", 1) in trace and len(launches) >= 4 * 5
    assert got == want


@pytest.mark.parametrize("method", ["dense", "shadowkv"])
def test_window_layers_in_mixed_steps(tiny_checkpoint, method: str, monkeypatch) -> None:
    """Gemma-3: sliding-window layers (a ring; their segments attend one by one) beside a global
    layer (the method; one varlen call), decode rows in front of both."""
    path = tiny_checkpoint(
        "gemma3", num_layers=3, vocab_size=96, sliding_window=24, query_pre_attn_scalar=16,
        layer_types=["sliding_attention"] * 2 + ["full_attention"],
    )
    got, trace = staggered(make_engine(path, cache_cfg(method)), monkeypatch)
    sep, _ = staggered(make_engine(path, cache_cfg(method), mixed_step=False), monkeypatch)
    assert ("mixed", 1) in trace
    assert got == sep == alone(path, cache_cfg(method))
    assert len({t for out in got for t in out}) > 3


def test_prompt_logprobs_of_a_prompt_in_a_mixed_step(path: Path) -> None:
    """The prompt's rows sit after the decode rows in the packed hidden states."""
    params = SamplingParams(max_tokens=2, prompt_logprobs=2)

    def logprobs(beside: bool) -> list:
        engine = make_engine(path, cache_cfg("dense"), max_num_batched_tokens=64)
        if beside:
            for p in PROMPTS[:2]:
                engine.add_request(p, SamplingParams(max_tokens=20))
            engine.step()
            engine.step()
        req = engine.add_request(PROMPTS[3], params)
        engine.step()
        assert engine.last_step == ("mixed" if beside else "prefill")
        return req.prompt_logprobs

    got, want = logprobs(beside=True), logprobs(beside=False)
    assert len(got) == len(PROMPTS[3]) and got[0] is None
    for (g, gtop), (w, wtop) in zip(got[1:], want[1:]):
        assert g == pytest.approx(w, abs=1e-4)
        assert [t for t, _ in gtop] == [t for t, _ in wtop]
