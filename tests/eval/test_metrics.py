"""RULER and ShadowKV metrics on hand-written predictions."""

from __future__ import annotations

import pytest

from shadowkv.eval import (
    TaskScore,
    aggregate,
    mean_row,
    metric_names,
    multi_number,
    multi_words,
    needle_score,
    score,
    shadowkv_string_match_part,
    string_match_all,
    string_match_part,
)
from shadowkv.eval.metrics import normalize_answer, postprocess, shadowkv_postprocess

UUID = "8540a2dd-df10-4503-94e0-749ce70accbc"


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"], 2 / 3),
        ("ABC-DEF", ["abc-def"], 1.0),
        ("the word is Misty-Lantern", ["misty-lantern"], 1.0),
        ("", ["1234567"], 0.0),
        ("12345678", ["1234567"], 1.0),  # plain substring match
    ],
)
def test_string_match_all(prediction, references, expected):
    assert string_match_all(prediction, references) == pytest.approx(expected)


def test_string_match_part():
    assert string_match_part("It is in PARIS, France.", ["paris", "lyon"]) == 1.0
    assert string_match_part("Paris", ["paris, france"]) == 0.0
    assert string_match_part("", ["paris"]) == 0.0


def test_postprocessing():
    assert postprocess("  7654321\x00\x1fnext \n") == "7654321\n\nnext"
    assert shadowkv_postprocess(" 42<|eot_id|></s>\x07 ") == "42"


def test_normalize_answer():
    assert normalize_answer("The  Answer: an Apple, a PEAR!") == "answer apple pear"
    assert normalize_answer(UUID) == UUID.replace("-", "")


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("1234567.", "1234567", 1.0),
        ("The special magic number is 1234567", "1234567", 1.0),
        ("12345678", "1234567", 1.0),  # ShadowKV compares a gold-length prefix
        ("It is 123456.", "1234567", 0.0),
        ("is 12345678 maybe", "1234567", 0.0),
        (f"The uuid is {UUID.upper()}.", UUID, 1.0),  # hyphens and case normalised away
        ("1234567<|eot_id|>", "1234567", 1.0),
        ("", "1234567", 0.0),
    ],
)
def test_needle_score(prediction, reference, expected):
    assert needle_score(prediction, reference) == expected


def test_multi_number():
    refs = ["1111111", "2222222", "3333333"]
    assert multi_number("They are 1111111, 2222222.", refs) == pytest.approx(2 / 3)
    assert multi_number("11111112 and 3333333", refs) == pytest.approx(1 / 3)  # whole digit runs
    assert multi_number("none", refs) == 0.0


def test_multi_words():
    assert multi_words("abcde, FGHIJ and klmno", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]) == 0.75
    assert multi_words("the dump truck", ["dump truck"]) == 0.0  # multi-word gold never matches
    assert multi_words("red-apple", ["red-apple"]) == 0.0
    assert multi_words("kettles", ["kettle"]) == 0.0


def test_shadowkv_string_match_part():
    assert shadowkv_string_match_part("Paris", ["paris, france"]) == 1.0  # pred inside ref
    assert shadowkv_string_match_part("It is Paris.", ["paris"]) == 1.0
    assert shadowkv_string_match_part("Lyon", ["paris"]) == 0.0
    assert shadowkv_string_match_part("", ["paris"]) == 1.0  # ShadowKV's empty-prediction quirk
    assert shadowkv_string_match_part("<|eot_id|>", ["paris"]) == 1.0


def test_metric_families_per_task():
    assert metric_names("niah_single_3") == ("string_match_all", "needle_score")
    assert metric_names("niah") == ("string_match_all", "needle_score")
    assert metric_names("niah_multiquery") == ("string_match_all", "multi_number")
    assert metric_names("niah_multivalue") == ("string_match_all", "multi_number")
    for task in ("vt", "cwe", "fwe"):
        assert metric_names(task) == ("string_match_all", "multi_words")
    assert metric_names("qa_2") == ("string_match_part", "shadowkv_string_match_part")
    with pytest.raises(ValueError, match="no metric"):
        metric_names("longbench_qasper")


def test_score_reports_both_families():
    assert score("niah_single_1", " 1234567.\n", ["1234567"]) == {"ruler": 1.0, "shadowkv": 1.0}
    # RULER matches a substring, ShadowKV's needle_score wants it first or as a whole word.
    assert score("niah_single_2", "no:1234567", ["1234567"]) == {"ruler": 1.0, "shadowkv": 0.0}
    assert score("niah_multivalue", "1111111, 22222229", ["1111111", "2222222"]) == {
        "ruler": 1.0,
        "shadowkv": 0.5,
    }
    assert score("vt", "ABCDE BCDEF", ["ABCDE", "BCDEF", "CDEFG", "DEFGH", "EFGHI"]) == {
        "ruler": 0.4,
        "shadowkv": 0.4,
    }
    assert score("qa_1", "", ["Denver Broncos"]) == {"ruler": 0.0, "shadowkv": 1.0}
    with pytest.raises(ValueError, match="non-empty"):
        score("vt", "x", [])
    with pytest.raises(ValueError, match="non-empty"):
        score("vt", "x", "ABCDE")


def test_aggregate_and_mean_row():
    records = [
        ("niah_single_1", "1234567", ["1234567"]),
        ("niah_single_1", "", ["7654321"]),
        ("niah_single_1", "no:7654321", ["7654321"]),
        ("fwe", "abcdef ghijkl", ["abcdef", "ghijkl", "mnopqr"]),
    ]
    scores = aggregate(records)
    assert list(scores) == ["niah_single_1", "fwe"]
    assert scores["niah_single_1"] == TaskScore("niah_single_1", 3, 66.67, 33.33, 1)
    assert scores["fwe"] == TaskScore("fwe", 1, 66.67, 66.67, 0)
    assert mean_row(scores) == TaskScore("mean", 4, 66.67, 50.0, 1)
    with pytest.raises(ValueError):
        mean_row({})
