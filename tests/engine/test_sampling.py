"""The sampler: greedy, temperature, top-k, top-p, seeds; and SamplingParams validation."""

from __future__ import annotations

import math

import pytest
import torch

from shadowkv.engine.sampling import (
    SamplingError,
    SamplingParams,
    make_generator,
    sample,
    sample_batch,
)

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


# A mixed decode batch: greedy rows (plain and tiny-temperature), seeded temperature rows, top-k,
# top-p and both. Every row of mixed_logits() holds a tie for its max.
MIXED = [
    SamplingParams(),
    SamplingParams(temperature=0.8, seed=11),
    SamplingParams(temperature=1.0, top_k=3, seed=12),
    SamplingParams(temperature=1e-7),
    SamplingParams(temperature=1.3, top_p=0.7, seed=13),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=14),
    SamplingParams(),
]
VOCAB = 64


def mixed_logits(rows: int, seed: int = 0) -> torch.Tensor:
    """``[rows, VOCAB]`` random logits whose greedy rows hold an exact tie for the max."""
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))
    for i in range(rows):
        top = float(logits[i].max()) + 1.0
        logits[i, 40] = logits[i, 7] = top  # the first max is at 7, a second equal one at 40
    return logits


def per_row(
    logits: torch.Tensor, params: list[SamplingParams], steps: int
) -> list[list[int]]:
    """``steps`` decode steps of ``sample`` row by row, each row with its own generator."""
    gens = [make_generator(p, CPU) for p in params]
    return [
        [sample(logits[i], p, gens[i]) for i, p in enumerate(params)] for _ in range(steps)
    ]


def batched(
    logits: torch.Tensor, params: list[SamplingParams], steps: int
) -> list[list[int]]:
    """The same steps through ``sample_batch``, with freshly made (equally seeded) generators."""
    gens = [make_generator(p, CPU) for p in params]
    return [sample_batch(logits, params, gens) for _ in range(steps)]


@pytest.mark.parametrize("rows", [1, 5, len(MIXED)], ids=lambda b: f"B{b}")
def test_sample_batch_equals_sample_row_by_row(rows: int) -> None:
    params = MIXED[:rows]
    logits = mixed_logits(rows)
    expected = per_row(logits, params, steps=30)
    got = batched(logits, params, steps=30)
    assert got == expected
    # The check has teeth: the seeded rows really vary across steps.
    assert rows == 1 or len({step[1] for step in got}) > 1


@pytest.mark.parametrize("rows", [1, 5], ids=lambda b: f"B{b}")
def test_sample_batch_all_greedy_picks_the_first_max(rows: int) -> None:
    logits = mixed_logits(rows, seed=3)
    params = [SamplingParams()] * rows
    got = sample_batch(logits, params, [None] * rows)
    assert got == [sample(logits[i], params[i], None) for i in range(rows)]
    assert got == [7] * rows


def test_sample_batch_all_sampled_equals_sample() -> None:
    params = [p for p in MIXED if not p.greedy]
    logits = mixed_logits(len(params), seed=5)
    assert batched(logits, params, steps=20) == per_row(logits, params, steps=20)


def test_sample_batch_unseeded_row_uses_the_given_generator() -> None:
    """An unseeded sampled row consumes whatever generator it is handed, like ``sample``."""
    params = [SamplingParams(temperature=1.0), SamplingParams()]
    logits = mixed_logits(2, seed=9)
    gen_a, gen_b = torch.Generator().manual_seed(77), torch.Generator().manual_seed(77)
    got = [sample_batch(logits, params, [gen_a, None])[0] for _ in range(20)]
    assert got == [sample(logits[0], params[0], gen_b) for _ in range(20)]


def test_sample_batch_moves_ids_to_host_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``tolist`` per step and no per-row ``item`` / ``int`` / ``float`` / ``bool``."""
    calls: dict[str, int] = {}

    def counting(name: str) -> None:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            calls[name] = calls.get(name, 0) + 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    logits = mixed_logits(len(MIXED))
    gens = [make_generator(p, CPU) for p in MIXED]
    conversions = ("tolist", "item", "__int__", "__index__", "__float__", "__bool__", "cpu")
    for name in conversions:
        counting(name)
    ids = sample_batch(logits, MIXED, gens)
    monkeypatch.undo()
    assert calls == {"tolist": 1}
    assert len(ids) == len(MIXED) and all(isinstance(t, int) for t in ids)
    # The counter itself works: the single-row sampler is seen converting once.
    for name in conversions:
        counting(name)
    calls.clear()
    sample(logits[1], MIXED[1], gens[1])
    monkeypatch.undo()
    assert sum(calls.values()) == 1


def test_sample_batch_empty_batch() -> None:
    assert sample_batch(torch.zeros(0, VOCAB), [], []) == []


@pytest.mark.parametrize(
    ("shape", "n_params", "n_gens", "match"),
    [
        pytest.param((VOCAB,), 1, 1, "logits \\[B, V\\]", id="1d-logits"),
        pytest.param((3, VOCAB), 2, 3, "3 rows, 2 params, 3 generators", id="params-short"),
        pytest.param((3, VOCAB), 3, 4, "3 rows, 3 params, 4 generators", id="gens-long"),
    ],
)
def test_sample_batch_rejects_mismatched_inputs(
    shape: tuple[int, ...], n_params: int, n_gens: int, match: str
) -> None:
    with pytest.raises(SamplingError, match=match):
        sample_batch(torch.zeros(shape), [SamplingParams()] * n_params, [None] * n_gens)


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
