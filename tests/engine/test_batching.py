"""Engine behaviour through ``LLM``: batching equals one-by-one, stop conditions and finish
reasons, seeded sampling, streaming.

Most cases use a tiny random Llama (word tokenizer: token ``i`` is the text ``w{i}``) so they
are cheap; the SmolLM2 cases check the same on real text (BPE, multi-byte characters).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowkv import LLM, EngineConfig, SamplingParams
from shadowkv.engine.request import GenerationResult

TINY_PROMPTS = [
    "w5 w6 w7",
    "w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20",
    "w100",
    "w200 w201 w202 w203 w204 w205",
]
SMOL_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village nestled between two mountains, there lived an old",
    "def fibonacci(n):",
    "Water boils at a temperature of 100 degrees Celsius, which",
]


def tiny_llm(path: Path, **engine) -> LLM:
    return LLM(str(path), device="cpu", engine=EngineConfig(cache_memory_gb=0.01, **engine))


@pytest.fixture(scope="module")
def tiny_path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def tiny(tiny_path: Path) -> LLM:
    return tiny_llm(tiny_path)


@pytest.fixture(scope="module")
def tiny_alone(tiny: LLM) -> list[GenerationResult]:
    """Greedy 12 tokens for each tiny prompt, one request at a time."""
    return [tiny.generate(p, SamplingParams(max_tokens=12))[0] for p in TINY_PROMPTS]


@pytest.fixture(scope="module")
def smol_alone(smollm2: LLM) -> list[GenerationResult]:
    return [smollm2.generate(p, SamplingParams(max_tokens=8))[0] for p in SMOL_PROMPTS]


@pytest.mark.parametrize("max_num_seqs", [8, 2], ids=lambda n: f"max_num_seqs{n}")
def test_tiny_batch_equals_one_by_one(tiny_path: Path, tiny_alone, max_num_seqs: int) -> None:
    """With room for 2 sequences, the other two wait and join as slots free up."""
    llm = tiny_llm(tiny_path, max_num_seqs=max_num_seqs)
    batch = llm.generate(TINY_PROMPTS, SamplingParams(max_tokens=12))
    assert [r.token_ids for r in batch] == [r.token_ids for r in tiny_alone]
    assert [r.text for r in batch] == [r.text for r in tiny_alone]
    assert all(r.finish_reason == "length" and len(r.token_ids) == 12 for r in batch)


def test_smollm2_batch_of_four_equals_one_by_one(smollm2: LLM, smol_alone) -> None:
    lengths = {len(r.prompt_token_ids) for r in smol_alone}
    assert len(lengths) == 4, "the prompts should differ in length"
    batch = smollm2.generate(SMOL_PROMPTS, SamplingParams(max_tokens=8))
    for alone, batched in zip(smol_alone, batch):
        assert batched.token_ids == alone.token_ids, (alone.text, batched.text)
        assert batched.text == alone.text
    assert "Paris" in smol_alone[0].text


def test_per_prompt_params_and_input_order(tiny: LLM, tiny_alone) -> None:
    params = [SamplingParams(max_tokens=n) for n in (3, 12, 1, 7)]
    out = tiny.generate(TINY_PROMPTS, params)
    for res, alone, p in zip(out, tiny_alone, params):
        assert res.token_ids == alone.token_ids[: p.max_tokens]
        assert res.finish_reason == "length"


def expected_cut(text: str, stop: str) -> str:
    i = text.find(stop)
    assert i > 0, f"{stop!r} should occur in {text!r}"
    return text[:i]


@pytest.mark.parametrize(
    "pick",
    [
        pytest.param(lambda words: " " + words[3], id="whole-token"),
        pytest.param(lambda words: words[2][1:] + " " + words[3][:2], id="spans-two-tokens"),
        pytest.param(lambda words: words[4][-1:], id="last-char-of-a-token"),
    ],
)
def test_stop_string_truncates_text_and_finishes_with_stop(tiny: LLM, tiny_alone, pick) -> None:
    full = tiny_alone[0].text
    stop = pick(full.split(" "))
    params = SamplingParams(max_tokens=12, stop=(stop, "never-seen"))
    res = tiny.generate(TINY_PROMPTS[0], params)[0]
    assert res.text == expected_cut(full, stop)
    assert res.finish_reason == "stop"
    assert len(res.token_ids) < 12
    assert res.token_ids == tiny_alone[0].token_ids[: len(res.token_ids)]


def test_stop_string_on_real_text(smollm2: LLM, smol_alone) -> None:
    full = smol_alone[0].text  # " Paris.\n\n..."
    res = smollm2.generate(SMOL_PROMPTS[0], SamplingParams(max_tokens=8, stop=".\n"))[0]
    assert res.text == expected_cut(full, ".\n")
    assert res.finish_reason == "stop"


def test_stop_token_id_ends_generation(tiny: LLM, tiny_alone) -> None:
    ids = tiny_alone[2].token_ids
    res = tiny.generate(TINY_PROMPTS[2], SamplingParams(max_tokens=12, stop_token_ids=(ids[4],)))[0]
    assert res.token_ids == ids[: ids.index(ids[4]) + 1]
    assert res.finish_reason == "stop"


def test_stop_token_text_is_not_in_the_output(tiny: LLM, tiny_alone) -> None:
    ids = tiny_alone[2].token_ids
    res = tiny.generate(TINY_PROMPTS[2], SamplingParams(max_tokens=12, stop_token_ids=(ids[4],)))[0]
    assert res.text == tiny.tokenizer.decode(ids[:4])


def test_max_tokens_finishes_with_length(tiny: LLM, tiny_alone) -> None:
    res = tiny.generate(TINY_PROMPTS[1], SamplingParams(max_tokens=5))[0]
    assert (len(res.token_ids), res.finish_reason) == (5, "length")
    assert res.token_ids == tiny_alone[1].token_ids[:5]


def test_context_limit_finishes_with_length(tiny_path: Path, tiny_alone) -> None:
    """max_model_len=13 and an 11-token prompt: only 2 tokens fit."""
    llm = tiny_llm(tiny_path, max_model_len=13)
    res = llm.generate(TINY_PROMPTS[1], SamplingParams(max_tokens=12))[0]
    assert len(res.prompt_token_ids) == 11
    assert (len(res.token_ids), res.finish_reason) == (2, "length")
    assert res.token_ids == tiny_alone[1].token_ids[:2]


def test_eos_finishes_with_stop_and_is_not_in_the_text(tiny_checkpoint, tiny_alone) -> None:
    """Same weights, but config.json names the 3rd greedy token as EOS."""
    ids = tiny_alone[0].token_ids
    assert ids[2] not in ids[:2]
    llm = tiny_llm(tiny_checkpoint("llama", eos_token_id=ids[2]))
    res = llm.generate(TINY_PROMPTS[0], SamplingParams(max_tokens=12))[0]
    assert res.token_ids == ids[:3]
    assert res.finish_reason == "stop"
    assert res.text == llm.tokenizer.decode(ids[:2])
    ignored = llm.generate(TINY_PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert ignored.token_ids == ids and ignored.finish_reason == "length"


def test_seeded_sampling_is_reproducible(tiny: LLM) -> None:
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=42)
    first = tiny.generate(TINY_PROMPTS[0], p)[0].token_ids
    assert tiny.generate(TINY_PROMPTS[0], p)[0].token_ids == first
    # In a batch the request keeps its own generator, so its draws do not depend on neighbours.
    seeded = [SamplingParams(max_tokens=10, temperature=1.0, seed=s) for s in (42, 1, 2, 3)]
    batch = tiny.generate(TINY_PROMPTS, seeded)
    assert batch[0].token_ids == first
    other = SamplingParams(max_tokens=10, temperature=1.0, seed=43)
    assert tiny.generate(TINY_PROMPTS[0], other)[0].token_ids != first


def test_unseeded_sampling_varies(tiny: LLM) -> None:
    p = SamplingParams(max_tokens=10, temperature=1.0)
    runs = {tuple(tiny.generate(TINY_PROMPTS[0], p)[0].token_ids) for _ in range(3)}
    assert len(runs) > 1


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(dict(temperature=1.5, top_k=1), id="top_k1"),
        pytest.param(dict(temperature=1.5, top_p=1e-6), id="top_p-tiny"),
        pytest.param(dict(temperature=1e-6), id="temperature-tiny"),
    ],
)
def test_degenerate_sampling_equals_greedy(tiny: LLM, tiny_alone, params: dict) -> None:
    """The tiny model's logits are nearly flat (|logit| < 1), so only a real cut gives greedy."""
    res = tiny.generate(TINY_PROMPTS[3], SamplingParams(max_tokens=12, seed=0, **params))[0]
    assert res.token_ids == tiny_alone[3].token_ids


def test_high_temperature_sampling_leaves_greedy(tiny: LLM, tiny_alone) -> None:
    res = tiny.generate(TINY_PROMPTS[3], SamplingParams(max_tokens=12, temperature=1.5, seed=0))[0]
    assert res.token_ids != tiny_alone[3].token_ids


def stream_text(
    llm: LLM, prompt: str, params: SamplingParams
) -> tuple[list[str], GenerationResult]:
    pieces = list(llm.stream(prompt, params))
    return pieces, llm.last_result


@pytest.mark.parametrize("prompt_index", [0, 1])
def test_stream_concatenates_to_generate_text(tiny: LLM, tiny_alone, prompt_index: int) -> None:
    pieces, result = stream_text(tiny, TINY_PROMPTS[prompt_index], SamplingParams(max_tokens=12))
    assert "".join(pieces) == tiny_alone[prompt_index].text == result.text
    assert len(pieces) > 1 and result.finish_reason == "length"


def test_stream_with_a_stop_string_inside_one_token(tiny: LLM, tiny_alone) -> None:
    stop = " " + tiny_alone[0].text.split(" ")[3]
    pieces, result = stream_text(tiny, TINY_PROMPTS[0], SamplingParams(max_tokens=12, stop=stop))
    assert "".join(pieces) == result.text == expected_cut(tiny_alone[0].text, stop)


def test_stream_with_a_stop_string_across_tokens(tiny: LLM, tiny_alone) -> None:
    words = tiny_alone[0].text.split(" ")
    stop = words[1][1:] + " " + words[2][:2]
    pieces, result = stream_text(tiny, TINY_PROMPTS[0], SamplingParams(max_tokens=12, stop=stop))
    assert result.text == expected_cut(tiny_alone[0].text, stop)
    assert "".join(pieces) == result.text


def test_smollm2_stream_holds_back_split_characters(smollm2: LLM) -> None:
    """The reply starts with a CJK character split over byte-level tokens: no piece may carry a
    replacement character, and the pieces join to the generated text."""
    prompt = "The Japanese word for cat is 猫 and for dog is"
    params = SamplingParams(max_tokens=4)
    pieces, result = stream_text(smollm2, prompt, params)
    assert "".join(pieces) == result.text == smollm2.generate(prompt, params)[0].text
    assert not any("\ufffd" in p for p in pieces)
    raw = [smollm2.tokenizer.decode([t]) for t in result.token_ids]
    assert any("\ufffd" in r for r in raw), "the case should exercise a split character"


def test_set_cache_switches_method_and_keeps_weights(tiny_path: Path, tiny_alone) -> None:
    from shadowkv import DenseConfig, OracleConfig

    llm = tiny_llm(tiny_path)
    weights = llm.engine.model
    llm.set_cache(OracleConfig(sparse_budget=1024))  # covers every prompt: exact
    assert llm.engine.model is weights and llm.engine.cache.cfg.method == "oracle"
    assert llm.cache_config.method == "oracle"
    out = llm.generate(TINY_PROMPTS, SamplingParams(max_tokens=12))
    assert [r.token_ids for r in out] == [r.token_ids for r in tiny_alone]
    llm.engine.add_request([5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="while requests are running"):
        llm.set_cache(DenseConfig())
