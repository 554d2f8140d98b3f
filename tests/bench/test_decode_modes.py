"""``benchmarks/decode_modes.py`` on the CPU: both modes timed per method and batch, one table."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_modes.py"


def load_script():
    spec = importlib.util.spec_from_file_location("decode_modes", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_modes_times_both_modes_on_cpu() -> None:
    script = load_script()
    args = argparse.Namespace(
        arch="tiny", context=512, batches=[1, 3], methods=["dense", "shadowkv"], decode_steps=4,
        device="cpu", cache_memory_gb=0.05, sparse_budget=64, outlier_chunks=2,
        host_memory_gb=0.05, prefill="synthetic", out=None,
    )
    report = script.measure(args)
    assert report["modes"] == ("eager", "static")
    seen = {(r["method"], r["mode"], r["batch"]) for r in report["rows"]}
    assert seen == {
        (m, mode, b) for m in ("dense", "shadowkv") for mode in report["modes"] for b in (1, 3)
    }
    for row in report["rows"]:
        assert "error" not in row, row
        assert row["ms_per_step"] > 0 and row["captures"] == 0  # no graphs on a CPU
        assert ("roofline_share" in row) == (row["method"] == "dense")
    text = script.table(report)
    assert text.count("\n| dense |") == 2 and text.count("\n| shadowkv |") == 2
    assert "eager ms/step | static ms/step" in text
