"""RULER's and ShadowKV's per-sample metrics, and per-task aggregation.

Every per-sample score is in [0, 1]; task scores are 100 x the mean, rounded to 2 decimals.
RULER: `string_match_all` (niah, vt, cwe, fwe) and `string_match_part` (qa), after RULER's
prediction post-processing. ShadowKV (`data/metrics.py` at a21f5a9): `needle_score` (niah_*),
`multi_number` (niah_multivalue, niah_multiquery), `multi_words` (vt, cwe, fwe) and
`shadowkv_string_match_part` (qa), each with ShadowKV's own normalisation and quirks.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

_CONTROL = re.compile(r"[\x00-\x1f]")
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def postprocess(prediction: str) -> str:
    """RULER: strip, turn control characters into newlines, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of references that are case-insensitive substrings of the prediction."""
    _check(references)
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1 if any reference is a case-insensitive substring of the prediction, else 0."""
    _check(references)
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


def normalize_answer(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation, drop articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def shadowkv_postprocess(prediction: str) -> str:
    """ShadowKV: strip, drop end-of-turn markers (and their fragments), control chars -> `\\n`."""
    text = prediction.strip()
    for marker in ("<|eot_id|>", "</s>", "</s", "</"):
        text = text.replace(marker, "")
    return _CONTROL.sub("\n", text).strip()


def needle_score(prediction: str, reference: str) -> float:
    """1 if the normalised prediction starts with the normalised reference or has it as a
    whitespace token, else 0 (UUIDs lose their hyphens on both sides)."""
    pred = normalize_answer(shadowkv_postprocess(prediction))
    ref = normalize_answer(reference)
    return float(pred[: len(ref)] == ref or ref in pred.split())


def multi_number(prediction: str, references: Sequence[str]) -> float:
    """Fraction of references among the digit runs of the normalised prediction."""
    _check(references)
    numbers = re.findall(r"\d+", normalize_answer(prediction))
    return sum(r in numbers for r in references) / len(references)


def multi_words(prediction: str, references: Sequence[str]) -> float:
    """Fraction of lowercased references among the `\\b\\w+\\b` words of the lowercased
    prediction; a reference containing a space or hyphen can never match."""
    _check(references)
    found = re.findall(r"\b\w+\b", prediction.lower())
    return sum(r.lower() in found for r in references) / len(references)


def shadowkv_string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1 if some reference contains, or is contained in, the prediction (case-insensitive).

    Quirk kept from ShadowKV: an empty prediction is inside every reference and scores 1."""
    _check(references)
    pred = shadowkv_postprocess(prediction).lower()
    return float(any(r.lower() in pred or pred in r.lower() for r in references))


def metric_names(task: str) -> tuple[str, str]:
    """(RULER metric, ShadowKV metric) used for `task`."""
    if task.startswith("qa"):
        return "string_match_part", "shadowkv_string_match_part"
    if task in ("niah_multivalue", "niah_multiquery"):
        return "string_match_all", "multi_number"
    if task.startswith("niah"):
        return "string_match_all", "needle_score"
    if task in ("vt", "cwe", "fwe"):
        return "string_match_all", "multi_words"
    raise ValueError(f"no metric known for task {task!r}")


def score(task: str, prediction: str, outputs: Sequence[str]) -> dict[str, float]:
    """Per-sample scores in [0, 1]: `{"ruler": ..., "shadowkv": ...}`."""
    ruler_name, shadowkv_name = metric_names(task)
    ruler = _METRICS[ruler_name](postprocess(prediction), outputs)
    if shadowkv_name == "needle_score":
        _check(outputs)
        shadowkv = sum(needle_score(prediction, r) for r in outputs) / len(outputs)
    else:
        shadowkv = _METRICS[shadowkv_name](prediction, outputs)
    return {"ruler": ruler, "shadowkv": shadowkv}


@dataclass(frozen=True)
class TaskScore:
    """Task scores as 100 x the mean per-sample score; `nulls` counts empty predictions."""

    task: str
    num_samples: int
    ruler: float
    shadowkv: float
    nulls: int


def aggregate(records: Iterable[tuple[str, str, Sequence[str]]]) -> dict[str, TaskScore]:
    """Score `(task, prediction, outputs)` records and average per task, in first-seen order."""
    samples: dict[str, list[dict[str, float]]] = {}
    nulls: dict[str, int] = {}
    for task, prediction, outputs in records:
        samples.setdefault(task, []).append(score(task, prediction, outputs))
        nulls[task] = nulls.get(task, 0) + (not postprocess(prediction))
    return {
        task: TaskScore(
            task=task,
            num_samples=len(rows),
            ruler=round(100 * sum(r["ruler"] for r in rows) / len(rows), 2),
            shadowkv=round(100 * sum(r["shadowkv"] for r in rows) / len(rows), 2),
            nulls=nulls[task],
        )
        for task, rows in samples.items()
    }


def mean_row(scores: Mapping[str, TaskScore]) -> TaskScore:
    """The headline row: the plain mean of the task scores (each task weighs the same)."""
    if not scores:
        raise ValueError("no task scores to average")
    rows = list(scores.values())
    return TaskScore(
        task="mean",
        num_samples=sum(r.num_samples for r in rows),
        ruler=round(sum(r.ruler for r in rows) / len(rows), 2),
        shadowkv=round(sum(r.shadowkv for r in rows) / len(rows), 2),
        nulls=sum(r.nulls for r in rows),
    )


def _check(references: Sequence[str]) -> None:
    if isinstance(references, str) or not references:
        raise ValueError("references must be a non-empty sequence of strings")


_METRICS = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "multi_number": multi_number,
    "multi_words": multi_words,
    "shadowkv_string_match_part": shadowkv_string_match_part,
}
