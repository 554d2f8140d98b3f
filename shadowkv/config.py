"""Frozen configuration dataclasses: model shape, attention-cache method, engine limits.

Every check that can refuse bad input lives in ``__post_init__`` so an invalid object never
exists; messages name the problem and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}

CACHE_METHODS = ("dense", "shadowkv", "quest", "loki", "streaming", "oracle")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters as the checkpoint asks for them.

    ``kind`` is one of default, linear, dynamic, llama3, yarn. ``factor`` and the llama3/yarn
    fields are ignored by ``default``.
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn mscale override
    mscale: float | None = None  # yarn: attention factor from a mscale pair (DeepSeek style)
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    partial_rotary_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("default", "linear", "dynamic", "llama3", "yarn"):
            raise ConfigError(
                f"unsupported rope scaling type {self.kind!r}; supported: default, linear, "
                "dynamic, llama3, yarn"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ConfigError("rope theta and scaling factor must be positive")
        if self.partial_rotary_factor != 1.0:
            raise ConfigError("partial rotary embeddings are not supported by our decoder")

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> RopeConfig:
        # transformers 5.x keeps theta and scaling in `rope_parameters`; 4.x used `rope_theta` +
        # `rope_scaling`. Accept both.
        params = dict(cfg.get("rope_parameters") or {})
        scaling = dict(cfg.get("rope_scaling") or {})
        merged = {**scaling, **params}
        theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        kind = str(merged.get("rope_type", merged.get("type", "default")) or "default")
        # The pre-training length scalings are relative to: the checkpoint's own context unless
        # the scaling names one (dynamic NTK always uses max_position_embeddings, as transformers
        # does). It must not default to the engine's length, which the user may change.
        checkpoint_len = cfg.get("max_position_embeddings")
        original = merged.get("original_max_position_embeddings") or checkpoint_len
        if kind == "dynamic":
            original = checkpoint_len or original
        factor = merged.get("factor")
        if factor is None and kind == "yarn" and original and checkpoint_len:
            factor = checkpoint_len / original
        return RopeConfig(
            theta=theta,
            kind=kind,
            factor=float(factor or 1.0),
            original_max_position=int(original) if original else None,
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            beta_fast=float(merged.get("beta_fast") or 32.0),
            beta_slow=float(merged.get("beta_slow") or 1.0),
            attention_factor=merged.get("attention_factor"),
            mscale=merged.get("mscale"),
            mscale_all_dim=merged.get("mscale_all_dim"),
            truncate=bool(merged.get("truncate", True)),
            partial_rotary_factor=float(
                merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
            ),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama, Qwen2, Mistral)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2; Llama when asked)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    output_bias: bool = False  # o_proj carries a bias (Llama with attention_bias)
    mlp_bias: bool = False  # gate/up/down projections carry a bias (Llama with mlp_bias)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES.values():
            raise ConfigError(self._unsupported(self.architecture))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G)."""
        return self.num_heads // self.num_kv_heads

    @property
    def kv_dim(self) -> int:
        """Columns of one token's keys over all KV heads (h_kv * d)."""
        return self.num_kv_heads * self.head_dim

    @staticmethod
    def _unsupported(arch: str) -> str:
        names = ", ".join(SUPPORTED_ARCHITECTURES)
        return f"unsupported architecture {arch!r}; shadowkv supports {names}"

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict."""
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and not archs and cfg.get("model_type") in SUPPORTED_ARCHITECTURES.values():
            arch = cfg["model_type"]  # configs written from GGUF metadata carry only model_type
        if arch is None:
            shown = archs[0] if archs else cfg.get("model_type", "<missing 'architectures'>")
            raise ConfigError(ModelConfig._unsupported(str(shown)))
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act={act!r} is not supported; shadowkv's decoder uses SiLU")
        window = cfg.get("sliding_window")
        if cfg.get("use_sliding_window", arch == "mistral") and window:
            # Full attention is what long-context serving wants; say so rather than silently differ.
            import warnings

            warnings.warn(
                f"checkpoint declares a sliding window of {window} tokens; shadowkv attends to the "
                "full context, so outputs past the window differ from windowed attention",
                stacklevel=2,
            )
        return ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope=RopeConfig.from_hf(cfg),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # transformers hard-codes the biases of Qwen2 (q/k/v only) and Mistral (none); only
            # Llama reads the flags, and its attention_bias covers o_proj too.
            attention_bias=arch == "qwen2" or (arch == "llama" and bool(cfg.get("attention_bias"))),
            output_bias=arch == "llama" and bool(cfg.get("attention_bias")),
            mlp_bias=arch == "llama" and bool(cfg.get("mlp_bias")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


@dataclass(frozen=True)
class CacheConfig:
    """Which attention-cache method to use and its knobs.

    Budgets are tokens when >= 1 and a fraction of the prompt when in (0, 1). ``rank`` is a
    column count when >= 1 and a fraction of h_kv * d when in (0, 1]; ``None`` picks the default
    (160 for 1024-column keys as in the paper, otherwise the small-model default measured in
    ``benchmarks/RESULTS.md``).

    ShadowKV keeps each sequence's values wholly in one of two tiers of the same paged layout:
    the host tier (pinned on CUDA) when it has room, else the device tier, which is carved out of
    the device cache budget (``EngineConfig.cache_memory_gb``). ``host_memory_gb=None`` sizes the
    host tier for ``max_num_seqs`` full-context sequences, capped by a share of free RAM.
    ``device_value_memory_gb=None`` is 0 on CPU. On CUDA, and on any device when
    ``offload_values=False`` turns the host tier off, it is the size that admits the most
    sequences of the reference length the device pools are split for (``max_model_len - 512``
    prompt tokens): host-tier sequences cost the device their factors and buffers, device-tier
    ones their values too, so the tier grows only when the host tier, not the device budget,
    limits the batch.
    """

    method: str = "dense"
    sparse_budget: float = 2048
    chunk_size: int = 8
    rank: float | None = None
    outlier_chunks: int = 48
    local_chunks: int = 4
    page_size: int = 16  # quest page / dense paging granularity
    sink_tokens: int = 4  # streaming baseline
    loki_rank: float = 0.25  # loki: fraction of d kept in the PCA scoring keys
    offload_values: bool = True  # shadowkv: False keeps every value in the device tier
    host_memory_gb: float | None = None  # shadowkv: host value tier size; None = auto
    device_value_memory_gb: float | None = None  # shadowkv: device value tier size; None = auto

    def __post_init__(self) -> None:
        if self.method not in CACHE_METHODS:
            raise ConfigError(f"unknown cache method {self.method!r}; choose one of {CACHE_METHODS}")
        if self.chunk_size < 1:
            raise ConfigError("chunk_size must be >= 1")
        if self.sparse_budget <= 0:
            raise ConfigError("sparse_budget must be positive (tokens, or a fraction in (0, 1))")
        if self.sparse_budget >= 1 and int(self.sparse_budget) % self.chunk_size:
            raise ConfigError(
                f"sparse_budget={int(self.sparse_budget)} tokens is not a multiple of "
                f"chunk_size={self.chunk_size}; round it to a multiple"
            )
        if self.rank is not None and (self.rank <= 0 or (1 < self.rank != int(self.rank))):
            raise ConfigError("rank must be a positive integer or a fraction in (0, 1]")
        if self.outlier_chunks < 0 or self.local_chunks < 0:
            raise ConfigError("outlier_chunks and local_chunks must be >= 0")
        if self.page_size < 1 or self.sink_tokens < 0:
            raise ConfigError("page_size must be >= 1 and sink_tokens >= 0")
        if not 0 < self.loki_rank <= 1:
            raise ConfigError("loki_rank must be a fraction in (0, 1]")
        self._check_value_tiers()

    def _check_value_tiers(self) -> None:
        for name in ("host_memory_gb", "device_value_memory_gb"):
            gb = getattr(self, name)
            if gb is not None and not gb >= 0:  # also refuses NaN
                raise ConfigError(
                    f"{name}={gb} must be >= 0 GiB (0 turns that value tier off; None sizes it "
                    "automatically)"
                )
        if not self.offload_values and self.host_memory_gb is not None:
            raise ConfigError(
                "host_memory_gb sizes the host value tier, which offload_values=False turns off; "
                "drop one of the two (device_value_memory_gb sizes the device tier)"
            )
        if not self.offload_values and self.device_value_memory_gb == 0:
            raise ConfigError(
                "offload_values=False keeps every value in the device tier, but "
                "device_value_memory_gb=0 gives it no memory; leave it None (auto) or set it > 0"
            )

    def budget_tokens(self, prompt_len: int) -> int:
        """The sparse budget in tokens for a prompt, rounded down to whole chunks (>= 1 chunk)."""
        raw = self.sparse_budget * prompt_len if self.sparse_budget < 1 else self.sparse_budget
        return max(self.chunk_size, int(raw) // self.chunk_size * self.chunk_size)

    def rank_for(self, kv_dim: int) -> int:
        """The low-rank key rank for keys of ``kv_dim`` columns."""
        if self.rank is None:
            # Paper: rank 160 for every model it ran (512- and 1024-column keys). Small models
            # (128-192 columns): at least 64, measured in benchmarks/RESULTS.md (rank study:
            # rank 16 lost every passkey, 32 fell behind full rank on Qwen2.5-0.5B, 64 matched).
            return min(kv_dim, 160 if kv_dim >= 512 else max(64, math.ceil(kv_dim / 4)))
        r = math.ceil(self.rank * kv_dim) if self.rank <= 1 else int(self.rank)
        if r > kv_dim:
            raise ConfigError(f"rank={r} exceeds the key width h_kv*d={kv_dim}")
        return r


DECODE_MODES = ("auto", "eager", "static", "graph")  # EngineConfig.decode_mode


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits. ``max_model_len=None`` means the checkpoint's context length."""

    max_num_seqs: int = 64
    max_model_len: int | None = None
    prefill_mlp_chunk: int = 4096  # tokens per MLP slice during prefill (bounds peak memory)
    # While sequences decode, a prompt longer than this prefills a slice of layers per step
    # (about this many tokens' worth of work), alternating with decode steps, so running
    # sequences are not stalled for a whole long prefill. None: whole prompts at once.
    prefill_slice_tokens: int | None = 8192
    cache_memory_gb: float | None = None  # device memory for the cache pool; None = auto
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # How decode steps run (engine/decode_runner.py): "auto" = CUDA graphs on CUDA for dense and
    # ShadowKV, eager otherwise; "eager"; "static" = the graphs' padded fixed-shape step run
    # without capture (any device); "graph" = capture (CUDA only).
    decode_mode: str = "auto"

    def __post_init__(self) -> None:
        if self.decode_mode not in DECODE_MODES:
            raise ConfigError(
                f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {self.decode_mode!r}"
            )
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")
        if self.prefill_mlp_chunk < 1:
            raise ConfigError("prefill_mlp_chunk must be >= 1")
        if self.prefill_slice_tokens is not None and self.prefill_slice_tokens < 1:
            raise ConfigError("prefill_slice_tokens must be >= 1 (or None to prefill whole prompts)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError("dtype must be auto, float32, bfloat16 or float16")
