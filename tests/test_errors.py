"""Bad input gives one clear exception (library) or one line and exit status 2 (CLI).

Each case checks the exception type users can catch and that the message names the problem and
the way out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shadowkv import LLM, EngineConfig, SamplingParams
from shadowkv.config import SUPPORTED_ARCHITECTURES
from shadowkv.errors import (
    USER_ERRORS,
    ConfigError,
    ContextLengthError,
    ModelLoadError,
    SamplingError,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", max_position=32)


def broken_copy(src: Path, dst: Path, edit_config=None, weights: bytes | None = None) -> Path:
    """A copy of checkpoint ``src`` with its config.json edited and/or its weights replaced."""
    shutil.copytree(src, dst)
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if weights is not None:
        (dst / "model.safetensors").write_bytes(weights)
    return dst


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found.*checkpoint directory"):
        LLM(str(tmp_path / "no-such-model"), device="cpu")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLM(str(tmp_path), device="cpu")


def test_unreachable_hub_id_says_to_pass_a_local_path() -> None:
    # conftest sets HF_HUB_OFFLINE=1: the hub is never contacted.
    with pytest.raises(ModelLoadError, match="local checkpoint directory"):
        LLM("nobody-here/no-such-model", device="cpu")


def test_truncated_safetensors(tiny_dir: Path, tmp_path: Path) -> None:
    data = (tiny_dir / "model.safetensors").read_bytes()
    bad = broken_copy(tiny_dir, tmp_path / "ck", weights=data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated.*re-download"):
        LLM(str(bad), device="cpu")


def test_garbage_safetensors_header(tiny_dir: Path, tmp_path: Path) -> None:
    bad = broken_copy(tiny_dir, tmp_path / "ck", weights=b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        LLM(str(bad), device="cpu")


def test_no_weights(tiny_dir: Path, tmp_path: Path) -> None:
    bad = broken_copy(tiny_dir, tmp_path / "ck")
    (bad / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        LLM(str(bad), device="cpu")


def test_unsupported_architecture_names_the_supported_ones(tiny_dir: Path, tmp_path: Path) -> None:
    def gpt2(cfg: dict) -> None:
        cfg["architectures"] = ["GPT2LMHeadModel"]
        cfg["model_type"] = "gpt2"

    bad = broken_copy(tiny_dir, tmp_path / "ck", edit_config=gpt2)
    with pytest.raises(ModelLoadError) as err:
        LLM(str(bad), device="cpu")
    msg = str(err.value)
    assert "GPT2LMHeadModel" in msg
    assert all(a in msg for a in SUPPORTED_ARCHITECTURES)
    for family in ("Phi3ForCausalLM", "GlmForCausalLM", "Glm4ForCausalLM", "Qwen3ForCausalLM",
                   "Gemma3ForCausalLM"):
        assert family in msg


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        pytest.param(
            lambda c: c.pop("hidden_size"), "lacks the field 'hidden_size'", id="missing-field"
        ),
        pytest.param(lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu'", id="activation"),
        pytest.param(lambda c: c.update(num_key_value_heads=4), "num_kv_heads", id="gqa-heads"),
        pytest.param(
            lambda c: c.update(rope_parameters={"rope_type": "mrope", "rope_theta": 1e4}),
            "mrope", id="rope-kind",
        ),
        pytest.param(
            lambda c: c.update(intermediate_size=40), "config.json and weights disagree",
            id="shapes",
        ),
    ],
)
def test_bad_config_values(tiny_dir: Path, tmp_path: Path, edit, needle: str) -> None:
    bad = broken_copy(tiny_dir, tmp_path / "ck", edit_config=edit)
    with pytest.raises(ModelLoadError, match=needle):
        LLM(str(bad), device="cpu")


def test_config_json_that_is_not_json(tiny_dir: Path, tmp_path: Path) -> None:
    bad = broken_copy(tiny_dir, tmp_path / "ck")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read .*config.json"):
        LLM(str(bad), device="cpu")


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir: Path) -> LLM:
    return LLM(str(tiny_dir), device="cpu", engine=EngineConfig(cache_memory_gb=0.01))


def test_prompt_longer_than_the_context(tiny_llm: LLM) -> None:
    prompt = " ".join(f"w{i}" for i in range(3, 43))  # 40 tokens, context 32
    with pytest.raises(ContextLengthError, match="40 tokens.*context is 32.*at most 31"):
        tiny_llm.generate(prompt, SamplingParams(max_tokens=4))
    # Nothing was admitted: the engine still serves the next request.
    assert tiny_llm.generate("w5 w6", SamplingParams(max_tokens=2))[0].finish_reason == "length"


def test_one_bad_prompt_in_a_batch_admits_none(tiny_dir: Path) -> None:
    llm = LLM(str(tiny_dir), device="cpu", engine=EngineConfig(cache_memory_gb=0.01))
    long = " ".join(f"w{i}" for i in range(3, 43))
    with pytest.raises(ContextLengthError):
        llm.generate(["w5 w6", long], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()


def test_empty_prompt(tiny_llm: LLM) -> None:
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate("", SamplingParams(max_tokens=2))


def test_params_count_must_match_prompts(tiny_llm: LLM) -> None:
    with pytest.raises(ValueError, match="2 prompts but 3 sampling parameter sets"):
        tiny_llm.generate(["w5", "w6"], [SamplingParams()] * 3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 2.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
    ids=["temperature", "top_p", "max_tokens"],
)
def test_invalid_sampling_values(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**kwargs)


def test_engine_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ConfigError, match="dtype"):
        EngineConfig(dtype="float8")


def test_user_errors_cover_the_library_errors() -> None:
    for err in (ConfigError, ModelLoadError, ContextLengthError, SamplingError):
        assert issubclass(err, USER_ERRORS)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "shadowkv", *args], capture_output=True, text=True, cwd=REPO,
        env=env, timeout=120,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_cli_missing_model_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = run_cli("generate", "--model", str(tmp_path / "missing"), "--quiet", "hi")
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("shadowkv generate: error: "), proc.stderr
    assert "not found" in lines[0]
    assert proc.stdout == ""


def test_cli_bad_checkpoint_and_long_prompt_exit_2(tiny_dir: Path, tmp_path: Path) -> None:
    """Two failures in one process each, without a traceback: a truncated checkpoint, and a
    prompt past the context (without --quiet: the progress line may precede the error)."""
    data = (tiny_dir / "model.safetensors").read_bytes()
    bad = broken_copy(tiny_dir, tmp_path / "ck", weights=data[:100])
    proc = run_cli("generate", "--model", str(bad), "--quiet", "hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("shadowkv generate: error: "), proc.stderr
    assert "corrupt or truncated" in lines[0]

    prompt = " ".join(f"w{i}" for i in range(3, 43))
    proc = run_cli("generate", "--model", str(tiny_dir), "--device", "cpu", prompt)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in error_lines(proc.stderr) if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("shadowkv generate: error: "), proc.stderr
    assert "context" in errors[0]
