"""Frozen configuration dataclasses: model shape, attention-cache method, engine limits.

Every check that can refuse bad input lives in ``__post_init__`` so an invalid object never
exists; messages name the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shadowkv.kernels.rope.reference import ROPE_STYLES

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Phi3ForCausalLM": "phi3",
    "GlmForCausalLM": "glm",
    "Glm4ForCausalLM": "glm4",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
# config.json ``model_type`` -> family, for configs written from GGUF metadata (no architectures).
MODEL_TYPES = {**{f: f for f in SUPPORTED_ARCHITECTURES.values()}, "gemma3_text": "gemma3"}
LAYER_TYPES = ("full_attention", "sliding_attention")  # ModelConfig.layer_types entries
HIDDEN_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""


def knob(default: Any, help: str, *, parse: Callable[[str], Any] | None = None,
         choices: tuple[str, ...] | None = None, variant: bool = False) -> Any:
    """A config field that is also a command-line flag: ``--field-name``, this help, parsed by
    ``parse`` (default: from the field's type) and limited to ``choices``
    (``commands/flags.py`` generates the flags). A ``variant`` knob also names the run
    (``CacheConfig.label``): ``--methods shadowkv,shadowkv:value_dtype=fp8`` compares both."""
    return field(default=default, metadata={"help": help, "parse": parse, "choices": choices,
                                            "variant": variant})


def parse_budget(text: str) -> float:
    """A token count (``2048``), a fraction (``0.0156``) or a percentage (``1.5%``)."""
    text = text.strip()
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    return int(value) if value >= 1 and value == int(value) else value


def parse_optional_int(text: str) -> int | None:
    """An integer, or ``none`` for None."""
    return None if text.strip().lower() == "none" else int(text)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters as the checkpoint asks for them.

    ``kind`` names a frequency scaling registered in ``models/rope.py`` (default, linear,
    dynamic, llama3, yarn, longrope). ``factor`` and the llama3/yarn/longrope fields are ignored
    by ``default``. ``partial_rotary_factor`` < 1 rotates only the first dims of each head.
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
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors within the original
    long_factor: tuple[float, ...] = ()  # longrope: ... and past it

    def __post_init__(self) -> None:
        from shadowkv.models.rope import ROPE_KINDS  # the registry; imported late (it imports us)

        if self.kind not in ROPE_KINDS:
            raise ConfigError(
                f"unsupported rope scaling type {self.kind!r}; supported: {', '.join(ROPE_KINDS)}"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ConfigError("rope theta and scaling factor must be positive")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(
                f"partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]"
            )

    def rotary_dims(self, head_dim: int) -> int:
        """Dims of each head that are rotated (the first ones; the rest pass through), as
        transformers computes them: ``int(head_dim * partial_rotary_factor)``, made even."""
        return int(head_dim * self.partial_rotary_factor) // 2 * 2

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
        original = merged.get("original_max_position_embeddings")
        if kind == "longrope":  # Phi-3 keeps it at the top level of config.json
            original = original or cfg.get("original_max_position_embeddings")
        original = original or checkpoint_len
        if kind == "dynamic":
            original = checkpoint_len or original
        factor = merged.get("factor")
        if factor is None and kind in ("yarn", "longrope") and original and checkpoint_len:
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
            short_factor=tuple(float(f) for f in merged.get("short_factor") or ()),
            long_factor=tuple(float(f) for f in merged.get("long_factor") or ()),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder of the families shadowkv runs (``SUPPORTED_ARCHITECTURES``): the
    Llama layout plus what each family adds (``models/llama.py`` reads every field)."""

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
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2, GLM; Llama when asked)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    output_bias: bool = False  # o_proj carries a bias (Llama/Qwen3 with attention_bias)
    mlp_bias: bool = False  # gate/up/down projections carry a bias (Llama with mlp_bias)
    rope_style: str = "neox"  # how RoPE pairs dims (ROPE_STYLES); GLM: interleaved
    sliding_window: int | None = None  # what the checkpoint declares (the caches decide)
    # Per layer "full_attention" or "sliding_attention" (Gemma-3: 5 sliding, then 1 full);
    # empty: every layer alike (windowed when sliding_window is set, as Mistral's).
    layer_types: tuple[str, ...] = ()
    local_rope: RopeConfig | None = None  # RoPE of the sliding layers when theirs differs
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma-3)
    sandwich_norms: bool = False  # attention and MLP outputs normed too (GLM-4, Gemma-3)
    hidden_act: str = "silu"  # the MLP gate's activation: silu, or gelu_tanh (Gemma)
    embed_scale: float | None = None  # embeddings are multiplied by it (Gemma: sqrt(hidden))
    attn_scale: float | None = None  # softmax scale; None: 1/sqrt(head_dim)
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma)

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
        if self.rope_style not in ROPE_STYLES:
            raise ConfigError(f"rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError("sliding_window must be >= 1 tokens (or None: global attention)")
        if self.layer_types and (
            len(self.layer_types) != self.num_layers
            or any(t not in LAYER_TYPES for t in self.layer_types)
        ):
            raise ConfigError(
                f"layer_types must give one of {LAYER_TYPES} for each of the {self.num_layers} "
                f"layers, got {self.layer_types}"
            )
        if self.hidden_act not in set(HIDDEN_ACTS.values()):
            raise ConfigError(f"hidden_act must be silu or gelu_tanh, got {self.hidden_act!r}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G)."""
        return self.num_heads // self.num_kv_heads

    @property
    def kv_dim(self) -> int:
        """Columns of one token's keys over all KV heads (h_kv * d)."""
        return self.num_kv_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends within ``sliding_window`` (and rotates with ``local_rope``)."""
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[layer] == "sliding_attention"

    @staticmethod
    def _unsupported(arch: str) -> str:
        names = ", ".join(SUPPORTED_ARCHITECTURES)
        return f"unsupported architecture {arch!r}; shadowkv supports {names}"

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict."""
        archs = cfg.get("architectures") or []
        known = [SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES]
        arch = known[0] if known else None
        if arch is None and not archs and cfg.get("model_type") in MODEL_TYPES:
            arch = MODEL_TYPES[cfg["model_type"]]  # configs written from GGUF metadata
        if arch is None:
            shown = archs[0] if archs else cfg.get("model_type", "<missing 'architectures'>")
            raise ConfigError(ModelConfig._unsupported(str(shown)))
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        act = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")
        if act not in HIDDEN_ACTS:
            raise ConfigError(
                f"hidden_act={act!r} is not supported; shadowkv's decoder uses SiLU (or Gemma's "
                "tanh GELU)"
            )
        if cfg.get("attn_logit_softcapping") is not None:
            raise ConfigError(
                "attn_logit_softcapping is not supported (shadowkv's attention kernels do not "
                "soft-cap scores); no Gemma-3 checkpoint sets it"
            )
        window = cfg.get("sliding_window")
        if not cfg.get("use_sliding_window", arch in ("mistral", "phi3", "gemma3")):
            window = None
        layer_types = tuple(cfg.get("layer_types") or ())
        if arch == "gemma3" and not layer_types:  # transformers 4.x configs: a pattern
            pattern = int(cfg.get("sliding_window_pattern", 6))
            layer_types = tuple(
                LAYER_TYPES[bool((i + 1) % pattern)] for i in range(int(cfg["num_hidden_layers"]))
            )
        rope, local_rope = RopeConfig.from_hf(cfg), None
        params = cfg.get("rope_parameters") or {}
        if "full_attention" in params:  # RoPE per layer type (Gemma-3 under transformers 5)
            rope = RopeConfig.from_hf({**cfg, "rope_parameters": params["full_attention"]})
            local = params.get("sliding_attention")
            local_rope = RopeConfig.from_hf({**cfg, "rope_parameters": local}) if local else None
        elif "rope_local_base_freq" in cfg:  # Gemma-3 under transformers 4.x
            local_rope = RopeConfig(theta=float(cfg["rope_local_base_freq"]))
        bias = bool(cfg.get("attention_bias"))
        gemma = arch == "gemma3"
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
            rope=rope,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            # transformers hard-codes the biases of Qwen2 (q/k/v only) and Mistral and Phi-3
            # (none); GLM's flag covers q/k/v, Llama's, Qwen3's and Gemma-3's o_proj too.
            attention_bias=arch == "qwen2" or (arch in _FLAG_BIAS and bias),
            output_bias=arch in ("llama", "qwen3", "gemma3") and bias,
            mlp_bias=arch == "llama" and bool(cfg.get("mlp_bias")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            rope_style="interleaved" if arch in ("glm", "glm4") else "neox",
            sliding_window=int(window) if window else None,
            layer_types=layer_types if window else (),
            local_rope=local_rope if window else None,
            qk_norm=arch in ("qwen3", "gemma3"),
            sandwich_norms=arch in ("glm4", "gemma3"),
            hidden_act=HIDDEN_ACTS[act],
            embed_scale=hidden**0.5 if gemma else None,
            attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
            final_logit_softcap=cfg.get("final_logit_softcapping") if gemma else None,
        )


# Families whose attention_bias flag adds q/k/v biases.
_FLAG_BIAS = ("llama", "glm", "glm4", "qwen3", "gemma3")


DECODE_MODES = ("auto", "eager", "static", "graph")  # EngineConfig.decode_mode
DTYPES = ("auto", "float32", "bfloat16", "float16")  # EngineConfig.dtype


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits. ``max_model_len=None`` means the checkpoint's context length."""

    max_num_seqs: int = knob(64, "sequences decoded together at most (the largest batch)")
    max_model_len: int | None = knob(None, "context limit in tokens (default: the model's)")
    prefill_mlp_chunk: int = knob(4096, "tokens per MLP slice during prefill (bounds peak memory)")
    # Tokens one step may work on: a decode row per running request plus the prompt tokens of the
    # prefill chunks it packs (first come, first served; engine/prefill.py has the policy).
    # Bounds a step's time while letting many short prompts in at once.
    max_num_batched_tokens: int = knob(
        8192, "tokens per engine step: one per running request plus the prompt tokens prefilled "
        "in it (a longer prompt prefills in chunks over several steps)",
    )
    # Off: every prompt prefills whole in one step (the first of a step whatever its size), so a
    # long prompt stalls the running sequences for its whole prefill.
    chunked_prefill: bool = knob(
        True, "prefill prompts longer than a step's token budget in chunks of tokens, one chunk "
        "per step while the others decode",
    )
    # Optimistic admission: None reserves every request's worst case (prompt + max_tokens) at
    # admission, so a running request never runs out of cache. N admits it with room for
    # min(max_tokens, N) new tokens and grows that by N more whenever a decode step would pass
    # it; when the cache cannot grow, the newest running request is preempted (freed, requeued
    # first, resumed later with exactly the tokens an uninterrupted run gives).
    admission_reserve: int | None = knob(
        None, "admit a request with cache room for this many new tokens (not all of max_tokens) "
        "and grow it by as many when it needs more, preempting the newest request when memory "
        "runs out (default: reserve max_tokens at admission, never preempt)",
    )
    # Off: a step with both runs the decode rows in their own forward (the decode runner: CUDA
    # graphs on a GPU) and then the prefill chunks in a second one.
    mixed_step: bool = knob(
        True, "run a step's decode rows and prefill chunks in one forward (steps with only "
        "decodes keep the decode runner's CUDA graphs)",
    )
    cache_memory_gb: float | None = knob(
        None, "device memory for the KV cache, per rank (per GPU) with --tensor-parallel "
        "(default: 85% of free GPU memory, 4 GiB on CPU)"
    )
    dtype: str = knob(
        "auto", "weights and activations (auto: bfloat16 on CUDA, float32 on CPU)",
        choices=DTYPES,
    )
    # How decode steps run (engine/decode_runner.py): "auto" = CUDA graphs on CUDA for dense and
    # ShadowKV, eager otherwise; "eager"; "static" = the graphs' padded fixed-shape step run
    # without capture (any device); "graph" = capture (CUDA only).
    decode_mode: str = knob(
        "auto", "auto: decode steps as CUDA graphs on CUDA (dense, shadowkv), eager otherwise; "
        "static: the graphs' padded step without capture; graph: capture (CUDA only)",
        choices=DECODE_MODES,
    )

    # Prefix sharing (engine/prefix.py): a prompt that starts with a stored prompt's tokens
    # prefills only the rest. Off in the library; ``shadowkv generate`` / ``serve`` turn it on.
    prefix_cache: bool = knob(
        False, "reuse the prefill of stored prompts that a new prompt starts with (16-token "
        "blocks; a document asked about again, the next turn of a conversation)"
    )
    prefix_cache_gb: float | None = knob(
        None, "host memory for stored prompt prefixes (default: a quarter of the cache memory)"
    )

    # Tensor parallelism (distributed/engine.py): N processes, one rank each (rank 0 the
    # frontend), each running the same engine step on its shard of the heads and MLP columns and
    # its own cache of its KV heads. N must divide the query heads, KV heads and MLP width.
    tensor_parallel: int = knob(
        1, "tensor-parallel ranks: one process per rank (one GPU each on CUDA), each holding "
        "1/N of the heads, MLP columns and KV cache"
    )

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1:
            raise ConfigError(f"tensor_parallel must be >= 1 ranks, got {self.tensor_parallel}")
        if self.prefix_cache_gb is not None and self.prefix_cache_gb < 0:
            raise ConfigError(f"prefix_cache_gb must be >= 0, got {self.prefix_cache_gb}")
        if self.decode_mode not in DECODE_MODES:
            raise ConfigError(
                f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {self.decode_mode!r}"
            )
        if self.admission_reserve is not None and self.admission_reserve < 1:
            raise ConfigError(
                f"admission_reserve must be >= 1 new tokens (or None to reserve max_tokens), got "
                f"{self.admission_reserve}"
            )
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")
        if self.prefill_mlp_chunk < 1:
            raise ConfigError("prefill_mlp_chunk must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError("dtype must be auto, float32, bfloat16 or float16")
