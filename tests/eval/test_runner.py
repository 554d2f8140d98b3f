"""The eval runner: resumable JSONL results, tables, the budget plot, the ``shadowkv eval`` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shadowkv.cache.methods import method_config
from shadowkv.config import ConfigError, EngineConfig
from shadowkv.eval.runner import (
    EvalConfig,
    load_records,
    plot_budget_sweep,
    record_key,
    run_eval,
    summary_tables,
)

ENGINE = EngineConfig(max_model_len=512, cache_memory_gb=0.01, max_num_seqs=4)


@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoint):
    from shadowkv import LLM

    ckpt = tiny_checkpoint("llama", num_heads=4, num_kv_heads=2, head_dim=16)
    return LLM(ckpt, engine=ENGINE, device="cpu")


def config(
    out: Path, methods=("dense", "streaming"), knobs: dict | None = None, **kw
) -> EvalConfig:
    knobs = knobs or {"local_chunks": 1}
    base = dict(
        tasks=("niah_single_1",), lengths=(256,), out=out,
        caches=tuple(method_config(m, **knobs) for m in methods),
        num_samples=3, budgets=(32,), batch_size=2, chat_template="base", max_new_tokens=3,
        engine=ENGINE,
    )
    base.update(kw)
    return EvalConfig(**base)


class Interrupt(Exception):
    pass


def test_resume_after_interruption(tiny_llm, tmp_path, monkeypatch):
    import shadowkv.eval.runner as runner

    out = tmp_path / "results.jsonl"
    cfg = config(out)
    real = runner._generate
    calls: list[tuple[str, int]] = []

    def failing(llm, samples, model, method, *rest):
        if len(calls) == 1:
            raise Interrupt  # the second call (streaming on the first batch) dies mid-run
        calls.append((method, len(samples)))
        return real(llm, samples, model, method, *rest)

    monkeypatch.setattr(runner, "_generate", failing)
    with pytest.raises(Interrupt):
        run_eval(cfg, progress=False, llm=tiny_llm)
    first = load_records(out)
    assert [r["index"] for r in first] == [0, 1] and {r["method"] for r in first} == {"dense"}
    with open(out, "a", encoding="utf-8") as fh:
        fh.write('{"model": "torn-wri')  # a write cut off by the interruption

    calls.clear()

    def counting(llm, samples, model, method, *rest):
        calls.append((method, len(samples)))
        return real(llm, samples, model, method, *rest)

    monkeypatch.setattr(runner, "_generate", counting)
    with pytest.warns(UserWarning, match="unreadable line"):
        records = run_eval(cfg, progress=False, llm=tiny_llm)
    # Batch-major: samples 0-1 only lack streaming; sample 2 lacks both.
    assert calls == [("streaming", 2), ("dense", 1), ("streaming", 1)]
    keys = [record_key(r) for r in records]
    assert len(keys) == len(set(keys)) == 6
    assert {(r["method"], r["budget"]) for r in records} == {("dense", None), ("streaming", 32)}
    replayed = {
        (r["method"], r["index"]): r["prefill_replayed"] for r in records if "prefill_replayed" in r
    }
    assert replayed[("streaming", 2)]
    assert not replayed[("dense", 2)] and not replayed[("streaming", 0)]
    for r in records:
        assert set(r["score"]) == {"ruler", "shadowkv"} and 0 <= r["score"]["ruler"] <= 1
        assert r["prompt_tokens"] + 128 <= 256 + 1  # fitted to the length (+ BOS)
        assert 1 <= r["generated_tokens"] <= 3

    calls.clear()
    with pytest.warns(UserWarning):
        again = run_eval(cfg, progress=False, llm=tiny_llm)
    assert calls == [] and len(again) == 6, "a finished run must not generate anything"


def test_shared_prefill_changes_no_prediction(tiny_llm, tmp_path):
    """Replaying the recorded prefill gives every method exactly what its own prefill gives."""
    methods = ("dense", "shadowkv", "quest", "loki")
    knobs = dict(local_chunks=1, outlier_chunks=1, rank=8)
    got = {}
    for share in (True, False):
        cfg = config(
            tmp_path / f"share{share}.jsonl", methods=methods, num_samples=2, max_new_tokens=6,
            share_prefill=share, knobs=knobs,
        )
        records = run_eval(cfg, progress=False, llm=tiny_llm)
        assert sum(r["prefill_replayed"] for r in records) == (6 if share else 0)
        got[share] = {(r["method"], r["index"]): r["prediction"] for r in records}
    assert len(got[True]) == 8 and got[True] == got[False]


def test_first_sample_runs_the_tail_with_the_same_samples(tiny_llm, tmp_path):
    """A table extended in parts: samples first_sample.. equal the same indices of a full run."""
    full = run_eval(config(tmp_path / "full.jsonl"), progress=False, llm=tiny_llm)
    tail = run_eval(
        config(tmp_path / "tail.jsonl", first_sample=2), progress=False, llm=tiny_llm
    )
    assert sorted((r["method"], r["index"]) for r in tail) == [("dense", 2), ("streaming", 2)]
    by_key = {(r["method"], r["index"]): r for r in full}
    for r in tail:
        twin = by_key[r["method"], r["index"]]
        assert r["prediction"] == twin["prediction"] and r["outputs"] == twin["outputs"]
        assert r["prompt_tokens"] == twin["prompt_tokens"]
    with pytest.raises(ConfigError, match="first_sample"):
        config(tmp_path / "x.jsonl", first_sample=3)


def test_budget_sweep_runs_dense_once(tiny_llm, tmp_path):
    out = tmp_path / "sweep.jsonl"
    cfg = config(out, num_samples=1, budgets=(16, 48), methods=("dense", "oracle", "quest"))
    records = run_eval(cfg, progress=False, llm=tiny_llm)
    runs = sorted((r["method"], r["budget"] or 0) for r in records)
    assert runs == [("dense", 0), ("oracle", 16), ("oracle", 48), ("quest", 16), ("quest", 48)]
    budgets = {(r["method"], r["budget"]): r["budget_tokens"] for r in records}
    assert budgets[("oracle", 16)] == 16 and budgets[("dense", None)] is None
    png = plot_budget_sweep(records, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _record(method, budget, task, length, index, prediction, outputs):
    from shadowkv.eval.metrics import score

    return {
        "model": "m", "method": method, "budget": budget, "task": task, "length": length,
        "seed": 42, "index": index, "prediction": prediction, "outputs": outputs,
        "score": score(task, prediction, outputs),
    }


def test_summary_table_scores_each_method_and_task():
    records = [
        _record("dense", None, "niah_single_1", 4096, 0, "is 1234567.", ["1234567"]),
        _record("dense", None, "niah_single_1", 4096, 1, "is 7654321.", ["7654321"]),
        _record("dense", None, "niah_multivalue", 4096, 0, "1, 2 and 9", ["1", "2", "3", "4"]),
        _record("quest", 128, "niah_single_1", 4096, 0, "is 1234567.", ["1234567"]),
        _record("quest", 128, "niah_single_1", 4096, 1, "no idea", ["7654321"]),
        _record("quest", 128, "niah_single_1", 8192, 0, "no idea", ["7654321"]),
    ]
    table = summary_tables(records)
    lines = table.splitlines()
    assert "### 4096 tokens (ruler metric)" in lines and "### 8192 tokens (ruler metric)" in lines
    header = lines[lines.index("### 4096 tokens (ruler metric)") + 2]
    assert header == "| method | niah_single_1 | niah_multivalue | mean | n |"
    assert "| dense | 100.00 | 50.00 | 75.00 | 2/1 |" in lines
    assert "| quest@128 | 50.00 | - | 50.00 | 2 |" in lines
    assert "| quest@128 | 0.00 | - | 0.00 | 1 |" in lines


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(tasks=("niah_single_9",)), "unknown task"),
        (dict(methods=("dense", "h2o")), "unknown cache method 'h2o'"),
        (dict(tasks=("niah_single_2",)), "--haystack"),
        (dict(tasks=("qa_1",)), "--qa-file"),
        (dict(budgets=(12,)), "multiple of chunk_size"),
        (dict(lengths=()), "lengths"),
        (dict(chat_template="llama-9"), "chat template"),
    ],
    ids=["task", "method", "haystack", "qa", "budget", "lengths", "template"],
)
def test_bad_config_names_the_fix(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        config(tmp_path / "x.jsonl", **change)


def test_cli_prints_table_and_resumes(tiny_checkpoint, tmp_path, capsys):
    from shadowkv.cli import main

    ckpt = tiny_checkpoint("llama", num_heads=4, num_kv_heads=2, head_dim=16)
    out = tmp_path / "cli.jsonl"
    argv = [
        "eval", "--model", str(ckpt), "--device", "cpu", "--tasks", "niah_single_1",
        "--lengths", "256", "--methods", "dense,loki", "--samples", "1", "--sparse-budget", "16",
        "--chat-template", "base", "--max-new-tokens", "3", "--max-model-len", "512",
        "--cache-memory-gb", "0.01",
        "--out", str(out), "--table", str(tmp_path / "t.md"), "--quiet",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "| loki@16 |" in printed
    assert (tmp_path / "t.md").read_text().strip() == printed.strip()
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["length"] == 256 for line in lines)
    assert main(argv) == 0
    assert len(out.read_text().splitlines()) == 2, "the rerun must skip finished samples"
    assert main([*argv[:-1], "--methods", "dense,nope"]) == 2


def test_cli_value_memory_flags_reach_the_config():
    import argparse

    from shadowkv.commands.eval import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--host-memory-gb", "2", "--device-value-memory-gb", "0.5",
                                         "--out", "x.jsonl"]))
    shadow = cfg.caches[cfg.methods.index("shadowkv")]
    assert (shadow.host_memory_gb, shadow.device_value_memory_gb) == (2, 0.5)


def test_cli_writes_a_niah_heat_map_per_method(tiny_checkpoint, tmp_path, pg_essays):
    from shadowkv.cli import main

    ckpt = tiny_checkpoint("llama", num_heads=4, num_kv_heads=2, head_dim=16)
    argv = [
        "eval", "--model", str(ckpt), "--device", "cpu", "--tasks", "niah", "--lengths", "200,300",
        "--methods", "dense,quest", "--samples", "2", "--sparse-budget", "16", "--chat-template",
        "base", "--max-new-tokens", "2", "--max-model-len", "512", "--cache-memory-gb", "0.01",
        "--haystack", str(pg_essays), "--out", str(tmp_path / "n.jsonl"), "--quiet",
        "--heatmaps", str(tmp_path / "maps"),
    ]
    assert main(argv) == 0
    maps = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert maps == ["n_niah_dense.png", "n_niah_quest@16.png"]
    assert (tmp_path / "maps" / maps[0]).read_bytes()[:4] == b"\x89PNG"


def test_niah_prompts_skip_the_model_chat_template(smollm2, pg_essays, tmp_path):
    """SmolLM2 wrapped in its template restates the question and runs out of NIAH's 10 tokens."""
    from shadowkv.eval.runner import _make_samples

    base = dict(tasks=("niah", "niah_single_1"), lengths=(512,), caches=(method_config("dense"),),
                out=tmp_path / "x.jsonl", num_samples=2, haystack=pg_essays)
    niah = _make_samples(EvalConfig(**base), smollm2.tokenizer, "niah", 512)
    ruler = _make_samples(EvalConfig(**base), smollm2.tokenizer, "niah_single_1", 512)
    assert niah[0].prompt.startswith("Write a high-quality answer")
    assert "<|im_start|>" in ruler[0].prompt  # RULER tasks keep the model's template
    named = _make_samples(EvalConfig(**base, chat_template="qwen"), smollm2.tokenizer, "niah", 512)
    assert named[0].prompt != niah[0].prompt
