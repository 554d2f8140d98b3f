"""Outside clients against a real server (slow suite): lm-evaluation-harness's
``local-completions`` model, and schemathesis fuzzing ``/openapi.json``.

lm-eval comes from the ``eval-client`` extra (``pip install -e '.[eval-client]'``), kept out of
``test`` for its heavy dependencies; without it that test is skipped and says so.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")

from shadowkv import LLM, EngineConfig  # noqa: E402
from tests.server.live import Live, serve  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).parent / "data" / "qwen25_chat_template.jinja"
pytestmark = pytest.mark.slow


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_lm_eval_scores_through_the_server_equal_llm(smollm2_dir: Path, tmp_path: Path) -> None:
    for module in ("lm_eval", "tenacity"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is missing: pip install -e '.[eval-client]' (lm-eval[api])")
    bench = _bench("lm_eval_server")
    llm = LLM(str(smollm2_dir), device="cpu",
              engine=EngineConfig(max_model_len=1024, max_num_seqs=4, cache_memory_gb=0.25))
    with serve(llm, "smollm2") as live:
        served = bench.run_lm_eval(live.url, "smollm2", smollm2_dir, tmp_path, limit=4)
    direct = bench.reference_scores(llm, limit=4)
    assert bench.compare(served, direct) < 1e-4, (served, direct)
    assert len(served["loglikelihoods"]) == 4


@pytest.fixture(scope="module")
def fuzz_target(tiny_checkpoint, tmp_path_factory) -> Iterator[Live]:
    """A tiny llama with Qwen2.5's chat template, behind an API key."""
    from transformers import AutoTokenizer

    src = tiny_checkpoint("llama")
    out = tmp_path_factory.mktemp("tiny-chat")
    for f in src.iterdir():
        (out / f.name).symlink_to(f)
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.chat_template = TEMPLATE.read_text()
    (out / "tokenizer_config.json").unlink()
    tok.save_pretrained(out)
    llm = LLM(str(out), device="cpu",
              engine=EngineConfig(max_model_len=256, max_num_seqs=8, cache_memory_gb=0.01))
    with serve(llm, "tiny", api_key="fuzz", default_max_tokens=8) as live:
        yield live


def test_schemathesis_finds_no_5xx_and_no_schema_violation(fuzz_target: Live, tmp_path) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which(
        "schemathesis"
    )
    if cli is None:
        pytest.skip("schemathesis is missing: pip install -e '.[test]'")
    checks = ",".join([
        "not_a_server_error", "status_code_conformance", "content_type_conformance",
        "response_schema_conformance",
    ])
    run = subprocess.run(
        [cli, "run", f"{fuzz_target.url}/openapi.json", "--checks", checks,
         "--max-examples", "40", "--header", "Authorization: Bearer fuzz",
         "--generation-deterministic", "--request-timeout", "60", "--no-color"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1], tail
