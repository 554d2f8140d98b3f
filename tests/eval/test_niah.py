"""NIAH depth x length grid: lengths, depths, needle placement, seeding, heat map."""

from __future__ import annotations

import math
import sys

import pytest

from shadowkv.eval import (
    Haystack,
    generate_niah_samples,
    heatmap_grid,
    niah_depths,
    niah_lengths,
    plot_heatmap,
    token_counter,
)
from shadowkv.eval.niah import NIAH_MAX_NEW_TOKENS

from .test_ruler import (
    NO_SMOLLM2,
    PG_ESSAYS,
    ByteTokenizer,
    WhitespaceTokenizer,
    load_smollm2_tokenizer,
)


@pytest.fixture(scope="module")
def essays() -> Haystack:
    if not PG_ESSAYS.is_file():
        pytest.skip(f"haystack corpus {PG_ESSAYS} is not present")
    return Haystack.from_path(PG_ESSAYS)


@pytest.fixture(params=["whitespace", "bytes", "smollm2"])
def tokenizer(request):
    if request.param == "smollm2":
        tokenizer = load_smollm2_tokenizer()
        if tokenizer is None:
            pytest.skip(NO_SMOLLM2)
        return tokenizer
    return {"whitespace": WhitespaceTokenizer(), "bytes": ByteTokenizer()}[request.param]


def test_paper_grid():
    assert niah_lengths(131072) == [16384 + 8192 * i for i in range(15)]
    assert niah_depths() == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    assert niah_lengths(4096, 1024, 4) == [1024, 2048, 3072, 4096]


def test_grid_fits_and_hides_one_needle(tokenizer, essays):
    lengths, depths = [1024, 2048], [0, 33, 67, 100]
    count = token_counter(tokenizer)
    samples = generate_niah_samples(tokenizer, essays, lengths, depths)
    assert [(s.length_target, s.metadata["depth"]) for s in samples] == [
        (n, d) for n in lengths for d in depths
    ]
    for sample in samples:
        assert sample.num_tokens == count(sample.prompt)
        assert sample.max_new_tokens == NIAH_MAX_NEW_TOKENS
        assert 0.95 * sample.length_target <= sample.length <= sample.length_target
        number, city = sample.outputs[0], sample.metadata["city"]
        assert len(number) == 7 and sample.input.count(number) == 1
        assert sample.input.count(f"\nThe special magic {city} number is: {number}\n") == 1
        assert f"Question: What is the special magic {city} number?" in sample.input
        assert sample.input.endswith("Keep your response short and direct. Answer: ")


def test_needle_depths(essays):
    tok = WhitespaceTokenizer()
    samples = generate_niah_samples(tok, essays, [4096], [0, 25, 50, 75, 100])
    for sample in samples:
        depth, measured = sample.metadata["depth"], sample.metadata["depth_tokens"]
        # Insertion walks back to a sentence end, so the needle lands at or a little before
        # (measured in tokens, placed by characters, hence the small upper slack).
        assert depth - 10 <= measured <= depth + 2
        needle = f"\nThe special magic {sample.metadata['city']} number is: {sample.outputs[0]}\n"
        context = sample.input.split("irrelevant).\n", 1)[1].rsplit("\n\nQuestion:", 1)[0]
        at = context.index(needle)
        if depth == 0:
            assert at == 0
        elif depth == 100:
            assert context.endswith(needle)
        else:
            assert context[at - 1] in ".\n"
    positions = [s.metadata["needle_token_position"] for s in samples]
    assert positions == sorted(positions)


def test_seeding(essays):
    tok = WhitespaceTokenizer()
    first = generate_niah_samples(tok, essays, [1024], [0, 50], seed=3)
    assert first == generate_niah_samples(tok, essays, [1024], [0, 50], seed=3)
    other = generate_niah_samples(tok, essays, [1024], [0, 50], seed=4)
    assert [s.outputs for s in first] != [s.outputs for s in other]
    assert first[0].outputs != first[1].outputs


def test_chat_template_and_too_short(essays):
    tok = WhitespaceTokenizer()
    sample = generate_niah_samples(tok, essays, [1024], [50], chat_template="qwen")[0]
    assert sample.input.startswith("<|im_start|>system\nYou are a helpful assistant")
    assert sample.length <= 1024
    with pytest.raises(ValueError, match="too short"):
        generate_niah_samples(tok, essays, [40], [50])


def test_heatmap_grid_averages_repeats():
    lengths, depths, grid = heatmap_grid(
        [(2048, 0, 1.0), (1024, 0, 0.0), (1024, 0, 1.0), (2048, 50, 0.25)]
    )
    assert lengths == [1024, 2048] and depths == [0, 50]
    assert grid[0] == [0.5, 1.0]
    assert math.isnan(grid[1][0]) and grid[1][1] == 0.25


def test_plot_heatmap_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    results = [(n, d, (n + d) % 3 / 2) for n in (16384, 24576, 32768) for d in niah_depths()]
    path = plot_heatmap(results, tmp_path / "niah.png", "SmolLM2 / dense")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no NIAH results"):
        plot_heatmap([], tmp_path / "empty.png")


def test_plot_heatmap_without_matplotlib(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.colors"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_heatmap([(1024, 0, 1.0)], tmp_path / "x.png")
