"""The sampler: greedy, temperature, top-k, top-p, seeds; and SamplingParams validation."""

from __future__ import annotations

import math

import pytest
import torch

from shadowkv.engine.sampling import SamplingError, SamplingParams, make_generator, sample

CPU = torch.device("cpu")
DRAWS = 3000


def draw(
    logits: torch.Tensor, params: SamplingParams, n: int = DRAWS, seed: int = 0
) -> torch.Tensor:
    """Token counts ``[V]`` over ``n`` draws with one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(logits.shape[-1], dtype=torch.long)
    for _ in range(n):
        counts[sample(logits, params, gen)] += 1
    return counts


def assert_frequencies(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Every token's count within 5 binomial standard deviations (+1) of ``n * p``."""
    n = int(counts.sum())
    expected = n * probs.double()
    sigma = (n * probs.double() * (1 - probs.double())).sqrt()
    bad = (counts.double() - expected).abs() > 5 * sigma + 1
    assert not bad.any(), f"counts {counts.tolist()} vs expected {expected.round().tolist()}"


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def test_greedy_is_argmax_and_needs_no_generator() -> None:
    params = SamplingParams()
    assert params.greedy and make_generator(params, CPU) is None
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9])
    assert sample(logits, params, None) == 1


def test_tiny_temperature_is_greedy_not_nan() -> None:
    params = SamplingParams(temperature=1e-7)
    assert params.greedy
    assert sample(torch.tensor([0.0, 50.0, 49.0]), params, None) == 1


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0], ids=lambda t: f"T{t}")
def test_temperature_frequencies_follow_softmax(temperature: float) -> None:
    counts = draw(LOGITS, SamplingParams(temperature=temperature))
    assert_frequencies(counts, torch.softmax(LOGITS / temperature, -1))


def test_low_temperature_sharpens() -> None:
    cold = draw(LOGITS, SamplingParams(temperature=0.25))[0]
    hot = draw(LOGITS, SamplingParams(temperature=4.0))[0]
    assert cold > 0.95 * DRAWS > hot


@pytest.mark.parametrize("k", [1, 2, 4], ids=lambda k: f"k{k}")
def test_top_k_samples_only_the_k_best_renormalised(k: int) -> None:
    counts = draw(LOGITS, SamplingParams(temperature=1.0, top_k=k))
    probs = torch.zeros_like(LOGITS)
    probs[:k] = torch.softmax(LOGITS[:k], -1)  # LOGITS is sorted descending
    assert_frequencies(counts, probs)


def test_top_k_keeps_exactly_k_when_logits_tie() -> None:
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    counts = draw(logits, SamplingParams(temperature=1.0, top_k=2), n=400)
    assert int((counts > 0).sum()) == 2


def test_top_k_at_or_above_vocab_is_no_cut() -> None:
    counts = draw(LOGITS, SamplingParams(temperature=1.0, top_k=100))
    assert_frequencies(counts, torch.softmax(LOGITS, -1))


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.3, 1), (0.55, 2), (0.8, 3), (0.999, 6)],
    ids=lambda v: f"{v}",
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p: float, kept: int) -> None:
    """probs = [0.5, 0.25, 0.15, 0.05, 0.03, 0.02]: prefix masses 0.5, 0.75, 0.9, ..."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.05, 0.03, 0.02])
    counts = draw(probs.log(), SamplingParams(temperature=1.0, top_p=top_p))
    expected = torch.zeros(6)
    expected[:kept] = probs[:kept] / probs[:kept].sum()
    assert_frequencies(counts, expected)


def test_top_k_then_top_p_combine() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # top_k=3 renormalises to [4/9, 3/9, 2/9]; top_p=0.6 then keeps the first two.
    counts = draw(probs.log(), SamplingParams(temperature=1.0, top_k=3, top_p=0.6))
    assert_frequencies(counts, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))


def test_seeded_generators_repeat_and_differ_by_seed() -> None:
    logits = torch.zeros(1000)  # uniform: any difference in the generator shows
    p = SamplingParams(temperature=1.0, seed=1234)

    def run(params: SamplingParams) -> list[int]:
        gen = make_generator(params, CPU)
        return [sample(logits, params, gen) for _ in range(20)]

    assert run(p) == run(p)
    assert run(p) != run(SamplingParams(temperature=1.0, seed=1235))


def test_unseeded_generators_differ() -> None:
    p = SamplingParams(temperature=1.0)
    a, b = make_generator(p, CPU), make_generator(p, CPU)
    assert a is not None and b is not None and a.initial_seed() != b.initial_seed()


def test_stop_normalisation() -> None:
    p = SamplingParams(stop="###", stop_token_ids=[5, 6])
    assert p.stop == ("###",) and p.stop_token_ids == (5, 6)
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"max_tokens": 0}, "max_tokens", id="max_tokens-0"),
        pytest.param({"max_tokens": 2.5}, "max_tokens", id="max_tokens-float"),
        pytest.param({"temperature": -0.1}, "temperature", id="temperature-negative"),
        pytest.param({"temperature": math.nan}, "temperature", id="temperature-nan"),
        pytest.param({"temperature": "0.7"}, "temperature", id="temperature-str"),
        pytest.param({"top_k": -1}, "top_k", id="top_k-negative"),
        pytest.param({"top_k": 1.5}, "top_k", id="top_k-float"),
        pytest.param({"top_p": 0.0}, "top_p", id="top_p-0"),
        pytest.param({"top_p": 1.5}, "top_p", id="top_p-above-1"),
        pytest.param({"stop": ("",)}, "stop", id="stop-empty"),
        pytest.param({"stop": (3,)}, "stop", id="stop-not-str"),
        pytest.param({"stop_token_ids": (-1,)}, "stop_token_ids", id="stop_token_ids-negative"),
        pytest.param({"seed": 1.5}, "seed", id="seed-float"),
        pytest.param({"seed": -3}, "seed", id="seed-negative"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**kwargs)


def test_sampling_error_is_a_value_error() -> None:
    assert issubclass(SamplingError, ValueError)
