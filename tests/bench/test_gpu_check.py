"""``benchmarks/gpu_check.sh`` end to end in its CPU smoke mode: every stage runs, each one's
results land in the one archive, and the script needs neither gguf nor fastapi (the GPU image
has neither)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
STAGES = [
    "e2e_122k", "kernel_tests", "decode_modes", "kernel_bench", "e2e_16k", "prefill_pack",
    "mixed_step", "shared_doc", "e2e_122k_fp8",
]


def test_smoke_runs_every_stage_and_returns_one_archive(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"  # stand-ins that refuse to import, as if not installed
    (blocked / "fastapi").mkdir(parents=True)
    for path in (blocked / "gguf.py", blocked / "fastapi" / "__init__.py"):
        path.write_text('raise ImportError("not installed on the GPU image")\n')
    out, work = tmp_path / "out", tmp_path / "work"
    env = {
        **os.environ,
        "SMOKE": "1",
        "PYTHON": sys.executable,
        "OUT": str(out),
        "WORK": str(work),
        "PYTHONPATH": str(blocked),
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tgz", "summary.md"]
    summary = (out / "summary.md").read_text()
    for stage in STAGES:
        assert f"| {stage} | ok |" in summary, summary
    assert proc.stdout.count("--- summary after") == len(STAGES), "a summary after every stage"
    with tarfile.open(out / "gpu_check.tgz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
        env_txt = tar.extractfile("./env.txt").read().decode()  # type: ignore[union-attr]
        headline = json.load(tar.extractfile("./e2e_122k/throughput.json"))  # type: ignore[arg-type]
    for name in ("env.txt", "summary.md", "kernel_tests.xml", "modes/decode_modes.json",
                 "kernels/rows.jsonl", "e2e_16k/throughput.json", "e2e_122k_fp8/throughput.json",
                 "pack/prefill_pack.json", "mixed/mixed_step.json", "shared_doc/throughput.json",
                 *(f"{s}.log" for s in STAGES)):
        assert name in names, name
    assert "gguf: missing" in env_txt and "fastapi: missing" in env_txt
    runs = [(r["method"], r["hit_rate_driven"], r["batch_kind"]) for r in headline["runs"]]
    assert ("dense", None, "own max") in runs
    assert ("shadowkv", 0.7, "own max") in runs and ("shadowkv", None, "own max") in runs
    assert all("error" not in r and r["decode_steps"] == 4 for r in headline["runs"])
