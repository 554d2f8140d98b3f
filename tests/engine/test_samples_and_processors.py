"""Samples of one prompt sharing a prefill (OpenAI's ``n``), the logit processors (penalties,
logit bias, min_tokens, JSON grammars) and logprobs, at the engine level.

A tiny random 2-layer Llama; every method's samples are checked against separate requests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shadowkv import LLM, EngineConfig, SamplingParams, method_config
from shadowkv.engine.sampling import SamplingError

PROMPT = [(7 * i) % 90 + 3 for i in range(120)]


def make_llm(path: Path, method: str = "dense") -> LLM:
    extra = {"outlier_chunks": 2, "rank": 16} if method == "shadowkv" else {}
    cache = method_config(method, sparse_budget=16, **extra)
    return LLM(str(path), cache=cache, engine=EngineConfig(cache_memory_gb=0.02), device="cpu")


@pytest.fixture(scope="module")
def path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", vocab_size=96)


@pytest.fixture(scope="module")
def dense(path: Path) -> LLM:
    return make_llm(path)


def run(llm: LLM, reqs) -> None:
    while any(r.finish_reason is None for r in reqs):
        llm.engine.step()


@pytest.mark.parametrize("method", ["dense", "shadowkv", "quest", "loki"])
def test_samples_share_one_prefill_and_equal_separate_requests(path: Path, method: str) -> None:
    llm = make_llm(path, method)
    params = [SamplingParams(max_tokens=6, temperature=0.9, seed=s) for s in (3, 4, 5)]
    before = dict(llm.engine.counters)
    reqs = llm.engine.add_requests(PROMPT, params)
    run(llm, reqs)
    c = llm.engine.counters
    assert c["prefill_tokens"] - before["prefill_tokens"] == len(PROMPT)  # one prefill for three
    copies = c["forked_samples"] + c["replayed_samples"]
    assert copies - before["forked_samples"] - before["replayed_samples"] == 2
    # ShadowKV cannot fork: its samples replay the recorded prefill (no model layers run).
    assert c["replayed_samples"] > 0 if method == "shadowkv" else c["forked_samples"] > 0
    alone = [llm.generate(PROMPT, p)[0].token_ids for p in params]
    assert [r.output_ids for r in reqs] == alone
    assert len({tuple(t) for t in alone}) > 1, "identical samples would make this vacuous"
    assert llm.engine.cache.memory().device_bytes == 0


def test_aborting_the_first_sample_before_its_prefill_aborts_all(dense: LLM) -> None:
    reqs = dense.engine.add_requests(PROMPT, [SamplingParams(max_tokens=4)] * 3)
    dense.engine.abort(reqs[0].request_id)
    assert [r.finish_reason for r in reqs] == ["abort"] * 3
    assert not dense.engine.has_unfinished()


def test_too_many_samples_are_refused(dense: LLM) -> None:
    from shadowkv.cache.base import CacheCapacityError

    with pytest.raises(CacheCapacityError, match="max_num_seqs"):
        dense.engine.add_requests(PROMPT, [SamplingParams()] * 1000)


def _greedy(llm: LLM, **kw) -> list[int]:
    return llm.generate(PROMPT, SamplingParams(max_tokens=10, **kw))[0].token_ids


def test_processors_change_the_output_and_defaults_do_not(dense: LLM) -> None:
    base = _greedy(dense)
    assert _greedy(dense, presence_penalty=0.0, logit_bias={}) == base
    top = base[0]
    assert _greedy(dense, logit_bias={top: -100})[0] != top
    assert set(_greedy(dense, logit_bias={50: 100})) == {50}
    assert _greedy(dense, frequency_penalty=2.0) != base or len(set(base)) == len(base)
    rep = _greedy(dense, repetition_penalty=5.0)
    assert not set(rep) & set(PROMPT) or rep != base


def test_penalties_match_their_formula() -> None:
    """One step by hand: counts of generated tokens, and the repetition rule on the prompt."""
    from shadowkv.engine.logits import new_state, process
    from shadowkv.engine.request import Request

    V = 8
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, 0.0, 3.0, -2.0, 1.5]])
    params = SamplingParams(
        frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0,
        logit_bias={7: -1.0},
    )
    req = Request(0, [0, 1], params, frozenset({6}))
    req.output_ids = [2, 2, 3]
    req.logit_state = new_state(req, V, torch.device("cpu"), [6], None)
    for t in req.output_ids:
        req.logit_state.counts[t] += 1
    want = logits.clone()[0]
    want[2] -= 0.5 * 2 + 0.25
    want[3] -= 0.5 * 1 + 0.25
    for t in (0, 1, 2, 3):
        want[t] = want[t] / 2 if want[t] > 0 else want[t] * 2
    want[7] -= 1.0
    process(logits, [req])
    torch.testing.assert_close(logits[0], want)


def test_min_tokens_masks_eos(tiny_checkpoint) -> None:
    """A model that says EOS at once keeps going until min_tokens."""
    llm = make_llm(tiny_checkpoint("llama", vocab_size=96))
    eos = next(iter(llm.engine.eos_ids))
    forced = SamplingParams(max_tokens=8, logit_bias={eos: 100})
    assert llm.generate(PROMPT, forced)[0].token_ids == [eos]
    params = SamplingParams(max_tokens=8, logit_bias={eos: 100}, min_tokens=5)
    out = llm.generate(PROMPT, params)[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == eos and eos not in out.token_ids[:5]


def test_sampling_params_refuse_bad_processor_values() -> None:
    for kw in (
        {"presence_penalty": 3},
        {"frequency_penalty": "1"},
        {"repetition_penalty": 0},
        {"logit_bias": {-1: 1.0}},
        {"logit_bias": {3: 101}},
        {"min_tokens": 300, "max_tokens": 10},
        {"logprobs": 21},
        {"prompt_logprobs": True},
    ):
        with pytest.raises(SamplingError):
            SamplingParams(**kw)


def test_logprobs_are_the_models_and_prompt_logprobs_match_a_full_forward(dense: LLM) -> None:
    out = dense.generate(PROMPT, SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=2))[0]
    assert len(out.logprobs) == 4
    for token, (lp, top) in zip(out.token_ids, out.logprobs):
        assert len(top) == 3 and top[0][0] == token and top[0][1] == lp  # greedy: the best one
    plp = out.prompt_logprobs
    assert plp[0] is None and len(plp) == len(PROMPT)
    # The reference: the whole prompt + output through transformers, no cache involved.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(dense.path)).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + out.token_ids])).logits[0].float()
    ref = torch.log_softmax(logits, -1)
    for i in (1, 50, len(PROMPT) - 1):
        lp, top = plp[i]
        assert lp == pytest.approx(ref[i - 1, PROMPT[i]].item(), abs=1e-3)
        assert [t for t, _ in top] == ref[i - 1].topk(2).indices.tolist()
    n = len(PROMPT)
    for j, (lp, _) in enumerate(out.logprobs):
        assert lp == pytest.approx(ref[n - 1 + j, out.token_ids[j]].item(), abs=1e-3)


def test_json_schema_output_parses_and_matches(smollm2: LLM) -> None:
    pytest.importorskip("xgrammar", reason="structured output needs the 'serve' extra")
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    params = SamplingParams(max_tokens=40, json_schema=schema)
    out = smollm2.generate("Describe a person as JSON.", params, chat=True)[0]
    doc = json.loads(out.text)
    assert set(doc) == {"name", "age"} and isinstance(doc["age"], int), out.text
    assert out.finish_reason == "stop"
