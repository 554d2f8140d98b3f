"""Our decoder's logits equal HF transformers' (the oracle) within fp32 tolerance.

Every case runs a prompt through ``prefill`` and then feeds the following tokens one at a time
through ``decode`` (teacher forcing), so each decode step's logits compare with HF's logits of one
full-sequence forward at the same position.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from utils import assert_close_verbose, run_model

from shadowkv.cache.dense import DenseCache
from shadowkv.cache.layout import KVLayout
from shadowkv.cache.methods import DenseConfig
from shadowkv.config import ModelConfig, RopeConfig
from shadowkv.kernels.rope.tables import RopeTables
from shadowkv.models.llama import LlamaModel, attention_spec
from shadowkv.models.loader import load_model
from shadowkv.models.rope import rope_tables

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
VOCAB = 512  # the tiny checkpoints' vocabulary
# fp32 logits from two implementations that order their sums differently: a few ulps per layer.
ATOL, RTOL = 2e-5, 1e-4


def hf_logits(path: Path, ids: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """HF's full-sequence logits ``[T, V]`` (fp32) for ``ids [T]``; the last ``keep`` rows only
    when ``keep > 0``."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids[None], logits_to_keep=keep).logits[0].float()


def our_logits(
    model: LlamaModel, cfg: ModelConfig, rope: RopeTables, seqs: list[torch.Tensor],
    prompt_lens: list[int], prefill_rows: int | None = None,
) -> list[torch.Tensor]:
    """Logits ``[T_i, V]`` per sequence: prefill of ``prompt_lens[i]`` tokens each, then batched
    decode steps (all sequences that still have tokens) over the rest. ``prefill_rows`` keeps
    only the last that many prefill rows (the LM head over a long prompt is costly)."""
    layout = KVLayout(attention_spec(cfg), cfg.num_layers, torch.float32)
    blocks = sum(-(-len(s) // 16) for s in seqs)
    block_bytes = 2 * cfg.num_layers * 16 * cfg.kv_dim * 4
    cache = DenseCache(
        DenseConfig(page_size=16), layout, CPU, len(seqs), rope.max_position,
        (blocks + 1) * block_bytes,
    )
    out: list[list[torch.Tensor]] = []
    for i, (ids, n) in enumerate(zip(seqs, prompt_lens)):
        cache.add_sequence(i, n, len(ids) - n)
        cache.begin_prefill(i, n)
        rows = torch.arange(n - (prefill_rows or n), n)
        logits = run_model(model, ids[:n], torch.arange(n), rope, cache, "prefill", rows)
        out.append([logits])
        cache.end_prefill()
    while live := [i for i, s in enumerate(seqs) if cache.length(i) < len(s)]:
        pos = torch.tensor([cache.length(i) for i in live])
        tokens = torch.stack([seqs[i][cache.length(i)] for i in live])
        cache.begin_decode(live)
        logits = run_model(model, tokens, pos, rope, cache, "decode")
        cache.end_decode()
        for row, i in enumerate(live):
            out[i].append(logits[row : row + 1])
    return [torch.cat(parts) for parts in out]


def random_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


FAMILIES = [
    pytest.param("llama", dict(num_heads=4, num_kv_heads=4), id="llama-G1-untied"),
    pytest.param("llama", dict(num_heads=6, num_kv_heads=2, tie=True), id="llama-G3-tied"),
    pytest.param("llama", dict(num_heads=7, num_kv_heads=1, head_dim=8), id="llama-G7-D8"),
    pytest.param("llama", dict(attention_bias=True, mlp_bias=True), id="llama-qkvo-mlp-bias"),
    pytest.param("qwen2", dict(num_heads=6, num_kv_heads=2), id="qwen2-G3-qkv-bias-untied"),
    pytest.param("qwen2", dict(num_heads=7, num_kv_heads=1, tie=True), id="qwen2-G7-qkv-bias-tied"),
    pytest.param("mistral", dict(num_heads=8, num_kv_heads=2, head_dim=12), id="mistral-G4-D12"),
]


@pytest.mark.parametrize(("family", "kw"), FAMILIES)
def test_family_prefill_and_decode_match_hf(tiny_checkpoint, family: str, kw: dict) -> None:
    path = tiny_checkpoint(family, **kw)
    ids = random_ids(37, seed=1)
    expected = hf_logits(path, ids)
    cfg, model = load_model(path, CPU, torch.float32)
    # A table longer than the sequence, as the engine builds it: must not change anything.
    rope = rope_tables(cfg.rope, cfg.head_dim, 100)
    (got,) = our_logits(model, cfg, rope, [ids], [31])
    assert_close_verbose(got[:31], expected[:31], ATOL, RTOL, what=f"{family} prefill logits")
    assert_close_verbose(got[31:], expected[31:], ATOL, RTOL, what=f"{family} decode logits")


# (rope_parameters, checkpoint max_position_embeddings, sequence length)
ROPES = [
    pytest.param({"rope_type": "linear", "factor": 2.0}, 64, 37, id="linear-x2"),
    pytest.param(
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
        64, 37, id="llama3-x8-orig16",
    ),
    pytest.param(
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 64, 37,
        id="yarn-x4-orig16",
    ),
    pytest.param(
        {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0,
         "original_max_position_embeddings": 16, "attention_factor": 1.2},
        64, 37, id="yarn-x4-betas-attnfactor",
    ),
    pytest.param({"rope_type": "dynamic", "factor": 2.0}, 64, 37, id="dynamic-within-context"),
    pytest.param({"rope_type": "dynamic", "factor": 2.0}, 24, 37, id="dynamic-past-context"),
]


@pytest.mark.parametrize(("rope_parameters", "max_position", "length"), ROPES)
def test_rope_scaling_matches_hf(
    tiny_checkpoint, rope_parameters: dict, max_position: int, length: int
) -> None:
    """Scaled RoPE through the whole model.

    Dynamic NTK: HF recomputes the frequencies per forward from the current length, while we fix
    them once for the engine's maximum length. A single full-sequence HF forward of ``length``
    tokens is therefore comparable exactly when our table is built for ``length`` positions; HF's
    incremental generation past the context (keys cached at older frequencies) is not.
    """
    path = tiny_checkpoint("llama", rope_scaling=rope_parameters, max_position=max_position)
    ids = random_ids(length, seed=2)
    expected = hf_logits(path, ids)
    cfg, model = load_model(path, CPU, torch.float32)
    assert cfg.rope.kind == rope_parameters["rope_type"]
    table_len = length if rope_parameters["rope_type"] == "dynamic" else 3 * max_position
    rope = rope_tables(cfg.rope, cfg.head_dim, table_len)
    (got,) = our_logits(model, cfg, rope, [ids], [length - 5])
    assert_close_verbose(got, expected, ATOL, RTOL, what=f"{rope_parameters['rope_type']} logits")


def test_dynamic_rope_actually_scales_past_the_context(tiny_checkpoint) -> None:
    """Guards the dynamic case above from passing vacuously: past the checkpoint's context the
    scaled logits must differ from unscaled ones."""
    dynamic = {"rope_type": "dynamic", "factor": 2.0}
    scaled = tiny_checkpoint("llama", rope_scaling=dynamic, max_position=24)
    cfg, model = load_model(scaled, CPU, torch.float32)
    ids = random_ids(37, seed=2)
    plain = ModelConfig(**{**cfg.__dict__, "rope": RopeConfig(theta=cfg.rope.theta)})
    a = our_logits(model, cfg, rope_tables(cfg.rope, cfg.head_dim, 37), [ids], [32])[0]
    b = our_logits(model, plain, rope_tables(plain.rope, cfg.head_dim, 37), [ids], [32])[0]
    assert (a - b).abs().max() > 1e-3


def test_batched_decode_of_unequal_sequences_matches_hf(tiny_checkpoint) -> None:
    """Three sequences, different prompt and total lengths, decoded in one batch (it shrinks as
    sequences run out); each equals HF's logits for that sequence alone."""
    path = tiny_checkpoint("qwen2", num_heads=6, num_kv_heads=2)
    seqs = [random_ids(n, seed=10 + n) for n in (21, 40, 29)]
    prompt_lens = [17, 33, 20]
    cfg, model = load_model(path, CPU, torch.float32)
    rope = rope_tables(cfg.rope, cfg.head_dim, 64)
    got = our_logits(model, cfg, rope, seqs, prompt_lens)
    for i, ids in enumerate(seqs):
        assert_close_verbose(got[i], hf_logits(path, ids), ATOL, RTOL, what=f"sequence {i}")


def test_smollm2_real_weights_1k_prompt_match_hf(smollm2, smollm2_dir: Path) -> None:
    """SmolLM2-135M (30 layers, G=3, tied embeddings): 1020-token prefill + 4 decode steps; the
    last 8 prefill positions and the 4 decode steps are compared."""
    text = (REPO / "shadowkv" / "data" / "demo_document.txt").read_text()
    ids = torch.tensor(smollm2.tokenizer.encode(text)[:1024])
    assert len(ids) == 1024, "the demo document should hold at least 1024 tokens"
    expected = hf_logits(smollm2_dir, ids, keep=12)
    engine = smollm2.engine
    (got,) = our_logits(engine.model, smollm2.model_config, engine.rope, [ids], [1020], 8)
    # Real logits reach ~30 and pass through 30 layers: scale the tolerance to their size.
    scale = expected.abs().max().item()
    assert_close_verbose(got, expected, atol=2e-5 * scale, rtol=1e-4, what="SmolLM2 logits")
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
