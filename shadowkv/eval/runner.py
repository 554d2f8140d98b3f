"""Run tasks x lengths x methods x budgets x samples through ``LLM.generate`` and report.

Every finished sample is appended as one JSON line to ``EvalConfig.out`` keyed by
``(model, method, budget, task, length, seed, index)``; a rerun with the same file skips the keys
it already holds, so an interrupted run resumes where it stopped. Dense attention ignores the
budget and runs once (its key has ``budget = null``). ``task = "niah"`` is the needle-in-a-haystack
grid: sample ``i`` of ``n`` puts the needle at depth ``niah_depths(n)[i]``.

Decoding is greedy with each task's generation length and no stop strings (RULER's protocol).

Work goes batch by batch: a batch of samples runs through every method before the next batch.
Prefill attention is exact in every method, so with ``share_prefill`` the first method to see a
sample records its prefill (``engine.prompt_kv``) and the other methods replay it instead of
running the model over the prompt again: one prefill per sample instead of one per method
(not with ``EngineConfig.tensor_parallel`` > 1: a recording holds one rank's KV heads).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shadowkv.cache.methods import CacheConfig, DenseConfig, SparseConfig
from shadowkv.config import ConfigError, EngineConfig
from shadowkv.eval.haystack import Haystack
from shadowkv.eval.metrics import aggregate, mean_row
from shadowkv.eval.niah import generate_niah_samples, niah_depths
from shadowkv.eval.ruler import CHAT_TEMPLATES, TASKS, Sample, generate_samples

NIAH_TASK = "niah"
Key = tuple[str, str, Any, str, int, int, int]


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. ``budgets`` holds sparse budgets (tokens, or fractions of the prompt);
    several values make a budget sweep. ``chat_template`` is ``"model"`` (the checkpoint's own
    template, or none if it has none), ``"base"`` or a name in ``ruler.CHAT_TEMPLATES``.
    ``caches`` holds one config per method compared (their own knobs: rank, chunk size, ...),
    named by its ``label`` (the method, plus variant knobs: ``shadowkv:value_dtype=fp8``); a
    sparse method's budget is overridden per run by ``budgets``. ``batch_size`` samples go to the
    engine together (and are saved together).
    NIAH ignores ``"model"`` (the reference feeds its prompt without a template).
    ``max_new_tokens`` caps generation below the task's length (RULER: 128 for NIAH), a shortcut
    for slow CPU runs; prompts are still fitted with the task's own generation length.
    """

    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    caches: tuple[CacheConfig, ...]
    out: Path
    model: str | None = None
    num_samples: int = 4
    first_sample: int = 0
    budgets: tuple[float, ...] = (2048,)
    haystack: Path | None = None
    qa_file: Path | None = None
    chat_template: str = "model"
    seed: int = 42
    batch_size: int = 4
    max_new_tokens: int | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    device: str | None = None
    share_prefill: bool = True

    @property
    def replays_prefill(self) -> bool:
        """Whether methods replay a sample's recorded prefill: not under tensor parallelism,
        where a recording holds one rank's KV heads (every method prefills again)."""
        return self.share_prefill and self.engine.tensor_parallel == 1

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS and t != NIAH_TASK]
        if unknown or not self.tasks:
            raise ConfigError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)} or 'niah'")
        if not self.caches:
            raise ConfigError("name at least one method, e.g. --methods dense,shadowkv")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"each method once, got {', '.join(self.methods)}")
        if not self.lengths or min(self.lengths) < 64:
            raise ConfigError("lengths must be given, each at least 64 tokens")
        if self.num_samples < 1 or self.batch_size < 1:
            raise ConfigError("num_samples and batch_size must be >= 1")
        if not 0 <= self.first_sample < self.num_samples:
            raise ConfigError(
                f"first_sample {self.first_sample} must be in [0, num_samples={self.num_samples})"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1 (or None for each task's own)")
        for m in self.methods:
            for b in self.budgets if m != "dense" else ():
                self.cache_for(m, b)  # each method's config validates each budget
        essay = [t for t in self.tasks if t == NIAH_TASK or _needs_essay(t)]
        if essay and self.haystack is None:
            raise ConfigError(
                f"task(s) {essay} need an essay haystack: pass --haystack "
                "../shared/data/pg_essays.jsonl (or any .jsonl/.txt corpus)"
            )
        if self.haystack is not None and not Path(self.haystack).is_file():
            raise ConfigError(f"haystack file {self.haystack} does not exist")
        qa = [t for t in self.tasks if t.startswith("qa")]
        if qa and self.qa_file is None:
            raise ConfigError(f"task(s) {qa} need --qa-file (SQuAD v2 dev or HotpotQA dev JSON)")
        if self.chat_template not in ("model", "base", *CHAT_TEMPLATES):
            raise ConfigError(
                f"chat template {self.chat_template!r}: use 'model', 'base' or one of "
                f"{sorted(CHAT_TEMPLATES)}"
            )

    @property
    def methods(self) -> tuple[str, ...]:
        """The runs' labels: method names, with variant knobs where set."""
        return tuple(c.label for c in self.caches)

    def cache_for(self, method: str, budget: float | None) -> CacheConfig:
        """The config of one run: ``method``'s (a label), with ``budget`` when it is sparse."""
        cfg = self.caches[self.methods.index(method)]
        if budget is not None and isinstance(cfg, SparseConfig):
            cfg = replace(cfg, sparse_budget=budget)
        return cfg

    def runs(self) -> list[tuple[str, float | None]]:
        """(method, budget) pairs in run order; dense once, with budget None."""
        return [
            (m, None) if m == "dense" else (m, b)
            for m in self.methods
            for b in ((None,) if m == "dense" else self.budgets)
        ]


def _needs_essay(task: str) -> bool:
    spec = TASKS[task]
    return spec.niah is not None and spec.niah.haystack == "essay"


def record_key(record: dict[str, Any]) -> Key:
    return (
        record["model"], record["method"], record["budget"], record["task"],
        int(record["length"]), int(record["seed"]), int(record["index"]),
    )


def load_records(path: Path) -> list[dict[str, Any]]:
    """Records of a results file; a torn last line (an interrupted write) is skipped."""
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as fh:
        for num, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{num}: skipping an unreadable line", stacklevel=2)
    return records


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Append one JSON line per record, first ending a line torn by an interrupted write."""
    torn = False
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, 2)
            torn = fh.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("\n" if torn else "")
        fh.write("".join(json.dumps(rec) + "\n" for rec in records))
        fh.flush()


class Progress:
    """tqdm when installed, else a ``done/total`` counter on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled and total > 0
        self._bar = None
        if self.enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="sample", file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int, label: str) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description(label)
            self._bar.update(n)
        else:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_eval(
    cfg: EvalConfig, progress: bool = True, llm: Any | None = None
) -> list[dict[str, Any]]:
    """Run every pending sample, append its record to ``cfg.out``; return all matching records.

    ``llm`` reuses an already loaded ``LLM`` (its engine is rebuilt per method and budget).
    """
    from shadowkv.llm import LLM

    model_name = _model_name(cfg, llm)
    done = {record_key(r) for r in load_records(cfg.out)}
    pending = {
        (method, budget): [
            (task, length, i)
            for task in cfg.tasks
            for length in cfg.lengths
            for i in range(cfg.first_sample, cfg.num_samples)
            if (model_name, method, budget, task, length, cfg.seed, i) not in done
        ]
        for method, budget in cfg.runs()
    }
    bar = Progress(sum(len(v) for v in pending.values()), progress)
    todo = {run: set(items) for run, items in pending.items()}
    every = sorted(
        {item for items in pending.values() for item in items},
        key=lambda t: (cfg.tasks.index(t[0]), cfg.lengths.index(t[1]), t[2]),
    )
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    owned = None  # the LLM made here, closed here (tensor-parallel workers stop)
    try:
        if llm is None and every:
            llm = owned = LLM(cfg.model, cache=DenseConfig(), engine=cfg.engine,
                              device=cfg.device)
        made: dict[tuple[str, int], list[Sample]] = {}
        for task, length, batch in _batches(every, cfg.batch_size):
            if (task, length) not in made:
                made[task, length] = _make_samples(cfg, llm.tokenizer, task, length)
            samples = made[task, length]
            recorded: dict[int, Any] = {}  # sample index -> PromptKV of its prefill
            for (method, budget), items in todo.items():
                chosen = [samples[i] for i in batch if (task, length, i) in items]
                if not chosen:
                    continue
                cache_cfg = cfg.cache_for(method, budget)
                llm.set_cache(cache_cfg)
                records = _generate(
                    llm, chosen, model_name, method, budget, cache_cfg, cfg.max_new_tokens,
                    recorded if cfg.replays_prefill else None,
                )
                append_records(cfg.out, records)
                bar.update(len(records), f"{method}@{budget} {task} {length}")
    finally:
        bar.close()
        if owned is not None:
            owned.close()
    wanted = {(model_name, m, b) for m, b in cfg.runs()}
    return [
        r for r in load_records(cfg.out)
        if (r["model"], r["method"], r["budget"]) in wanted
        and r["task"] in cfg.tasks and r["length"] in cfg.lengths and r["seed"] == cfg.seed
        and cfg.first_sample <= r["index"] < cfg.num_samples
    ]


def _model_name(cfg: EvalConfig, llm: Any | None) -> str:
    if llm is not None:
        return Path(llm.path).name
    from shadowkv.models.loader import resolve_model

    return resolve_model(cfg.model).name


def _batches(
    todo: list[tuple[str, int, int]], size: int
) -> Iterator[tuple[str, int, list[int]]]:
    """Group pending ``(task, length, index)`` into same-task, same-length batches."""
    group: list[int] = []
    current: tuple[str, int] | None = None
    for task, length, index in todo:
        if current != (task, length) or len(group) == size:
            if group and current is not None:
                yield current[0], current[1], group
            current, group = (task, length), []
        group.append(index)
    if group and current is not None:
        yield current[0], current[1], group


def _make_samples(cfg: EvalConfig, tokenizer: Any, task: str, length: int) -> list[Sample]:
    chat = _chat_template(cfg.chat_template, tokenizer)
    haystack = Haystack.from_path(cfg.haystack) if cfg.haystack is not None else None
    if task == NIAH_TASK:
        assert haystack is not None
        # The reference's NIAH prompt goes in raw and answers within 10 tokens; a chat model
        # wrapped in its template restates the question first and runs out of tokens.
        # A template named explicitly is still applied.
        if cfg.chat_template == "model":
            chat = None
        return generate_niah_samples(
            tokenizer, haystack, [length], niah_depths(cfg.num_samples), cfg.seed, chat
        )
    return generate_samples(
        task, tokenizer, length, cfg.num_samples, cfg.seed,
        haystack=haystack, chat_template=chat, qa_file=cfg.qa_file,
    )


def _chat_template(name: str, tokenizer: Any) -> Callable[[str], str] | str | None:
    if name == "base":
        return None
    if name != "model":
        return name
    if not tokenizer.has_chat_template:
        return None
    return lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}])


def _generate(
    llm: Any, samples: list[Sample], model_name: str, method: str, budget: float | None,
    cache_cfg: CacheConfig, max_new_tokens: int | None, recorded: dict[int, Any] | None,
) -> list[dict[str, Any]]:
    """Greedy generation for a batch of samples. ``recorded`` (sample index -> PromptKV) is
    replayed where it holds a sample and filled with this run's prefill where it does not."""
    from shadowkv.engine.sampling import SamplingParams
    from shadowkv.eval.metrics import score

    # A chat template already carries BOS where the model wants one.
    special = not llm.tokenizer.has_chat_template
    prompts = [llm.tokenizer.encode(s.prompt, add_special_tokens=special) for s in samples]
    engine = llm.engine
    start = time.perf_counter()
    reqs = []
    try:
        for s, ids in zip(samples, prompts):
            kv = None if recorded is None else recorded.get(s.index)
            max_tokens = min(s.max_new_tokens, max_new_tokens or s.max_new_tokens)
            params = SamplingParams(max_tokens=max_tokens)
            reqs.append(engine.add_request(
                ids, params, prompt_kv=kv, record_prompt_kv=recorded is not None and kv is None
            ))
        while engine.has_unfinished():
            engine.step()
    finally:
        for r in reqs:
            if r.finish_reason is None:
                engine.abort(r.request_id)
    elapsed = time.perf_counter() - start
    replayed = [recorded is not None and s.index in recorded for s in samples]
    if recorded is not None:
        recorded.update({s.index: r.prompt_kv for s, r in zip(samples, reqs) if r.prompt_kv})
    return [
        {
            "model": model_name, "method": method, "budget": budget, "task": s.task,
            "length": s.length_target, "seed": s.seed, "index": s.index,
            "prediction": req.text, "outputs": s.outputs,
            "score": score(s.task, req.text, s.outputs),
            "prompt_tokens": len(ids), "generated_tokens": len(req.output_ids),
            "budget_tokens": (
                cache_cfg.budget_tokens(len(ids)) if isinstance(cache_cfg, SparseConfig) else None
            ),
            "depth": s.metadata.get("depth", s.metadata.get("depths")),
            "batch_seconds": round(elapsed, 3), "prefill_replayed": rep,
        }
        for s, ids, req, rep in zip(samples, prompts, reqs, replayed)
    ]


def run_label(method: str, budget: float | None) -> str:
    return method if budget is None else f"{method}@{budget:g}"


def summary_tables(records: Iterable[dict[str, Any]], metric: str = "ruler") -> str:
    """Markdown: one table per context length, a row per method@budget, a column per task + mean.

    Cells are 100 x the mean per-sample ``metric`` score ("ruler" or "shadowkv") over the
    samples present; the ``n`` column counts samples per task.
    """
    grouped: dict[int, dict[str, list[tuple[str, str, list[str]]]]] = {}
    tasks: list[str] = []
    for r in records:
        rows = grouped.setdefault(int(r["length"]), {})
        rows.setdefault(run_label(r["method"], r["budget"]), []).append(
            (r["task"], r["prediction"], r["outputs"])
        )
        if r["task"] not in tasks:
            tasks.append(r["task"])
    out = []
    for length in sorted(grouped):
        out.append(f"### {length} tokens ({metric} metric)\n")
        out.append("| method | " + " | ".join(tasks) + " | mean | n |")
        out.append("|---" * (len(tasks) + 3) + "|")
        for label, items in grouped[length].items():
            scores = aggregate(items)
            cells = [f"{getattr(scores[t], metric):.2f}" if t in scores else "-" for t in tasks]
            mean = getattr(mean_row(scores), metric)
            n = "/".join(str(scores[t].num_samples) for t in tasks if t in scores)
            out.append(f"| {label} | " + " | ".join(cells) + f" | {mean:.2f} | {n} |")
        out.append("")
    return "\n".join(out)


def plot_budget_sweep(
    records: Iterable[dict[str, Any]], path: str | Path, metric: str = "ruler"
) -> Path:
    """Accuracy (mean over tasks and lengths) against sparse budget, a line per method; dense
    as a horizontal reference. Writes a PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("the budget plot needs matplotlib: pip install 'shadowkv[plot]'") from err
    per_run: dict[tuple[str, float | None], list[float]] = {}
    for r in records:
        per_run.setdefault((r["method"], r["budget"]), []).append(100 * r["score"][metric])
    if not per_run:
        raise ValueError("no records to plot")
    figure = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for method in dict.fromkeys(m for m, _ in per_run):
        if method == "dense":
            vals = per_run[method, None]
            ax.axhline(sum(vals) / len(vals), color="black", linestyle="--", label="dense")
            continue
        points = sorted((b, sum(v) / len(v)) for (m, b), v in per_run.items() if m == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sparse budget (tokens, or fraction of the prompt)")
    ax.set_ylabel(f"accuracy ({metric} metric, %)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png", dpi=120)
    return path
