"""GuideLLM as serve_load's load generator: its command line and its report's mapping.

GuideLLM itself is not installed in the test environment (it lives in a venv of its own), so the
report parsed here is a real GuideLLM 0.8.1 report of a 4-stream level against ``shadowkv serve``
(SmolLM2, dense, 64-token prompts, 8 new tokens), cut down to the fields we read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import guidellm_load  # noqa: E402

REPORT = Path(__file__).parent / "data" / "guidellm_report.json"


def test_command_asks_for_one_concurrent_level_of_exact_prompts(tmp_path: Path) -> None:
    cmd = guidellm_load.guidellm_command(
        "/x/guidellm",
        "http://127.0.0.1:9",
        tmp_path / "tok",
        16,
        30.0,
        256,
        16,
        tmp_path / "r.json",
    )
    assert cmd[:2] == ["/x/guidellm", "run"]
    opts = dict(zip(cmd[2::2], cmd[3::2]))
    assert opts["--profile"] == "kind=concurrent,streams=16"
    assert opts["--constraint"] == "kind=max_duration,seconds=30"
    assert opts["--data"] == "kind=synthetic_text,prompt_tokens=256,output_tokens=16"
    # /v1/completions: no chat template around the synthetic prompt, so it is exactly 256 tokens
    assert "request_format=/v1/completions" in opts["--backend"]
    assert opts["--tokenizer"] == f"kind=huggingface_auto,model={tmp_path / 'tok'}"
    assert opts["--output"] == f"kind=json,path={tmp_path / 'r.json'}"


def test_report_maps_onto_the_own_drivers_keys() -> None:
    report = json.loads(REPORT.read_text())
    peaks = {
        "running_requests": 4.0, "queue_length": 3.0, "cached_tokens_total": 64.0,
        "preemptions_total": 2.0,
    }
    s = guidellm_load.summarise_report(report, peaks)
    assert (s["requests_ok"], s["requests_failed"], s["requests_cut_at_time_limit"]) == (18, 0, 4)
    assert s["output_tokens_total"] == 144 and s["prompt_tokens_total"] == 1152
    assert s["output_tokens_per_s"] == pytest.approx(14.4)  # 144 tokens over the 10 s window
    assert s["ttft_ms"]["p50"] == pytest.approx(630.51, abs=0.01)
    assert s["itl_ms"]["p90"] == pytest.approx(236.75, abs=0.01)
    assert s["latency_ms"]["p50"] == pytest.approx(1968.21, abs=0.01)  # GuideLLM reports seconds
    assert (s["server_peak_running"], s["server_peak_queue"]) == (4.0, 3.0)
    assert s["server_cached_tokens_total"] == 64.0 and s["server_preemptions_total"] == 2.0
    # the same keys the own driver's summary has, so --compare plots either against the other
    from load_test import summarise

    assert set(summarise([], 0, 1.0, {})) <= set(s)


def test_missing_guidellm_says_how_to_install_it() -> None:
    with pytest.raises(SystemExit, match="pip install guidellm"):
        guidellm_load.find_guidellm("/nonexistent/guidellm")
