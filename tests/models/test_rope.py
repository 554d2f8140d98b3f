"""RoPE frequencies and tables equal transformers' (``ROPE_INIT_FUNCTIONS``) for each kind we take.

The configs go the way a checkpoint's do: a transformers config, its ``to_dict()`` as config.json,
then ``ModelConfig.from_hf``; so parsing is under test as well as the formulas.
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_close_verbose

from shadowkv.config import ConfigError, ModelConfig, RopeConfig
from shadowkv.kernels.rope import apply_rope
from shadowkv.models.rope import ROPE_KINDS, inv_frequencies, rope_tables

HEAD_DIMS = [64, 96, 128]
CONTEXT = 4096  # the checkpoint's max_position_embeddings in these cases

KINDS = [
    pytest.param({"rope_type": "default"}, id="default"),
    pytest.param({"rope_type": "linear", "factor": 4.0}, id="linear-x4"),
    pytest.param(
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 1024},
        id="llama3-x8",
    ),
    pytest.param(
        {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0},
        id="llama3-x32-no-original",
    ),
    pytest.param(
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, id="yarn-x4"
    ),
    pytest.param({"rope_type": "yarn", "factor": 8.0}, id="yarn-x8-no-original"),
    pytest.param(
        {"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0, "beta_slow": 0.5,
         "original_max_position_embeddings": 1024, "truncate": False},
        id="yarn-betas-untruncated",
    ),
    pytest.param(
        {"rope_type": "yarn", "factor": 16.0, "mscale": 1.0, "mscale_all_dim": 0.707,
         "original_max_position_embeddings": 1024},
        id="yarn-mscale-pair",
    ),
    pytest.param(
        {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.5,
         "original_max_position_embeddings": 1024},
        id="yarn-attention-factor",
    ),
]


def hf_config(head_dim: int, rope_parameters: dict, theta: float = 500000.0):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        intermediate_size=64, num_hidden_layers=1, vocab_size=32, max_position_embeddings=CONTEXT,
        rope_parameters={"rope_theta": theta, **rope_parameters},
    )


def hf_inv_freq(config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"), seq_len=seq_len)


def ours(config) -> RopeConfig:
    return ModelConfig.from_hf(config.to_dict()).rope


# HF computes in fp32 (theta ** x loses ~|x ln theta| ulps); ours in fp64.
FREQ_RTOL = 5e-6


@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("rope_parameters", KINDS)
def test_inv_frequencies_match_transformers(rope_parameters: dict, head_dim: int) -> None:
    config = hf_config(head_dim, rope_parameters)
    expected, expected_factor = hf_inv_freq(config)
    rope = ours(config)
    assert rope.kind == rope_parameters["rope_type"]
    # The engine's table length (here 3x the context) must not move the scaling's reference.
    got, factor = inv_frequencies(rope, head_dim, 3 * CONTEXT)
    assert got.dtype == torch.float64 and got.shape == (head_dim // 2,)
    assert_close_verbose(got.float(), expected.float(), atol=0, rtol=FREQ_RTOL, what="inv_freq")
    assert factor == pytest.approx(expected_factor, rel=1e-12)


@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("length", [1000, CONTEXT, 3 * CONTEXT + 5], ids=lambda n: f"len{n}")
def test_dynamic_ntk_equals_transformers_at_the_table_length(head_dim: int, length: int) -> None:
    """We evaluate dynamic NTK once, at the engine's maximum length; transformers evaluates it at
    each forward's length. They agree when those lengths are equal, the comparable case."""
    config = hf_config(head_dim, {"rope_type": "dynamic", "factor": 2.0})
    expected, _ = hf_inv_freq(config, seq_len=length)
    got, factor = inv_frequencies(ours(config), head_dim, length)
    assert_close_verbose(got.float(), expected.float(), atol=0, rtol=FREQ_RTOL, what="inv_freq")
    assert factor == 1.0
    unscaled, _ = inv_frequencies(RopeConfig(theta=500000.0), head_dim, length)
    assert torch.equal(got, unscaled) == (length <= CONTEXT)


def test_legacy_rope_scaling_field_is_read() -> None:
    """transformers 4.x wrote ``rope_theta`` + ``rope_scaling: {"type": ...}``."""
    raw = hf_config(64, {"rope_type": "default"}).to_dict()
    raw.pop("rope_parameters")
    raw["rope_theta"] = 1e6
    raw["rope_scaling"] = {"type": "linear", "factor": 2.5}
    rope = ModelConfig.from_hf(raw).rope
    assert (rope.kind, rope.theta, rope.factor) == ("linear", 1e6, 2.5)
    expected = 1.0 / (1e6 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)) / 2.5
    assert torch.equal(inv_frequencies(rope, 64, 128)[0], expected)


def test_legacy_yarn_without_original_length_scales_from_the_checkpoint_context() -> None:
    """No ``original_max_position_embeddings``: transformers measures from the checkpoint's
    ``max_position_embeddings``, never from the serving length."""
    config = hf_config(64, {"rope_type": "yarn", "factor": 4.0})
    expected, expected_factor = hf_inv_freq(config)
    raw = config.to_dict()
    raw.pop("rope_parameters")
    raw["rope_theta"] = 500000.0
    raw["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    rope = ModelConfig.from_hf(raw).rope
    assert rope.original_max_position == CONTEXT
    for table_len in (CONTEXT // 4, CONTEXT, 4 * CONTEXT):
        got, factor = inv_frequencies(rope, 64, table_len)
        assert_close_verbose(got.float(), expected.float(), atol=0, rtol=FREQ_RTOL, what="inv_freq")
        assert factor == pytest.approx(expected_factor)


@pytest.mark.parametrize("rope_parameters", KINDS[:6])
def test_cos_sin_tables_match_transformers(rope_parameters: dict) -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = hf_config(64, rope_parameters)
    positions = torch.tensor([0, 1, 7, 100, 511, 2047])
    hf_rope = LlamaRotaryEmbedding(config)
    hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=torch.float32), positions[None])
    table = rope_tables(ours(config), 64, CONTEXT)
    cos, sin = table.rows(positions)  # [T, D/2]: one column per frequency
    assert torch.equal(hf_cos[0, :, :32], hf_cos[0, :, 32:]), "HF's halves repeat the frequencies"
    # HF multiplies position * inv_freq in fp32: the angle error grows like position * 6e-8.
    assert_close_verbose(cos, hf_cos[0, :, :32], atol=2e-4, rtol=0, what="cos")
    assert_close_verbose(sin, hf_sin[0, :, :32], atol=2e-4, rtol=0, what="sin")


def test_apply_matches_transformers_rotate_half_convention() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    table = rope_tables(RopeConfig(), 32, 64, dtype=torch.float64)
    positions = torch.tensor([3, 0, 63, 17, 17])
    q = torch.randn(5, 4, 32, dtype=torch.float64)  # [T, H, D]
    k = torch.randn(5, 2, 32, dtype=torch.float64)
    cos, sin = table.rows(positions)  # [T, D/2]
    # HF layout: [B, H, T, D] with cos/sin [B, T, D] (both halves alike) unsqueezed at dim 1.
    hf_cos, hf_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    hf_q, hf_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos[None], hf_sin[None]
    )
    got_q, got_k = apply_rope(q, k, cos, sin)
    assert_close_verbose(got_q, hf_q[0].transpose(0, 1), what="q")
    assert_close_verbose(got_k, hf_k[0].transpose(0, 1), what="k")
    # The rotation preserves norms and is relative: <R_m q, R_n k> depends on m - n only.
    assert_close_verbose(got_q.norm(dim=-1), q.norm(dim=-1))

    def rot(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        c, s = table.rows(p)
        return apply_rope(x, x, c, s)[0]

    m, n = torch.tensor([9]), torch.tensor([2])
    dot = (rot(q[:1], m) * rot(k[:1, :1], n)).sum(-1)
    shifted = (rot(q[:1], m + 40) * rot(k[:1, :1], n + 40)).sum(-1)
    assert_close_verbose(shifted, dot, atol=1e-12, rtol=1e-10, what="relative position")


@pytest.mark.parametrize("head_dim,factor", [(64, 0.5), (128, 0.25), (96, 0.5)])
def test_partial_rotary_frequencies_match_transformers(head_dim: int, factor: float) -> None:
    """Partial rotary: frequencies over the first ``int(D * factor)`` dims, as transformers
    computes them for the families that rotate part of each head (GLM's rotary embedding)."""
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    config = hf_config(head_dim, {"rope_type": "default", "partial_rotary_factor": factor})
    expected, _ = GlmRotaryEmbedding.compute_default_rope_parameters(config)
    rope = ours(config)
    dims = rope.rotary_dims(head_dim)
    assert dims == int(head_dim * factor) and expected.shape == (dims // 2,)
    got, _ = inv_frequencies(rope, dims, CONTEXT)
    assert_close_verbose(got.float(), expected.float(), atol=0, rtol=FREQ_RTOL, what="inv_freq")
    assert rope_tables(rope, head_dim, 16).cos.shape == (16, dims // 2)


def test_rope_kinds_are_a_registry() -> None:
    assert set(ROPE_KINDS) == {"default", "linear", "dynamic", "llama3", "yarn", "longrope"}


@pytest.mark.parametrize("engine_len", [1024, 4096], ids=["within-original", "past-original"])
@pytest.mark.parametrize("attention_factor", [None, 1.3])
def test_longrope_matches_transformers(engine_len: int, attention_factor: float | None) -> None:
    """Phi-3's LongRoPE as config.json gives it (original length at the top level): the short
    factors while the engine's table stays within the original context, the long ones past it,
    and the attention factor from the context ratio unless the checkpoint sets one."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = 64
    params = {
        "rope_type": "longrope", "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.05 * i for i in range(head_dim // 2)],
        "long_factor": [1.0 + 0.9 * i for i in range(head_dim // 2)],
    }
    if attention_factor is not None:
        params["attention_factor"] = attention_factor
    config = transformers.Phi3Config(
        hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_hidden_layers=1, vocab_size=32, pad_token_id=0,
        max_position_embeddings=4 * 1024, original_max_position_embeddings=1024,
        rope_parameters=params,
    )
    expected, factor = ROPE_INIT_FUNCTIONS["longrope"](config, torch.device("cpu"), engine_len)
    rope = ours(config)
    assert rope.kind == "longrope" and rope.original_max_position == 1024
    got, got_factor = inv_frequencies(rope, head_dim, engine_len)
    assert_close_verbose(got.float(), expected.float(), atol=0, rtol=FREQ_RTOL, what="inv_freq")
    assert got_factor == pytest.approx(factor, rel=1e-6)
    assert factor != 1.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        pytest.param({"kind": "mrope"}, "mrope", id="unsupported-kind"),
        pytest.param({"partial_rotary_factor": 1.5}, "partial_rotary_factor", id="partial-over-1"),
        pytest.param({"theta": 0.0}, "positive", id="zero-theta"),
    ],
)
def test_rope_config_rejects_what_we_cannot_compute(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        RopeConfig(**kwargs)
