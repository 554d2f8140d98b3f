"""The base install runs the default model: the GGUF path imports only declared packages.

A fresh ``pip install .`` holds shadowkv's ``[project.dependencies]`` and what they require, no
extras. A subprocess sees exactly that: the closure of the declared requirements over the
installed distributions' metadata is linked into one directory, the only entry of ``sys.path``
besides the standard library (``python -S``: no site-packages, no ``.pth`` files), so both
imports and ``importlib.util.find_spec`` probes (how transformers looks for ``accelerate``) find
nothing else. In it ``LLM`` converts a tiny GGUF checkpoint (written here with ``gguf``, in the
default model's format: a Llama with a GPT-2 BPE vocabulary) and generates. Leaving
``accelerate`` out of the view makes the same run fail, so the check can fail.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pip's vendored copy of the same parser
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from shadowkv import LLM, SamplingParams

llm = LLM(sys.argv[1], device="cpu")
out = llm.generate(["hello world"], SamplingParams(max_tokens=2, ignore_eos=True))
assert len(out[0].token_ids) == 2, out
print("generated", out[0].token_ids)
"""


def declared_distributions(drop: frozenset[str] = frozenset()) -> set[str]:
    """Canonical names of the installed distributions a ``pip install .`` would bring: the
    declared dependencies and, recursively, what each requires (markers evaluated here; a
    requirement's extras pull in its ``extra == ...`` requirements)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [(Requirement(d), "") for d in deps]
    seen: set[str] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name in drop:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # not needed on this platform (e.g. CUDA wheels of a CPU torch)
        first = name not in seen
        seen.add(name)
        for text in dist.requires or []:
            sub = Requirement(text)
            for e in req.extras or {""}:
                if first or e:
                    todo.append((sub, e))
    return seen


def link_view(dists: set[str], out: Path) -> Path:
    """A directory holding links to every top-level file and folder of ``dists`` (packages,
    their ``.dist-info`` and bundled libraries) and to the working tree's ``shadowkv``."""
    out.mkdir()
    for name in sorted(dists):
        dist = md.distribution(name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (out / top).exists():
                (out / top).symlink_to(src)
    (out / "shadowkv").symlink_to(REPO / "shadowkv")
    return out


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (byte-level BPE's base alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path: Path) -> Path:
    """A random one-layer Llama in fp32 with a byte-level BPE vocabulary (GGUF, like SmolLM2)."""
    import gguf

    tokens = ["<|endoftext|>", "<s>", "</s>", *byte_symbols(), "he", "hel", "hell"]
    merges = ["h e", "he l", "hel l"]
    V, hidden, heads, kv_heads, ff = len(tokens), 32, 4, 2, 48
    D = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:
        data = rng.normal(0, 0.1, shape) if len(shape) > 1 else np.ones(shape)
        w.add_tensor(name, data.astype(np.float32))

    add("token_embd.weight", V, hidden)
    add("output_norm.weight", hidden)
    add("output.weight", V, hidden)
    add("blk.0.attn_norm.weight", hidden)
    add("blk.0.ffn_norm.weight", hidden)
    add("blk.0.attn_q.weight", hidden, hidden)
    add("blk.0.attn_k.weight", kv_heads * D, hidden)
    add("blk.0.attn_v.weight", kv_heads * D, hidden)
    add("blk.0.attn_output.weight", hidden, hidden)
    add("blk.0.ffn_gate.weight", ff, hidden)
    add("blk.0.ffn_up.weight", ff, hidden)
    add("blk.0.ffn_down.weight", hidden, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run_in_view(view: Path, gguf_file: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(cache),
        "PYTHONPATH": str(view),
        "PYTHONNOUSERSITE": "1",
        "SHADOWKV_CACHE_DIR": str(cache),
        "HF_HOME": str(cache / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-S", "-c", SCRIPT, str(gguf_file)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_declared_dependencies_alone_run_a_gguf_model(tmp_path: Path) -> None:
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf")
    full = run_in_view(link_view(declared_distributions(), tmp_path / "full"), gguf_file,
                       tmp_path / "c1")
    assert full.returncode == 0, f"the base install cannot run a GGUF model:\n{full.stderr[-3000:]}"
    assert "generated" in full.stdout
    # The same run without accelerate must fail, and say why: the view does hide packages.
    bare = link_view(declared_distributions(frozenset({"accelerate"})), tmp_path / "bare")
    failed = run_in_view(bare, gguf_file, tmp_path / "c2")
    assert failed.returncode != 0 and "accelerate" in failed.stderr, failed.stderr[-3000:]
