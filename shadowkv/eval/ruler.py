"""Seeded, tokenizer-aware generator for the 13 RULER synthetic tasks.

Prompt text, answer prefixes and task knobs follow RULER (NVIDIA/RULER, see
`shared/reference/ruler-spec.md`). Each task has one integer size knob (haystack words, noise or
distractor lines, distinct words, total words, documents). We binary-search the largest size
whose probe prompt satisfies

    num_tokens(input + answer_prefix) + max_new_tokens <= target_length

then build every sample at that size. A sample whose own random content overflows, or falls
more than `LENGTH_SLACK` short, is refitted by the same search. So every sample fits, and falls
short of the target by at most max(LENGTH_SLACK * target, the tokens of one size unit). Token
counts use `tokenizer.encode(text)` without special tokens (RULER counts with
`tokenizer.tokenize`, which adds no BOS).

Randomness: sample `i` draws from its own `random.Random` keyed by (seed, task, length, i), so it
does not depend on how many samples came before it. With `ruler_compat=True` the shuffles RULER
does with a fresh `Random(seed)` (needle order, cwe/fwe word order, qa document order) apply one
fixed permutation per list length, as RULER's do: e.g. the qa gold document sits at the same
index in every sample of a given length.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shadowkv.eval import words
from shadowkv.eval.haystack import Haystack, QADataset, load_qa, noise_lines, split_sentences


class Tokenizer(Protocol):
    def encode(self, text: str) -> Any: ...


ChatTemplate = Callable[[str], str]

CHAT_TEMPLATES: dict[str, str] = {
    "base": "{task_template}",
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>You are a helpful assistant"
        "<|eot_id|><|start_header_id|>user<|end_header_id|>{task_template}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>"
    ),
    "qwen": (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
        "{task_template}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "glm": (
        "[gMASK]sop<|system|>\nYou are a helpful assistant\n<|user|> \n{task_template}"
        "<|assistant|>\n"
    ),
}
CHAT_TEMPLATES["yi"] = CHAT_TEMPLATES["qwen"]

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all "
    "the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = (
    " The special magic {type_needle_v} for {query} mentioned in the provided text are"
)
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
    "words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?"
)
FWE_ANSWER_PREFIX = (
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)
_QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words."
)
QA_TEMPLATE = (
    f"{_QA_INSTRUCTION}\n\nThe following are given documents.\n\n{{context}}\n\n"
    f"{_QA_INSTRUCTION}\n\nQuestion: {{query}}"
)
QA_ANSWER_PREFIX = " Answer:"

# Needle depths in percent: round(linspace(0, 100, 40)).
DEPTHS: tuple[int, ...] = tuple(round(100 * i / 39) for i in range(40))
# A sample more than this fraction of the target below it is refitted on its own content.
LENGTH_SLACK = 0.02
VT_HOPS = 4
VT_DEMO_TOKENS = 500
CWE_NUM_COMMON = 10
FWE_ALPHA = 2.0
_ZETA_FWE = math.pi**2 / 6  # zeta(FWE_ALPHA)
_SINGULAR = (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer"))
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class NiahConfig:
    haystack: str  # "noise" | "essay" | "needle" (distractor needle lines)
    key_type: str  # "words" | "numbers" | "uuids"
    value_type: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "niah" | "vt" | "cwe" | "fwe" | "qa"
    max_new_tokens: int
    niah: NiahConfig | None = None
    qa_dataset: str | None = None


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("niah_single_1", "niah", 128, NiahConfig("noise", "words", "numbers")),
        TaskSpec("niah_single_2", "niah", 128, NiahConfig("essay", "words", "numbers")),
        TaskSpec("niah_single_3", "niah", 128, NiahConfig("essay", "words", "uuids")),
        TaskSpec("niah_multikey_1", "niah", 128, NiahConfig("essay", "words", "numbers", 4)),
        TaskSpec("niah_multikey_2", "niah", 128, NiahConfig("needle", "words", "numbers")),
        TaskSpec("niah_multikey_3", "niah", 128, NiahConfig("needle", "uuids", "uuids")),
        TaskSpec("niah_multivalue", "niah", 128, NiahConfig("essay", "words", "numbers", 1, 4)),
        TaskSpec("niah_multiquery", "niah", 128, NiahConfig("essay", "words", "numbers", 4, 1, 4)),
        TaskSpec("vt", "vt", 30),
        TaskSpec("cwe", "cwe", 120),
        TaskSpec("fwe", "fwe", 50),
        TaskSpec("qa_1", "qa", 32, qa_dataset="squad"),
        TaskSpec("qa_2", "qa", 32, qa_dataset="hotpotqa"),
    )
}
# ShadowKV's RULER suite: all tasks but niah_multikey_3 and cwe.
SHADOWKV_TASKS: tuple[str, ...] = tuple(t for t in TASKS if t not in ("niah_multikey_3", "cwe"))


@dataclass(frozen=True)
class Sample:
    """One prompt. The model is fed `input + answer_prefix` and generates up to
    `max_new_tokens`; `num_tokens` counts the prompt (no special tokens), `size` is the task's
    size knob, `metadata` holds e.g. needle `depths` (percent) and `token_position_answer`."""

    task: str
    index: int
    length_target: int
    input: str
    answer_prefix: str
    outputs: list[str]
    max_new_tokens: int
    num_tokens: int
    size: int
    seed: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix

    @property
    def length(self) -> int:
        """Prompt tokens plus the generation budget; at most `length_target`."""
        return self.num_tokens + self.max_new_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Sample:
        return cls(**record)


@dataclass(frozen=True)
class _Draft:
    input: str
    answer_prefix: str
    outputs: list[str]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class _Context:
    spec: TaskSpec
    target_length: int
    seed: int
    count: Callable[[str], int]
    chat: ChatTemplate
    ruler_compat: bool
    haystack: Haystack | None
    qa: QADataset | None


def token_counter(tokenizer: Tokenizer) -> Callable[[str], int]:
    """`text -> len(tokenizer.encode(text))`, passing `add_special_tokens=False` when supported.

    Accepts lists of ids and objects with `.ids` (a `tokenizers.Encoding`)."""
    encode = tokenizer.encode
    try:
        encode("", add_special_tokens=False)  # type: ignore[call-arg]
        kwargs: dict[str, Any] = {"add_special_tokens": False}
    except TypeError:
        kwargs = {}

    def count(text: str) -> int:
        encoded = encode(text, **kwargs)
        return len(getattr(encoded, "ids", encoded))

    return count


def resolve_chat_template(template: ChatTemplate | str | None) -> ChatTemplate:
    """None -> identity ("base"); a name in `CHAT_TEMPLATES`; a string with `{task_template}`;
    or any callable `task_template -> prompt`."""
    if template is None:
        return lambda text: text
    if callable(template):
        return template
    fmt = CHAT_TEMPLATES.get(template, template)
    if "{task_template}" not in fmt:
        raise ValueError(
            f"chat template {template!r} is neither a name in {sorted(CHAT_TEMPLATES)} "
            "nor a string containing '{task_template}'"
        )
    return lambda text: fmt.replace("{task_template}", text)


def generate_samples(
    task: str,
    tokenizer: Tokenizer,
    target_length: int,
    num_samples: int,
    seed: int = 42,
    *,
    haystack: Haystack | str | Path | None = None,
    chat_template: ChatTemplate | str | None = None,
    qa_file: str | Path | None = None,
    ruler_compat: bool = True,
) -> list[Sample]:
    """Generate `num_samples` prompts of `task` fitted to `target_length` tokens (incl. generation).

    `haystack` (a `Haystack` or a corpus path) is required by the essay tasks (niah_single_2/3,
    niah_multikey_1, niah_multivalue, niah_multiquery); `qa_file` (SQuAD v2 dev JSON for qa_1,
    HotpotQA dev-distractor JSON for qa_2) by the QA tasks.
    """
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {sorted(TASKS)}")
    spec = TASKS[task]
    ctx = _Context(
        spec=spec,
        target_length=target_length,
        seed=seed,
        count=token_counter(tokenizer),
        chat=resolve_chat_template(chat_template),
        ruler_compat=ruler_compat,
        haystack=_essay_haystack(spec, haystack),
        qa=_qa_dataset(spec, qa_file, num_samples),
    )
    build, min_size = _builder(ctx)
    budget = target_length - spec.max_new_tokens

    def probe_tokens(size: int) -> int:
        draft = build(size, _rng(ctx, "probe"), 0)
        return ctx.count(draft.input + draft.answer_prefix)

    size = fit_size(probe_tokens, budget, min_size, what=f"{task} at {target_length} tokens")
    return [_sample(ctx, build, size, min_size, i) for i in range(num_samples)]


def fit_size(
    tokens_at: Callable[[int], int],
    budget: int,
    min_size: int,
    what: str = "",
    guess: int | None = None,
) -> int:
    """Largest `size >= min_size` with `tokens_at(size) <= budget`, assuming tokens grow with size.

    Without a `guess`, one is estimated linearly from probes at `min_size` and just above. A
    geometric bracket around the guess is then bisected."""
    cache: dict[int, int] = {}

    def fits(size: int) -> bool:
        if size not in cache:
            cache[size] = tokens_at(size)
        return cache[size] <= budget

    def too_short() -> ValueError:
        return ValueError(
            f"target too short for {what or 'this task'}: the smallest prompt needs "
            f"{cache[min_size]} tokens, the budget is {budget}"
        )

    if guess is None:
        if not fits(min_size):
            raise too_short()
        probe = 2 * min_size + 16
        fits(probe)
        per_unit = max(cache[probe] - cache[min_size], 1) / (probe - min_size)
        guess = min_size + int((budget - cache[min_size]) / per_unit)
    guess = max(guess, min_size)
    step = max(1, guess // 64)
    if fits(guess):
        lo = guess
        while fits(lo + step):
            lo, step = lo + step, 2 * step
        hi = lo + step
    else:
        hi = guess
        while True:
            lo = max(min_size, hi - step)
            if fits(lo):
                break
            if lo == min_size:
                raise too_short()
            hi, step = lo, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _sample(ctx: _Context, build: _Build, size: int, min_size: int, index: int) -> Sample:
    """Build sample `index` at the task's fitted size; refit the size on the sample's own content
    when that overflows or falls short by more than `LENGTH_SLACK` (e.g. fwe, whose few dominant
    random words make the token count swing from sample to sample)."""
    budget = ctx.target_length - ctx.spec.max_new_tokens
    drafts: dict[int, tuple[_Draft, int]] = {}

    def tokens_at(n: int) -> int:
        if n not in drafts:
            draft = build(n, _rng(ctx, index), index)
            drafts[n] = draft, ctx.count(draft.input + draft.answer_prefix)
        return drafts[n][1]

    if not 0 <= budget - tokens_at(size) <= LENGTH_SLACK * ctx.target_length:
        what = f"{ctx.spec.name} sample {index} at {ctx.target_length} tokens"
        size = fit_size(tokens_at, budget, min_size, what, guess=size)
    draft, num_tokens = drafts[size]
    metadata = dict(draft.metadata)
    if ctx.spec.kind == "niah":
        answer_at = draft.input.index(draft.outputs[0])
        metadata["token_position_answer"] = ctx.count(draft.input[:answer_at])
    return Sample(
        task=ctx.spec.name,
        index=index,
        length_target=ctx.target_length,
        input=draft.input,
        answer_prefix=draft.answer_prefix,
        outputs=draft.outputs,
        max_new_tokens=ctx.spec.max_new_tokens,
        num_tokens=num_tokens,
        size=size,
        seed=ctx.seed,
        metadata=metadata,
    )


_Build = Callable[[int, random.Random, int], _Draft]


def _builder(ctx: _Context) -> tuple[_Build, int]:
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


def _niah(ctx: _Context, cfg: NiahConfig, size: int, rng: random.Random) -> _Draft:
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
    return _Draft(
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


def _vt_demo(ctx: _Context) -> tuple[str, list[str]]:
    """RULER's one-shot vt example: 3-letter names, value 12345, bare template, fitted to
    `VT_DEMO_TOKENS` (a quarter of the budget at short lengths, and never below the minimum)."""
    names = _vt_names(random.Random(f"{ctx.seed}:vt-demo"), VT_HOPS + 1, 3)

    def demo(size: int) -> str:
        lines, _ = _insert_lines(noise_lines(size), _vt_chain(names, "12345"), _rng(ctx, "demo"))
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


def _vt(ctx: _Context, size: int, rng: random.Random, demo: tuple[str, list[str]]) -> _Draft:
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
    return _Draft(
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


def _cwe(ctx: _Context, size: int, rng: random.Random, pool: list[str]) -> _Draft:
    long_context = ctx.target_length >= 4096
    demo_shape, shape = ((40, 10, 3), (30, 3)) if long_context else ((20, 3, 1), (6, 1))
    demo_list, demo_common = _cwe_list(ctx, rng, pool, *demo_shape)
    context, common = _cwe_list(ctx, rng, pool, size, *shape)
    template = ctx.chat(CWE_TEMPLATE)
    demo = f"{_fill(template, context=demo_list)}{CWE_ANSWER_PREFIX} {_numbered(demo_common)}\n"
    return _Draft(
        input=demo + _fill(template, context=context),
        answer_prefix=CWE_ANSWER_PREFIX,
        outputs=common,
        metadata={},
    )


def _cwe_list(
    ctx: _Context,
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


def _fwe(ctx: _Context, size: int, rng: random.Random) -> _Draft:
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
    return _Draft(
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


def _qa(ctx: _Context, size: int, rng: random.Random, index: int) -> _Draft:
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
    return _Draft(
        input=_fill(ctx.chat(QA_TEMPLATE), context=context, query=item.question),
        answer_prefix=QA_ANSWER_PREFIX,
        outputs=list(item.answers),
        metadata={"gold_positions": [i for i, d in enumerate(chosen) if d in gold]},
    )


def _essay_haystack(spec: TaskSpec, haystack: Haystack | str | Path | None) -> Haystack | None:
    if spec.niah is None or spec.niah.haystack != "essay":
        return None
    if haystack is None:
        raise ValueError(
            f"task {spec.name} needs an essay haystack: pass haystack=<path to a .jsonl/.txt "
            "corpus, e.g. shared/data/pg_essays.jsonl> or haystack=Haystack.noise() "
            "(no corpus, not comparable to RULER)"
        )
    return haystack if isinstance(haystack, Haystack) else Haystack.from_path(haystack)


def _qa_dataset(spec: TaskSpec, qa_file: str | Path | None, num_samples: int) -> QADataset | None:
    if spec.qa_dataset is None:
        return None
    if qa_file is None:
        source = "SQuAD v2.0 dev-v2.0.json" if spec.qa_dataset == "squad" else (
            "HotpotQA hotpot_dev_distractor_v1.json"
        )
        raise ValueError(
            f"task {spec.name} needs qa_file=<path to {source}>; the dataset is not bundled"
        )
    dataset = load_qa(qa_file, spec.qa_dataset)
    if num_samples > len(dataset.items):
        raise ValueError(
            f"{qa_file} has {len(dataset.items)} answerable questions, {num_samples} samples asked"
        )
    return dataset


def _rng(ctx: _Context, index: int | str) -> random.Random:
    # str seeds hash with SHA-512, so the stream is stable across processes and platforms.
    return random.Random(f"{ctx.seed}:{ctx.spec.name}:{ctx.target_length}:{index}")


def _shuffle(items: list, rng: random.Random, ctx: _Context) -> None:
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
