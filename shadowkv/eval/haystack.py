"""Haystacks for the synthetic tasks: essay words, the noise sentence, QA document pools.

An essay haystack follows RULER: the corpus text with every whitespace run collapsed to one
space, split on spaces (so the first item is `""` when the corpus starts with whitespace), and
the first N words re-joined with spaces. Needles go between sentences, found by our own
deterministic splitter (RULER uses NLTK punkt, whose data cannot be downloaded offline; the
splitter only decides where needles may go).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

NOISE_LINE = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e inc ltd co no fig approx dept est mt".split()
)
# A terminator, optional closing quotes/brackets, whitespace, then something that can start a
# sentence. The lookahead keeps the next sentence's first character out of the match.
_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+(?=[A-Z0-9\"'\u201c\u2018(\[])")


@dataclass(frozen=True)
class Haystack:
    """A word haystack; `text(n)` is its first `n` words, repeating the corpus cyclically."""

    name: str
    words: tuple[str, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if not any(self.words):
            raise ValueError(f"haystack {self.name!r} has no words")

    @classmethod
    def from_text(cls, text: str, name: str = "text") -> Haystack:
        return cls(name=name, words=tuple(re.sub(r"\s+", " ", text).split(" ")))

    @classmethod
    def from_path(cls, path: str | Path) -> Haystack:
        """Load a `.jsonl` (one `{"text": ...}` per line), RULER `.json` or plain-text corpus."""
        return cls.from_text(load_corpus_text(path), name=Path(path).stem)

    @classmethod
    def noise(cls) -> Haystack:
        """The noise sentence as a word haystack: needs no corpus, but is not RULER's essay."""
        return cls.from_text(NOISE_LINE, name="noise")

    def text(self, num_words: int) -> str:
        full, rest = divmod(num_words, len(self.words))
        return " ".join(self.words * full + self.words[:rest])


def load_corpus_text(path: str | Path) -> str:
    """The corpus as one string.

    `.jsonl`: the `text` fields joined in file order (for `pg_essays.jsonl` this is RULER's
    haystack byte for byte). `.json`: an object with a `text` string or a list of strings or
    `{"text": ...}` objects. Anything else is read as UTF-8 text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"haystack corpus not found: {path}")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        return "".join(_record_text(r, path) for r in records)
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return _record_text(data, path)
        return "".join(r if isinstance(r, str) else _record_text(r, path) for r in data)
    return path.read_text(encoding="utf-8")


def _record_text(record: object, path: Path) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}: every record needs a string 'text' field")
    return record["text"]


def noise_lines(num_lines: int) -> list[str]:
    return [NOISE_LINE] * num_lines


def split_sentences(text: str) -> list[str]:
    """Split after `.`, `!` or `?` (plus closing quotes/brackets) followed by whitespace and an
    uppercase letter, digit, quote or bracket, except after a known abbreviation or an initial.

    Sentences are returned stripped; `" ".join(...)` restores the text up to whitespace.
    """
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        end = match.start() + 1
        if text[end - 1] == "." and _is_abbreviation(text[start:end]):
            continue
        piece = text[start : match.end()].strip()
        if piece:
            sentences.append(piece)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _is_abbreviation(sentence_so_far: str) -> bool:
    words = sentence_so_far.split()
    last = words[-1].lower().rstrip(".") if words else ""
    return last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())


@dataclass(frozen=True)
class QAItem:
    """One question; `gold` and `more` index into the dataset's document pool."""

    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]
    more: tuple[int, ...] = ()


@dataclass(frozen=True)
class QADataset:
    """A sorted pool of distinct documents and the questions over them, in file order."""

    name: str
    docs: tuple[str, ...]
    items: tuple[QAItem, ...]


def load_qa(path: str | Path, dataset: str) -> QADataset:
    """Load a SQuAD-format (`dataset="squad"`) or HotpotQA-format (`"hotpotqa"`) JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file not found: {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if dataset == "squad":
        if not (isinstance(data, dict) and isinstance(data.get("data"), list)):
            raise ValueError(f"{path} is not SQuAD format (expected an object with a 'data' list)")
        return _squad(data["data"])
    if dataset == "hotpotqa":
        if not (isinstance(data, list) and all("context" in d for d in data)):
            raise ValueError(f"{path} is not HotpotQA format (expected a list with 'context')")
        return _hotpotqa(data)
    raise ValueError(f"unknown QA dataset {dataset!r}; expected 'squad' or 'hotpotqa'")


def _squad(articles: list[dict]) -> QADataset:
    docs = sorted({p["context"] for a in articles for p in a["paragraphs"]})
    doc_index = {d: i for i, d in enumerate(docs)}
    items = []
    for article in articles:
        article_docs = [doc_index[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            gold = doc_index[paragraph["context"]]
            more = tuple(sorted({d for d in article_docs if d != gold}))
            for qa in paragraph["qas"]:
                # SQuAD v1 has no `is_impossible`; all its questions are answerable.
                if qa.get("is_impossible", False):
                    continue
                answers = tuple(a["text"] for a in qa["answers"])
                items.append(QAItem(qa["question"], answers, (gold,), more))
    return QADataset("squad", tuple(docs), tuple(items))


def _hotpotqa(records: list[dict]) -> QADataset:
    def doc(paragraph: list) -> str:
        title, sentences = paragraph
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({doc(p) for r in records for p in r["context"]})
    doc_index = {d: i for i, d in enumerate(docs)}
    items = []
    for record in records:
        gold = tuple(dict.fromkeys(doc_index[doc(p)] for p in record["context"]))
        items.append(QAItem(record["question"], (record["answer"],), gold))
    return QADataset("hotpotqa", tuple(docs), tuple(items))
