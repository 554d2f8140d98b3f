"""The engine tensor-parallel (``EngineConfig.tensor_parallel``): ``LLM`` spawns rank 1 on gloo and
drives it through ``TPEngine``; every rank runs the same steps on its shard and its own cache.

TP=2 gives TP=1's tokens for a batch of prompts of different lengths, two samples of one prompt
(``add_requests``), seeded samples, dense and ShadowKV at full rank and full budget, with and
without prefix sharing; an unseeded sample runs without the ranks diverging; a killed worker
ends ``generate`` with ``TPRankError``; a world size that does not divide the heads fails before
any process starts; ``shadowkv generate --tensor-parallel 2`` prints TP=1's text.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from utils import full_budget

import shadowkv
from shadowkv import LLM
from shadowkv.cache.methods import CacheConfig, DenseConfig, ShadowKVConfig
from shadowkv.cli import main
from shadowkv.config import ConfigError, EngineConfig
from shadowkv.distributed import TPRankError, TPShapeError
from shadowkv.distributed import engine as tp_engine
from shadowkv.distributed.engine import TPEngine, rank_threads
from shadowkv.engine.sampling import SamplingParams

_rng = torch.Generator().manual_seed(11)
# Different lengths: two long enough for ShadowKV to run sparse with every chunk selected by
# FULL's budget (120 tokens of 168..175-token prompts), one short (ShadowKV's dense fallback).
PROMPTS = [torch.randint(3, 512, (n,), generator=_rng).tolist() for n in (173, 170, 21)]
SAMPLED = PROMPTS[1]  # the prompt sampled twice
STEPS = 6
GREEDY = SamplingParams(max_tokens=STEPS)
SEEDED = SamplingParams(max_tokens=STEPS, temperature=0.8, top_k=20, seed=1234)
FULL = ShadowKVConfig(sparse_budget=full_budget(173), outlier_chunks=2, rank=1.0)
METHODS: dict[str, CacheConfig] = {"dense": DenseConfig(), "shadowkv-full": FULL}
CASES = {"llama": ("llama", dict(num_heads=6, num_kv_heads=2)),
         "qwen2": ("qwen2", dict(num_heads=4, num_kv_heads=2))}
ENGINE = dict(max_model_len=256, cache_memory_gb=0.05)


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch) -> None:
    """A collective (or the group's start) that waits 60 s fails the test instead of hanging."""
    monkeypatch.setattr(tp_engine, "TIMEOUT_S", 60.0)


def checkpoint(tiny_checkpoint, case: str) -> str:
    family, kw = CASES[case]
    return str(tiny_checkpoint(family, **kw))


def run_batch(llm: LLM) -> list[list[int]]:
    """One continuously batched run: the prompts through ``generate`` (greedy, the last one
    seeded-sampled) while two samples of ``SAMPLED`` (greedy and seeded) run beside them."""
    engine = llm.engine
    pair = engine.add_requests(SAMPLED, [GREEDY, SEEDED])
    outs = llm.generate(PROMPTS, [GREEDY, GREEDY, SEEDED])
    while engine.has_unfinished():
        engine.step()
    return [r.token_ids for r in outs] + [r.output_ids for r in pair]


def run_prefix(llm: LLM) -> list[list[int]]:
    """A prompt, then one that starts with it (prefix sharing reuses the first's prefill)."""
    first = PROMPTS[0]
    longer = first + PROMPTS[2]
    a = llm.generate(first, GREEDY)[0]
    b = llm.generate(longer, GREEDY)[0]
    return [a.token_ids, b.token_ids]


def runs(llm: LLM, cfg: EngineConfig) -> dict[str, list[list[int]]]:
    """Every method's batch, then every method's prefix pair with prefix sharing on (the engine
    rebuilt by ``set_cache``, as eval does); the prefix hits seen."""
    out: dict[str, list[list[int]]] = {}
    for method, cache in METHODS.items():
        llm.set_cache(cache, cfg)
        out[method] = run_batch(llm)
    shared = EngineConfig(**{**ENGINE, "tensor_parallel": cfg.tensor_parallel,
                             "prefix_cache": True})
    for method, cache in METHODS.items():
        llm.set_cache(cache, shared)
        out[f"{method}+prefix"] = run_prefix(llm)
        out[f"{method}+prefix hits"] = [[llm.engine.counters["prefix_hits"]]]
    return out


@pytest.mark.parametrize("case", CASES)
def test_tp2_engine_matches_tp1(tiny_checkpoint, case: str) -> None:
    path = checkpoint(tiny_checkpoint, case)
    one = EngineConfig(**ENGINE)
    ref = runs(LLM(path, engine=one, device="cpu"), one)
    two = EngineConfig(**ENGINE, tensor_parallel=2)
    start, threads = time.monotonic(), torch.get_num_threads()
    with LLM(path, engine=two, device="cpu") as llm:
        assert isinstance(llm.engine, TPEngine)
        assert torch.get_num_threads() == rank_threads("cpu", 2), "rank 0 takes its share"
        got = runs(llm, two)
        # An unseeded sample: rank 0 draws its seed and sends it; without that, rank 1 would
        # sample other tokens and the next step's fingerprint check would stop it.
        sample = SamplingParams(max_tokens=STEPS, temperature=1.0)
        out = llm.generate(PROMPTS[0], sample)[0]
        assert len(out.token_ids) == STEPS
        llm.generate(PROMPTS[2], GREEDY)  # a step after the sampled ones: the ranks agree
        workers = llm.engine.workers
    print(f"{case}: TP=2 engine, {len(got)} runs: {time.monotonic() - start:.1f} s")
    assert all(not p.is_alive() for p in workers.procs.processes), "close() stops the workers"
    assert torch.get_num_threads() == threads, "close() gives the process its threads back"
    for name, tokens in ref.items():
        assert got[name] == tokens, name
    for method in METHODS:
        assert ref[f"{method}+prefix hits"] == [[1]], "the second prompt reused the first"
        assert len(ref[method]) == 5 and all(len(t) == STEPS for t in ref[method])
    # ShadowKV at full rank and full budget attends as dense: its greedy tokens are dense's.
    greedy = [0, 1, 3]  # the greedy rows of run_batch
    assert [got["shadowkv-full"][i] for i in greedy] == [ref["dense"][i] for i in greedy]


def test_killed_worker_ends_generate(tiny_checkpoint) -> None:
    path = checkpoint(tiny_checkpoint, "llama")
    llm = LLM(path, engine=EngineConfig(**ENGINE, tensor_parallel=2), device="cpu")
    worker = llm.engine.workers.procs.processes[0]
    steps = []

    def kill_after_three(outs) -> None:  # runs on rank 0 inside each step
        steps.append(len(outs))
        if len(steps) == 3:
            os.kill(worker.pid, signal.SIGKILL)

    llm.engine.on_outputs = kill_after_three
    start = time.monotonic()
    try:
        with pytest.raises(TPRankError, match=r"rank 1 exited with code -9"):
            llm.generate(PROMPTS[0], SamplingParams(max_tokens=100))
        assert time.monotonic() - start < 60, "ended by the failure, not a timeout"
        assert len(steps) == 3
        with pytest.raises(TPRankError, match="failed earlier"):  # the engine stays failed
            llm.generate(PROMPTS[0], GREEDY)
    finally:
        llm.close()
    assert not worker.is_alive()


def test_stuck_worker_times_out(tiny_checkpoint, monkeypatch) -> None:
    """A worker that stops answering (SIGSTOP) mid-generation: rank 0's next step message is not
    taken within the timeout and ``generate`` raises ``TPRankError`` instead of hanging; ``close``
    kills the worker."""
    monkeypatch.setattr(tp_engine, "TIMEOUT_S", 20.0)
    path = checkpoint(tiny_checkpoint, "llama")
    llm = LLM(path, engine=EngineConfig(**ENGINE, tensor_parallel=2), device="cpu")
    worker = llm.engine.workers.procs.processes[0]
    steps = []

    def stop_after_three(outs) -> None:
        steps.append(len(outs))
        if len(steps) == 3:
            os.kill(worker.pid, signal.SIGSTOP)

    llm.engine.on_outputs = stop_after_three
    start = time.monotonic()
    try:
        stuck = r"(?s)still running.*did not take rank 0's commands within 20 s"
        with pytest.raises(TPRankError, match=stuck):
            llm.generate(PROMPTS[0], SamplingParams(max_tokens=100))
        assert time.monotonic() - start < 60
    finally:
        llm.close()
    assert not worker.is_alive()


def test_bad_world_size_fails_before_spawning(tiny_checkpoint) -> None:
    path = checkpoint(tiny_checkpoint, "llama")
    start = time.monotonic()
    match = r"tensor_parallel=4 .*num_heads.*=6.*use one of \[1, 2\]"
    with pytest.raises(TPShapeError, match=match):
        LLM(path, engine=EngineConfig(tensor_parallel=4), device="cpu")
    assert time.monotonic() - start < 5 and not multiprocessing.active_children()
    with pytest.raises(ConfigError, match="tensor_parallel must be >= 1"):
        EngineConfig(tensor_parallel=0)


def test_cpu_ranks_share_the_threads() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert [rank_threads("cpu", n) for n in (1, 2, 3, 8)] == [4, 2, 1, 1]
        assert rank_threads("cuda", 2) == 4, "a GPU rank keeps the count"
    finally:
        torch.set_num_threads(before)


def test_too_few_gpus_fails_before_spawning(tiny_checkpoint, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="tensor_parallel=2 needs 2 GPUs .* 1 are visible"):
        LLM(checkpoint(tiny_checkpoint, "llama"), engine=EngineConfig(tensor_parallel=2),
            device="cuda")
    assert not multiprocessing.active_children()


def test_cli_generate_tensor_parallel(tiny_checkpoint, capsys) -> None:
    path = checkpoint(tiny_checkpoint, "llama")  # its word-level tokenizer reads "w<id>" text
    texts = []
    for tp in (1, 2):
        argv = ["generate", "w5 w17 w33 w100 w7 w42", "--model", path, "--device", "cpu",
                "--max-new-tokens", "8", "--json", "--quiet", "--tensor-parallel", str(tp)]
        assert main(argv) == 0
        texts.append(json.loads(capsys.readouterr().out))
    assert texts[1]["token_ids"] == texts[0]["token_ids"]
    assert texts[1]["text"] == texts[0]["text"] and texts[0]["metrics"]["generated_tokens"] == 8
    assert not multiprocessing.active_children(), "generate closed its workers"
    # The same under torchrun: rank 1 follows rank 0 instead of running the command.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
           "shadowkv", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(shadowkv.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)  # rank 0 prints; rank 1 prints nothing
    assert out["token_ids"] == texts[0]["token_ids"]


def test_server_tensor_parallel(tiny_checkpoint) -> None:
    """The OpenAI server's engine thread drives a TP=2 engine: concurrent requests (one with
    n=2 seeded samples) get TP=1's answers."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from tests.server.live import serve

    path = checkpoint(tiny_checkpoint, "llama")
    bodies = [
        {"prompt": "w5 w6 w7", "max_tokens": 12, "temperature": 0},
        {"prompt": " ".join(f"w{i}" for i in range(100, 160)), "max_tokens": 7,
         "temperature": 0},
        {"prompt": "w40 w41 w42", "max_tokens": 9, "temperature": 0.9, "seed": 5, "n": 2},
    ]

    def answers(tp: int) -> list[list[str]]:
        llm = LLM(path, engine=EngineConfig(**ENGINE, tensor_parallel=tp), device="cpu")
        try:
            with serve(llm, "tiny") as live, ThreadPoolExecutor(len(bodies)) as pool:
                posted = pool.map(lambda b: live.client.post("/v1/completions", json=b), bodies)
                return [[c["text"] for c in r.json()["choices"]] for r in posted]
        finally:
            llm.close()

    one, two = answers(1), answers(2)
    assert two == one and all(t for choices in one for t in choices)
    assert len(one[2]) == 2


@pytest.mark.slow
def test_qwen_05b_tp2(pg_essays, monkeypatch) -> None:
    """Qwen2.5-Coder-0.5B (14 query heads, 2 KV heads: one KV head per rank): TP=2 greedy gives
    TP=1's tokens on a short prompt, and ShadowKV at its default settings (each rank its own
    basis over its one KV head) finds a ~4K-token passkey as TP=1 does."""
    from utils import PASSKEY_ANSWER, passkey_prompt, read_essays

    from shadowkv.cache.methods import ShadowKVConfig
    from shadowkv.models.loader import resolve_model

    try:
        path = str(resolve_model("qwen2.5-coder-0.5b"))
    except Exception as err:  # noqa: BLE001 - the optional package is missing
        pytest.skip(f"qwen2.5-coder-0.5b is not installed: {err}")
    # A 4K-token CPU prefill takes minutes on busy cores: rank 0 may wait that long.
    monkeypatch.setattr(tp_engine, "TIMEOUT_S", 1800.0)
    short = "def fibonacci(n):\n    "
    params = SamplingParams(max_tokens=8)
    results = {}
    for tp in (1, 2):
        engine = EngineConfig(max_model_len=4608, tensor_parallel=tp)
        with LLM(path, engine=engine, device="cpu") as llm:
            text = llm.generate(short, SamplingParams(max_tokens=12))[0]
            llm.set_cache(ShadowKVConfig(), engine)
            prompt = passkey_prompt(read_essays(pg_essays), llm.tokenizer, 4096)
            passkey = llm.generate(prompt, params)[0]
        results[tp] = (text.token_ids, passkey.text)
        print(f"TP={tp}: {text.text!r}, passkey answer {passkey.text!r}")
    assert results[2][0] == results[1][0]
    assert PASSKEY_ANSWER in results[1][1], "TP=1 must find the passkey for the test to mean much"
    assert PASSKEY_ANSWER in results[2][1]


def test_eval_tensor_parallel(tiny_checkpoint, tmp_path) -> None:
    """``run_eval`` with TP=2 (the engine rebuilt per method on every rank, each method
    prefilling itself) records TP=1's predictions, and closes the LLM it made."""
    from shadowkv.cache.methods import method_config
    from shadowkv.eval.runner import EvalConfig, run_eval

    path = checkpoint(tiny_checkpoint, "llama")

    def predictions(tp: int) -> list[tuple]:
        cfg = EvalConfig(
            tasks=("niah_single_1",), lengths=(256,), out=tmp_path / f"tp{tp}.jsonl",
            caches=(method_config("dense"), method_config("streaming", local_chunks=1)),
            num_samples=2, budgets=(32,), batch_size=2, chat_template="base", max_new_tokens=3,
            engine=EngineConfig(**ENGINE, tensor_parallel=tp), model=path, device="cpu",
        )
        records = run_eval(cfg, progress=False)
        assert not any(r["prefill_replayed"] for r in records) or tp == 1
        return sorted((r["method"], r["index"], r["prediction"]) for r in records)

    one, two = predictions(1), predictions(2)
    assert two == one and len(one) == 4
    tp1 = (tmp_path / "tp1.jsonl").read_text().splitlines()
    assert any(json.loads(line)["prefill_replayed"] for line in tp1)  # TP=1 replays; TP=2 not
    assert not multiprocessing.active_children(), "run_eval closed the LLM it made"


def test_diverged_rank_ends_generate(tiny_checkpoint) -> None:
    """A worker whose last step differs from rank 0's stops with "ranks diverged" (here rank 0's
    fingerprint is falsified), and ``generate`` raises ``TPRankError`` carrying that."""
    path = checkpoint(tiny_checkpoint, "llama")
    with LLM(path, engine=EngineConfig(**ENGINE, tensor_parallel=2), device="cpu") as llm:
        llm.generate(PROMPTS[2], GREEDY)  # agreed steps pass the check
        object.__setattr__(llm.engine, "_last", ((), (99,)))
        with pytest.raises(TPRankError, match=r"(?s)rank 1 raised.*ranks diverged after step"):
            llm.generate(PROMPTS[2], GREEDY)
