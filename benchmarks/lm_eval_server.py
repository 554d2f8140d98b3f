"""lm-evaluation-harness as an outside client of ``shadowkv serve``, checked against ``LLM``.

Two small tasks are defined from local files (nothing is downloaded): ``skv_capitals``, a
multiple-choice task scored by loglikelihood (completions with ``echo`` + ``logprobs``), and
``skv_arith``, a ``generate_until`` task scored by exact match. lm-eval's ``local-completions``
model runs them against a real server on 127.0.0.1 (SmolLM2, dense cache); the same scores are
then computed through ``LLM`` directly (prompt logprobs, greedy generation) and must be equal.

    pip install -e '.[eval-client]'
    PYTHONPATH=. python benchmarks/lm_eval_server.py [--limit N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CAPITALS = [
    ("France", "Paris", ["Lyon", "Marseille", "Nice"]),
    ("Italy", "Rome", ["Milan", "Naples", "Turin"]),
    ("Japan", "Tokyo", ["Osaka", "Kyoto", "Nagoya"]),
    ("Germany", "Berlin", ["Munich", "Hamburg", "Cologne"]),
    ("Spain", "Madrid", ["Barcelona", "Seville", "Valencia"]),
    ("Canada", "Ottawa", ["Toronto", "Vancouver", "Montreal"]),
    ("Australia", "Canberra", ["Sydney", "Melbourne", "Perth"]),
    ("Egypt", "Cairo", ["Alexandria", "Giza", "Luxor"]),
    ("Russia", "Moscow", ["Kazan", "Omsk", "Samara"]),
    ("China", "Beijing", ["Shanghai", "Shenzhen", "Wuhan"]),
    ("Brazil", "Brasilia", ["Rio", "Recife", "Salvador"]),
    ("Kenya", "Nairobi", ["Mombasa", "Kisumu", "Nakuru"]),
]
ARITH = [(a, b) for a, b in ((2, 3), (4, 4), (7, 1), (5, 5), (9, 3), (6, 2), (8, 8), (3, 11))]
UNTIL = ["\n"]
MAX_GEN = 8
IGNORE = [r"^\s+", r"\s+$", r"\.$"]


def docs() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    mc = []
    for i, (country, capital, others) in enumerate(CAPITALS):
        choices = others[: i % 4] + [capital] + others[i % 4 :]
        mc.append({"country": country, "choices": choices, "gold": i % 4})
    gen = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in ARITH]
    return mc, gen


def mc_text(doc: dict[str, Any]) -> str:
    return f"The capital of {doc['country']} is"


def gen_text(doc: dict[str, Any]) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def write_tasks(root: Path) -> list[str]:
    """Data files and task YAMLs under ``root``; returns the task names."""
    mc, gen = docs()
    for name, rows in (("capitals", mc), ("arith", gen)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "skv_capitals.yaml").write_text(
        f"task: skv_capitals\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'capitals.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "The capital of {{country}} is"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (root / "skv_arith.yaml").write_text(
        f"task: skv_arith\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'arith.jsonl'}\n"
        "output_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  max_gen_toks: {MAX_GEN}\n"
        "  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        f"    higher_is_better: true\n    regexes_to_ignore: {json.dumps(IGNORE)}\n"
    )
    return ["skv_capitals", "skv_arith"]


def serve_in_thread(llm: Any, name: str) -> tuple[str, Any]:
    """``(base url, uvicorn server)``: the app on an ephemeral loopback port."""
    import uvicorn

    from shadowkv.server import create_app

    server = uvicorn.Server(
        uvicorn.Config(create_app(llm, name), host="127.0.0.1", port=0, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", server


def run_lm_eval(url: str, name: str, tokenizer_dir: Path, root: Path, limit: int | None) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = write_tasks(root)
    out = simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{url}/v1/completions", "model": name,
            "tokenizer": str(tokenizer_dir), "tokenizer_backend": "huggingface",
            "tokenized_requests": True, "max_length": 1024, "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=tasks,
        task_manager=TaskManager(include_path=str(root)),
        limit=limit,
        log_samples=True,
    )
    res = out["results"]
    samples = sorted(out["samples"]["skv_capitals"], key=lambda s: s["doc_id"])
    return {
        "skv_capitals/acc": res["skv_capitals"]["acc,none"],
        "skv_arith/exact_match": res["skv_arith"]["exact_match,none"],
        "loglikelihoods": [[r[0][0] for r in s["resps"]] for s in samples],
    }


def reference_scores(llm: Any, limit: int | None) -> dict:
    """The same two scores through ``LLM``: prompt logprobs and greedy generations, tokenized
    as lm-eval tokenizes (context alone, then context + continuation split after it)."""
    from lm_eval.api.metrics import exact_match_hf_evaluate

    from shadowkv import SamplingParams

    tok = llm.tokenizer
    mc, gen = docs()
    mc, gen = mc[:limit], gen[:limit]
    correct, lls = 0, []
    for doc in mc:
        ctx = tok.encode(mc_text(doc), add_special_tokens=False)
        scores = []
        for choice in doc["choices"]:
            whole = tok.encode(mc_text(doc) + " " + choice, add_special_tokens=False)
            out = llm.generate(whole, SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
            scores.append(sum(e[0] for e in out.prompt_logprobs[len(ctx) :]))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["gold"]
        lls.append(scores)
    eos = tok.decode([tok.eos_token_id], skip_special_tokens=False)
    params = SamplingParams(max_tokens=MAX_GEN, temperature=0, stop=(*UNTIL, eos))
    preds = [
        llm.generate(tok.encode(gen_text(d), add_special_tokens=False), params)[0].text
        for d in gen
    ]
    em = exact_match_hf_evaluate(
        predictions=preds, references=[d["answer"] for d in gen], regexes_to_ignore=IGNORE
    )["exact_match"]
    return {
        "skv_capitals/acc": correct / len(mc),
        "skv_arith/exact_match": float(em),
        "loglikelihoods": lls,
    }


def compare(served: dict, direct: dict) -> float:
    """The largest loglikelihood difference; raises if a score or a choice's rank differs."""
    for key in ("skv_capitals/acc", "skv_arith/exact_match"):
        if served[key] != direct[key]:
            raise AssertionError(f"{key}: {served[key]} via the server, {direct[key]} directly")
    return max(
        abs(a - b)
        for sa, sb in zip(served["loglikelihoods"], direct["loglikelihoods"])
        for a, b in zip(sa, sb)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--json", type=Path, default=None, help="write the scores here")
    args = ap.parse_args()
    import torch

    from shadowkv import LLM, EngineConfig
    from shadowkv.models.loader import resolve_model

    torch.set_num_threads(int(os.environ.get("SHADOWKV_THREADS", "1")))
    path = resolve_model("smollm2")
    llm = LLM(str(path), device="cpu", engine=EngineConfig(max_model_len=1024, max_num_seqs=4))
    url, server = serve_in_thread(llm, "smollm2")
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            served = run_lm_eval(url, "smollm2", path, Path(tmp), args.limit)
    finally:
        server.should_exit = True
    t_served = time.perf_counter() - t0
    t0 = time.perf_counter()
    direct = reference_scores(llm, args.limit)
    t_direct = time.perf_counter() - t0
    print("| task/metric | lm-eval via server | LLM directly |")
    print("|---|---|---|")
    for key in ("skv_capitals/acc", "skv_arith/exact_match"):
        print(f"| {key} | {served[key]:.4f} | {direct[key]:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"served": served, "direct": direct}, indent=1))
    diff = compare(served, direct)
    n = sum(len(x) for x in direct["loglikelihoods"])
    print(f"{n} choice loglikelihoods, max |difference| {diff:.2e}; lm-eval run {t_served:.1f} s, "
          f"direct {t_direct:.1f} s")


if __name__ == "__main__":
    main()
