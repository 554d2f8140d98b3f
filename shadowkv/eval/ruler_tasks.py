"""Per-task prompt builders for the RULER generator.

`task_builder(ctx)` returns a task's `build(size, rng, index) -> Draft` and its smallest valid
size: needles in a noise, essay or distractor-needle haystack (niah), a variable-tracking chain
with its one-shot demo (vt), common- and frequent-word counting (cwe, fwe), and documents around a
question (qa). `sample_rng` seeds one sample's random stream; the text comes from `ruler_spec`.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shadowkv.eval import words
from shadowkv.eval.haystack import Haystack, QADataset, noise_lines, split_sentences
from shadowkv.eval.ruler_fit import fit_size
from shadowkv.eval.ruler_spec import (
    CWE_ANSWER_PREFIX,
    CWE_NUM_COMMON,
    CWE_TEMPLATE,
    DEPTHS,
    FWE_ALPHA,
    FWE_ANSWER_PREFIX,
    FWE_TEMPLATE,
    NIAH_ANSWER_PREFIX,
    NIAH_NEEDLE,
    NIAH_TEMPLATE,
    QA_ANSWER_PREFIX,
    QA_TEMPLATE,
    VT_ANSWER_PREFIX,
    VT_DEMO_TOKENS,
    VT_HOPS,
    VT_TEMPLATE,
    ChatTemplate,
    NiahConfig,
    TaskSpec,
)

_ZETA_FWE = math.pi**2 / 6  # zeta(FWE_ALPHA)
_SINGULAR = (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer"))
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Draft:
    """One built prompt before it is measured: the model sees `input + answer_prefix`."""

    input: str
    answer_prefix: str
    outputs: list[str]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class BuildContext:
    """What every build of one (task, target length, seed) call shares; `count` is
    `text -> tokens`, `chat` wraps a task template in the chat template."""

    spec: TaskSpec
    target_length: int
    seed: int
    count: Callable[[str], int]
    chat: ChatTemplate
    ruler_compat: bool
    haystack: Haystack | None
    qa: QADataset | None


Build = Callable[[int, random.Random, int], Draft]


def task_builder(ctx: BuildContext) -> tuple[Build, int]:
    """The task's `build(size, rng, index)` and its smallest valid size."""
    spec = ctx.spec
    if spec.kind == "niah":
        cfg = spec.niah
        assert cfg is not None
        min_size = 0 if cfg.haystack == "essay" else cfg.num_keys * cfg.num_values
        return (lambda size, rng, _: _niah(ctx, cfg, size, rng)), min_size
    if spec.kind == "vt":
        demo = _vt_demo(ctx)
        return (lambda size, rng, _: _vt(ctx, size, rng, demo)), VT_HOPS + 1
    if spec.kind == "cwe":
        pool = words.word_pool()
        random.Random(ctx.seed).shuffle(pool)
        return (lambda size, rng, _: _cwe(ctx, size, rng, pool)), CWE_NUM_COMMON
    if spec.kind == "fwe":
        return (lambda size, rng, _: _fwe(ctx, size, rng)), _fwe_min_words()
    assert ctx.qa is not None
    num_gold = max(len(item.gold) for item in ctx.qa.items)
    return (lambda size, rng, index: _qa(ctx, size, rng, index)), num_gold


def _niah(ctx: BuildContext, cfg: NiahConfig, size: int, rng: random.Random) -> Draft:
    keys: list[str] = []
    while len(keys) < cfg.num_keys:
        key = _random_item(cfg.key_type, rng)
        if key not in keys:
            keys.append(key)
    values = [[_random_item(cfg.value_type, rng) for _ in range(cfg.num_values)] for _ in keys]
    needles = [
        _fill(NIAH_NEEDLE, type_needle_v=cfg.value_type, key=key, value=value)
        for key, key_values in zip(keys, values)
        for value in key_values
    ]
    _shuffle(needles, rng, ctx)
    queries = rng.sample(keys, cfg.num_queries)
    outputs = [value for q in queries for value in values[keys.index(q)]]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]

    if cfg.haystack == "essay":
        assert ctx.haystack is not None
        context, depths = _insert_at_depths(ctx.haystack.text(size), needles, rng)
    else:
        if cfg.haystack == "noise":
            lines = noise_lines(size)
        else:
            lines = []
            while len(lines) < size:
                key = _random_item(cfg.key_type, rng)
                if key not in keys:
                    value = _random_item(cfg.value_type, rng)
                    lines.append(
                        _fill(NIAH_NEEDLE, type_needle_v=cfg.value_type, key=key, value=value)
                    )
        lines, positions = _insert_lines(lines, needles, rng)
        context = "\n".join(lines)
        depths = [round(100 * p / size, 2) for p in positions]

    template, prefix, type_v = ctx.chat(NIAH_TEMPLATE), NIAH_ANSWER_PREFIX, cfg.value_type
    if cfg.num_queries * cfg.num_values == 1:
        template, prefix, type_v = _singular(template), _singular(prefix), type_v[:-1]
    return Draft(
        input=_fill(template, type_needle_v=type_v, context=context, query=query),
        answer_prefix=_fill(prefix, type_needle_v=type_v, query=query),
        outputs=outputs,
        metadata={"depths": depths},
    )


def _insert_at_depths(text: str, needles: list[str], rng: random.Random) -> tuple[str, list[int]]:
    """Insert each needle as a sentence at a distinct depth from `DEPTHS` (0: first, 100: last)."""
    sentences = split_sentences(text)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    cuts = [0] + [int(len(sentences) * d / 100) for d in depths] + [len(sentences)]
    pieces: list[str] = []
    for i, needle in enumerate(needles):
        pieces.extend(sentences[cuts[i] : cuts[i + 1]])
        pieces.append(needle)
    pieces.extend(sentences[cuts[-2] :])
    return " ".join(pieces), depths


def _insert_lines(
    lines: list[str], inserts: list[str], rng: random.Random
) -> tuple[list[str], list[int]]:
    """Insert each line before a distinct random original line; returns original positions."""
    positions = sorted(rng.sample(range(len(lines)), len(inserts)))
    out = list(lines)
    for offset, (pos, line) in enumerate(zip(positions, inserts)):
        out.insert(pos + offset, line)
    return out, positions


def _vt_demo(ctx: BuildContext) -> tuple[str, list[str]]:
    """RULER's one-shot vt example: 3-letter names, value 12345, bare template, fitted to
    `VT_DEMO_TOKENS` (a quarter of the budget at short lengths, and never below the minimum)."""
    names = _vt_names(random.Random(f"{ctx.seed}:vt-demo"), VT_HOPS + 1, 3)

    def demo(size: int) -> str:
        chain = _vt_chain(names, "12345")
        lines, _ = _insert_lines(noise_lines(size), chain, sample_rng(ctx, "demo"))
        context = "\n".join(lines).replace(". \n", ".\n")
        prompt = _fill(
            VT_TEMPLATE + VT_ANSWER_PREFIX, context=context, query="12345", num_v=str(len(names))
        )
        return f"{prompt} {' '.join(names)}\n"

    budget = min(VT_DEMO_TOKENS, (ctx.target_length - ctx.spec.max_new_tokens) // 4)
    min_size = VT_HOPS + 1
    try:
        size = fit_size(lambda s: ctx.count(demo(s)), budget, min_size)
    except ValueError:
        size = min_size
    return demo(size), names


def _vt(ctx: BuildContext, size: int, rng: random.Random, demo: tuple[str, list[str]]) -> Draft:
    demo_text, demo_names = demo
    fresh = _vt_names(rng, len(demo_names), len(demo_names[0]))
    mapping = dict(zip(demo_names, fresh)) | {"12345": str(rng.randint(10000, 99999))}
    # One pass, whole words only, so a fresh name can never be renamed again.
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")
    demo_text = pattern.sub(lambda m: mapping[m[1]], demo_text)

    names = _vt_names(rng, VT_HOPS + 1, 5)
    value = str(rng.randint(10000, 99998))
    lines, positions = _insert_lines(noise_lines(size), _vt_chain(names, value), rng)
    context = "\n".join(lines).replace(". \n", ".\n")
    return Draft(
        input=_fill(ctx.chat(demo_text + "\n" + VT_TEMPLATE), context=context, query=value),
        answer_prefix=_fill(VT_ANSWER_PREFIX, num_v=str(len(names)), query=value),
        outputs=names,
        metadata={"depths": [round(100 * p / size, 2) for p in positions]},
    )


def _vt_names(rng: random.Random, count: int, length: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = words.random_letters(rng, length, string.ascii_uppercase)
        if name not in names and name != "VAR":
            names.append(name)
    return names


def _vt_chain(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}"] + [
        f"VAR {names[j]} = VAR {names[j - 1]} " for j in range(1, len(names))
    ]


def _cwe(ctx: BuildContext, size: int, rng: random.Random, pool: list[str]) -> Draft:
    long_context = ctx.target_length >= 4096
    demo_shape, shape = ((40, 10, 3), (30, 3)) if long_context else ((20, 3, 1), (6, 1))
    demo_list, demo_common = _cwe_list(ctx, rng, pool, *demo_shape)
    context, common = _cwe_list(ctx, rng, pool, size, *shape)
    template = ctx.chat(CWE_TEMPLATE)
    demo = f"{_fill(template, context=demo_list)}{CWE_ANSWER_PREFIX} {_numbered(demo_common)}\n"
    return Draft(
        input=demo + _fill(template, context=context),
        answer_prefix=CWE_ANSWER_PREFIX,
        outputs=common,
        metadata={},
    )


def _cwe_list(
    ctx: BuildContext,
    rng: random.Random,
    pool: list[str],
    num_words: int,
    rep_common: int,
    rep_rare: int,
) -> tuple[str, list[str]]:
    """A numbered list where the first 10 of `num_words` random distinct words repeat
    `rep_common` times and the rest `rep_rare` times; pseudo-words extend a short pool."""
    chosen = rng.sample(pool, min(num_words, len(pool)))
    chosen += words.pseudo_words(rng, num_words - len(chosen), frozenset(pool))
    common, rare = chosen[:CWE_NUM_COMMON], chosen[CWE_NUM_COMMON:]
    items = common * rep_common + rare * rep_rare
    _shuffle(items, rng, ctx)
    return _numbered(items), common


def _numbered(items: list[str]) -> str:
    return " ".join(f"{i}. {w}" for i, w in enumerate(items, 1))


def _fwe(ctx: BuildContext, size: int, rng: random.Random) -> Draft:
    """`size` coded words whose rank-k word appears int(size * k^-alpha / zeta(alpha)) times."""
    num_vocab = (ctx.target_length - ctx.spec.max_new_tokens) // 50
    if num_vocab < 5:
        raise ValueError(f"fwe needs target_length >= {5 * 50 + ctx.spec.max_new_tokens}")
    vocab: set[str] = set()
    while len(vocab) < num_vocab:
        vocab.add(words.random_letters(rng, 6, string.ascii_lowercase))
    ranked = sorted(vocab)
    _shuffle(ranked, rng, ctx)
    ranked[0] = "..."
    items = [w for k, w in enumerate(ranked, 1) for _ in range(_fwe_count(size, k))]
    _shuffle(items, rng, ctx)
    return Draft(
        input=_fill(ctx.chat(FWE_TEMPLATE), context=" ".join(items)),
        answer_prefix=FWE_ANSWER_PREFIX,
        outputs=ranked[1:4],
        metadata={},
    )


def _fwe_count(total: int, rank: int) -> int:
    return int(total * rank**-FWE_ALPHA / _ZETA_FWE)


def _fwe_min_words() -> int:
    """Fewest words for which ranks 2-4 strictly outnumber rank 5 (a unique answer)."""
    total = 1
    while not all(_fwe_count(total, k) > _fwe_count(total, k + 1) for k in (2, 3, 4)):
        total += 1
    return total


def _qa(ctx: BuildContext, size: int, rng: random.Random, index: int) -> Draft:
    assert ctx.qa is not None
    item, num_pool = ctx.qa.items[index], len(ctx.qa.docs)
    chosen = list(item.gold)
    more = list(item.more)
    if len(more) > size - len(chosen):
        more = rng.sample(more, size - len(chosen))
    chosen += more
    taken = set(chosen)
    others = [d for d in range(num_pool) if d not in taken]
    missing = size - len(chosen)
    if missing <= len(others):
        chosen += rng.sample(others, missing)
    else:
        # Past the pool size RULER HEAD repeats the pool.
        chosen += others + [d % num_pool for d in range(missing - len(others))]
    _shuffle(chosen, rng, ctx)
    context = "\n\n".join(f"Document {i}:\n{ctx.qa.docs[d]}" for i, d in enumerate(chosen, 1))
    gold = set(item.gold)
    return Draft(
        input=_fill(ctx.chat(QA_TEMPLATE), context=context, query=item.question),
        answer_prefix=QA_ANSWER_PREFIX,
        outputs=list(item.answers),
        metadata={"gold_positions": [i for i, d in enumerate(chosen) if d in gold]},
    )


def sample_rng(ctx: BuildContext, index: int | str) -> random.Random:
    # str seeds hash with SHA-512, so the stream is stable across processes and platforms.
    return random.Random(f"{ctx.seed}:{ctx.spec.name}:{ctx.target_length}:{index}")


def _shuffle(items: list, rng: random.Random, ctx: BuildContext) -> None:
    (random.Random(ctx.seed) if ctx.ruler_compat else rng).shuffle(items)


def _random_item(kind: str, rng: random.Random) -> str:
    if kind == "words":
        return words.random_word_key(rng)
    if kind == "numbers":
        return words.random_number(rng)
    if kind == "uuids":
        return words.random_uuid(rng)
    raise ValueError(f"unknown needle item type {kind!r}")


def _singular(text: str) -> str:
    for old, new in _SINGULAR:
        text = text.replace(old, new)
    return text


def _fill(template: str, **values: str) -> str:
    """Replace `{name}` for the given names in one pass; other braces are left alone, so chat
    templates and filled-in text may contain braces."""
    return _PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), template)
