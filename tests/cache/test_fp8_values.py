"""ShadowKV with fp8 values and landmarks: exact against dense over the fp8-rounded values, host
bytes and batch size, the store's round trip, and a real-model passkey."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

from utils import (  # noqa: E402
    PASSKEY_ANSWER,
    assert_close_verbose,
    cache_for,
    full_budget,
    greedy_with_logits,
    passkey_prompt,
    read_essays,
)

from shadowkv import DenseConfig, ShadowKVConfig  # noqa: E402
from shadowkv.bench.harness import max_batch  # noqa: E402
from shadowkv.cache.shadow import ShadowKVCache  # noqa: E402
from shadowkv.cache.shadow_prefill import exact_token_index, summarize_chunks  # noqa: E402
from shadowkv.cache.store import HOST, ValueLayout, ValueTier  # noqa: E402
from shadowkv.config import ConfigError, ModelConfig  # noqa: E402
from shadowkv.kernels.fp8 import fp8_round_trip  # noqa: E402
from shadowkv.kernels.varlen_attention.reference import causal_attention  # noqa: E402
from shadowkv.models.loader import load_model  # noqa: E402

CPU = torch.device("cpu")
MAX_LEN = 512


class RoundedValuesDense:
    """A dense cache whose stored prompt values are fp8-rounded wherever ShadowKV's are: every
    token but the local window and the outlier chunks (kept exact in ShadowKV's buffer)."""

    def __init__(self, inner, cfg: ShadowKVConfig) -> None:
        self.inner, self.cfg = inner, cfg

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def prefill(self, layer, q, k, v, k_pre):
        T = k.shape[0]
        cfg = self.cfg
        s = summarize_chunks(k, cfg.chunk_size, cfg.local_chunks, cfg.outlier_chunks)
        exact = exact_token_index(T, cfg.chunk_size, s.num_candidates, s.outlier_ids)  # [E, Hkv]
        rounded = torch.ones(T, k.shape[1], dtype=torch.bool)
        rounded.scatter_(0, exact, False)
        v_store = torch.where(rounded[..., None], fp8_round_trip(v), v)
        self.inner.store_prompt(layer, k, v_store, k_pre)
        return causal_attention(q, k, v, self.inner.scale)  # prefill attends the exact values


@pytest.mark.parametrize("landmark_dtype", ["auto", "fp8"])
def test_full_budget_full_rank_equals_dense_over_fp8_rounded_values(
    tiny_checkpoint, landmark_dtype: str
) -> None:
    mcfg, model = load_model(
        tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16), CPU, torch.float32
    )
    n = 141
    cfg = ShadowKVConfig(sparse_budget=full_budget(n), outlier_chunks=2, rank=1.0,
                         value_dtype="fp8", landmark_dtype=landmark_dtype)
    shadow, rope = cache_for(mcfg, cfg, MAX_LEN, 1)
    dense, _ = cache_for(mcfg, DenseConfig(), MAX_LEN, 1)
    assert shadow.store.layout.quantized
    prompt = torch.randint(3, mcfg.vocab_size, (n,), generator=torch.Generator().manual_seed(3))
    rounded = RoundedValuesDense(dense, cfg)
    want_tokens, want = greedy_with_logits(model, rope, rounded, prompt.tolist(), 10)
    got_tokens, got = greedy_with_logits(model, rope, shadow, prompt.tolist(), 10)
    assert got_tokens == want_tokens
    assert_close_verbose(got, want, atol=2e-5, rtol=1e-4, what="fp8 ShadowKV vs rounded dense")
    # ...and it is not dense over the exact values (the comparison can tell the two apart).
    exact_tokens, exact = greedy_with_logits(model, rope, dense, prompt.tolist(), 10)
    assert (got[1:] - exact[1:]).abs().max() > 1e-4


def tiny_d64() -> ModelConfig:
    return ModelConfig("llama", 64, 256, 64, 2, 4, 2, 64)  # Hkv=2, D=64 (SmolLM2's head dim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_host_bytes_with_fp8_values_are_at_most_055x(dtype: torch.dtype) -> None:
    """Codes + scales of a 300-token prompt against the same prompt stored in the model dtype
    (head dim 64: 64 code bytes + a 4-byte scale per token and head, vs 128 or 256 bytes)."""
    mcfg, T = tiny_d64(), 300
    host = {}
    for value_dtype in ("auto", "fp8"):
        cfg = ShadowKVConfig(sparse_budget=32, outlier_chunks=2, value_dtype=value_dtype)
        cache, _ = cache_for(mcfg, cfg, MAX_LEN, 2, dtype=dtype)
        cache.add_sequence(1, T, 8)
        host[value_dtype] = cache.memory(1).host_bytes
        chunks = math.ceil(T / 8)
        pages = math.ceil(chunks / 16)
        per_token = 64 + 4 if value_dtype == "fp8" else 64 * dtype.itemsize
        assert host[value_dtype] == 2 * pages * 16 * 8 * 2 * per_token  # L * rows * C * Hkv
    assert host["fp8"] <= 0.55 * host["auto"], host


def test_fp8_landmarks_shrink_the_factor_pages() -> None:
    base = dict(sparse_budget=32, outlier_chunks=2)
    sizes = {}
    for lm in ("auto", "fp8"):
        cache, _ = cache_for(tiny_d64(), ShadowKVConfig(**base, landmark_dtype=lm), MAX_LEN, 2,
                             dtype=torch.bfloat16)
        assert isinstance(cache, ShadowKVCache)
        sizes[lm] = cache.sizing.factor_page_bytes
        assert (cache.landmarks[0].dtype == torch.uint8) == (lm == "fp8")
    # Per page: 16 landmarks x 2 heads x 2 layers, each 128 bf16 bytes -> 64 code bytes + 4.
    assert sizes["auto"] - sizes["fp8"] == 2 * 16 * 2 * (128 - 68)


def test_fp8_values_admit_about_twice_the_batch() -> None:
    """The batch search counts quantised pages: with one host tier size, fp8 fits ~1.9x the
    sequences of bf16 (128 bytes per token and head -> 64 + a 4-byte scale; whole sequences
    per tier round either way)."""
    found = {}
    for value_dtype in ("auto", "fp8"):
        cfg = ShadowKVConfig(sparse_budget=32, outlier_chunks=2, value_dtype=value_dtype,
                             host_memory_gb=16 * 2**20 / 2**30)
        cache, _ = cache_for(tiny_d64(), cfg, 4096, 64, memory=2**28, dtype=torch.bfloat16)
        found[value_dtype] = max_batch(cache, 4000, 16, 64)
    assert found["auto"] >= 4 and 1.8 <= found["fp8"] / found["auto"] <= 2.2, found


def test_store_write_quantises_each_token_and_pads_with_zeros() -> None:
    Hkv, D, C, Pc = 3, 64, 8, 4
    lay = ValueLayout(1, Hkv, D, C, Pc, torch.bfloat16, quantized=True)
    tier = ValueTier(HOST, lay, 8 * lay.page_bytes, CPU, pin=False, fix="")
    tier.allocate()
    T = 45  # 6 chunks, the last one partial: 2 pages
    v = (torch.randn(T, Hkv, D) * torch.logspace(-3, 3, T)[:, None, None]).bfloat16()
    tier.write(0, [3, 4], v)
    codes = tier.layer(0)[3:5].reshape(-1, Hkv, C, D)  # [chunks, Hkv, C, D]
    scales = tier.scales(0)[3:5].reshape(-1, Hkv, C)
    back = codes.view(torch.float8_e4m3fn).float() * scales[..., None]
    back = back.transpose(1, 2).reshape(-1, Hkv, D)  # token order
    torch.testing.assert_close(back[:T], fp8_round_trip(v.float()), rtol=0, atol=0)
    assert (back[T:48] == 0).all(), "padding tokens of the last chunk read as zeros"


def test_unknown_value_dtype_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="auto, fp8"):
        ShadowKVConfig(value_dtype="int3")
    with pytest.raises(ConfigError, match="landmark_dtype"):
        ShadowKVConfig(landmark_dtype="fp4")


def test_passkey_at_2k_on_smollm2_fp8_answers_as_auto(smollm2_dir, pg_essays) -> None:
    """Budget 512 on a ~2K passkey prompt: fp8 values, and fp8 values + landmarks, give the
    passkey as the model-dtype store does (one recorded prefill replayed into each)."""
    from shadowkv import LLM, EngineConfig, SamplingParams

    llm = LLM(str(smollm2_dir), device="cpu", engine=EngineConfig(max_model_len=2560))
    prompt = llm.tokenizer.encode(passkey_prompt(read_essays(pg_essays), llm.tokenizer, 2048))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    recorded = None
    texts = {}
    for vd, ld in (("auto", "auto"), ("fp8", "auto"), ("fp8", "fp8")):
        cfg = ShadowKVConfig(sparse_budget=512, outlier_chunks=16, value_dtype=vd,
                             landmark_dtype=ld)
        llm.set_cache(cfg, EngineConfig(max_model_len=2560))
        eng = llm.engine
        req = eng.add_request(prompt, params, prompt_kv=recorded,
                              record_prompt_kv=recorded is None)
        with torch.inference_mode():
            while eng.has_unfinished():
                eng.step()
        recorded = recorded or req.prompt_kv
        texts[(vd, ld)] = llm.tokenizer.decode(list(req.output_ids))
    assert PASSKEY_ANSWER in texts[("auto", "auto")], texts
    for key, text in texts.items():
        assert PASSKEY_ANSWER in text, (key, text)


def test_fp8_ragged_batch_matches_each_sequence_alone(tiny_checkpoint) -> None:
    """fp8 values + landmarks, sparse budget: a batch of prompts of different lengths (one
    falls back to dense) decodes as each prompt alone, in eager and static steps."""
    from shadowkv import LLM, EngineConfig, SamplingParams

    path = tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16)
    cfg = ShadowKVConfig(sparse_budget=32, outlier_chunks=2, rank=0.5, value_dtype="fp8",
                         landmark_dtype="fp8")
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (173, 61, 250)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (14, 9, 12)]
    runs = {}
    for mode in ("eager", "static"):
        llm = LLM(str(path), cache=cfg, device="cpu",
                  engine=EngineConfig(max_num_seqs=3, max_model_len=MAX_LEN, decode_mode=mode))
        batched = [r.token_ids for r in llm.generate(prompts, params)]
        alone = [llm.generate(p, q)[0].token_ids for p, q in zip(prompts, params)]
        assert batched == alone, mode
        runs[mode] = batched
    assert runs["eager"] == runs["static"]
