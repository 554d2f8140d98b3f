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

Prompt text, task constants and the `TASKS` registry live in `ruler_spec`, the per-task builders
in `ruler_tasks`, token counting and the size search in `ruler_fit`; the names the rest of
the package uses (`TASKS`, `CHAT_TEMPLATES`, `fit_size`, ...) are re-exported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shadowkv.eval.haystack import Haystack, QADataset, load_qa
from shadowkv.eval.ruler_fit import LENGTH_SLACK, Tokenizer, fit_size, token_counter
from shadowkv.eval.ruler_spec import (
    CHAT_TEMPLATES,
    DEPTHS,
    SHADOWKV_TASKS,
    TASKS,
    ChatTemplate,
    TaskSpec,
)
from shadowkv.eval.ruler_tasks import Build, BuildContext, Draft, sample_rng, task_builder

__all__ = [
    "CHAT_TEMPLATES",
    "DEPTHS",
    "LENGTH_SLACK",
    "SHADOWKV_TASKS",
    "TASKS",
    "ChatTemplate",
    "Sample",
    "TaskSpec",
    "Tokenizer",
    "fit_size",
    "generate_samples",
    "resolve_chat_template",
    "token_counter",
]


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
    ctx = BuildContext(
        spec=spec,
        target_length=target_length,
        seed=seed,
        count=token_counter(tokenizer),
        chat=resolve_chat_template(chat_template),
        ruler_compat=ruler_compat,
        haystack=_essay_haystack(spec, haystack),
        qa=_qa_dataset(spec, qa_file, num_samples),
    )
    build, min_size = task_builder(ctx)
    budget = target_length - spec.max_new_tokens

    def probe_tokens(size: int) -> int:
        draft = build(size, sample_rng(ctx, "probe"), 0)
        return ctx.count(draft.input + draft.answer_prefix)

    size = fit_size(probe_tokens, budget, min_size, what=f"{task} at {target_length} tokens")
    return [_sample(ctx, build, size, min_size, i) for i in range(num_samples)]


def _sample(ctx: BuildContext, build: Build, size: int, min_size: int, index: int) -> Sample:
    """Build sample `index` at the task's fitted size; refit the size on the sample's own content
    when that overflows or falls short by more than `LENGTH_SLACK` (e.g. fwe, whose few dominant
    random words make the token count swing from sample to sample)."""
    budget = ctx.target_length - ctx.spec.max_new_tokens
    drafts: dict[int, tuple[Draft, int]] = {}

    def tokens_at(n: int) -> int:
        if n not in drafts:
            draft = build(n, sample_rng(ctx, index), index)
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
