"""Kernel launches per layer of a decode step stay within the decode-step diet's targets.

Counted by ``benchmarks/step_ops.py`` on the fixed-shape step CUDA graphs capture, with the Triton
kernels (interpreted): aten ops that launch a kernel plus Triton launches, per decoder layer.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_ops.py"
TARGETS = {"dense": 20, "shadowkv": 30}


def load_script():
    spec = importlib.util.spec_from_file_location("step_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_ops"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_ops_per_layer_meet_the_targets(monkeypatch) -> None:
    monkeypatch.setenv("SHADOWKV_KERNELS", "triton")
    script = load_script()
    prompts = [[(k * i) % 90 + 3 for i in range(n)] for k, n in ((7, 130), (11, 97))]
    report = script.measure(None, "tiny", list(TARGETS), prompts)
    for method, target in TARGETS.items():
        r = report["methods"][method]
        assert r["per_layer"] <= target, (method, r["by_op_per_layer"])
        ops = r["by_op_per_layer"]
        # What the diet removed must stay out: unfused norms, residual adds, selection prep.
        for gone in ("pow", "rsqrt", "mean", "add", "silu", "sort", "sum", "__and__"):
            assert gone not in ops, (method, gone, ops)
    shadow = report["methods"]["shadowkv"]["by_op_per_layer"]
    assert shadow.get("triton:_select_chunks_kernel") == 1 and shadow.get("topk") == 1
    # The counter itself counts: the dense layer has its 4 projections and attention.
    dense = report["methods"]["dense"]["by_op_per_layer"]
    assert dense.get("linear") == 4 and dense.get("triton:_decode_attention_split_kernel") == 1
