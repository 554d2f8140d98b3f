"""Cache methods: one frozen config dataclass per method, and the registry that builds them.

Every method's settings are a ``CacheConfig`` subclass whose ``method`` class variable names it:
``DenseConfig``, ``ShadowKVConfig``, and the baselines ``QuestConfig``, ``LokiConfig``,
``StreamingConfig``, ``OracleConfig`` (the sparse ones share ``SparseConfig``'s budget, chunk
size and local window, so comparisons at equal budget count tokens the same way). Each field
carries its CLI help (``config.knob``): the subcommands generate their flags from these fields.

The registry maps a method name to its config class and its cache class (imported when a cache is
built, so each method stays optional). ``method_names()`` is the one list of methods.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from shadowkv.config import ConfigError, knob, parse_budget
from shadowkv.kernels.fp8 import VALUE_DTYPES


@dataclass(frozen=True)
class CacheConfig:
    """Settings every method has. Use a method's subclass (``DenseConfig()`` for the default)."""

    method: ClassVar[str] = ""
    page_size: int = knob(16, "rows per paged block of exact K/V (Quest: tokens per page)")

    @property
    def label(self) -> str:
        """The method's name, plus ``:knob=value`` for each variant knob (one that changes how
        the method stores its state, e.g. ShadowKV's ``value_dtype``) off its default:
        ``shadowkv:value_dtype=fp8``. Evaluations and benchmarks name runs by it, so two
        variants of one method compare in one run; ``method_config_for`` reads it back."""
        parts = [self.method]
        for f in fields(self):
            if f.metadata.get("variant") and getattr(self, f.name) != f.default:
                parts.append(f"{f.name}={getattr(self, f.name)}")
        return ":".join(parts)

    def __post_init__(self) -> None:
        if not self.method:  # CacheConfig and SparseConfig are bases, not methods
            raise ConfigError(
                f"{type(self).__name__} is a base of the method configs; use one of them, e.g. "
                "DenseConfig() or ShadowKVConfig(sparse_budget=2048)"
            )
        if self.page_size < 1:
            raise ConfigError("page_size must be >= 1")


@dataclass(frozen=True)
class DenseConfig(CacheConfig):
    """Full attention over a paged KV cache: the baseline every sparse method is measured by."""

    method: ClassVar[str] = "dense"


@dataclass(frozen=True)
class SparseConfig(CacheConfig):
    """What every sparse method shares. Budgets are tokens when >= 1 and a fraction of the prompt
    when in (0, 1); the local window (``local_chunks`` chunks + the ``T mod C`` tail) is always
    attended and not charged to the budget."""

    sparse_budget: float = knob(
        2048, "tokens attended per decode step (or a fraction / percentage of the prompt)",
        parse=parse_budget,
    )
    chunk_size: int = knob(8, "tokens per selection chunk (C)")
    local_chunks: int = knob(4, "chunks at the end of the prompt always attended exactly")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 1:
            raise ConfigError("chunk_size must be >= 1")
        if self.sparse_budget <= 0:
            raise ConfigError("sparse_budget must be positive (tokens, or a fraction in (0, 1))")
        if self.sparse_budget >= 1 and int(self.sparse_budget) % self.chunk_size:
            raise ConfigError(
                f"sparse_budget={int(self.sparse_budget)} tokens is not a multiple of "
                f"chunk_size={self.chunk_size}; round it to a multiple"
            )
        if self.local_chunks < 0:
            raise ConfigError("local_chunks must be >= 0")

    def budget_tokens(self, prompt_len: int) -> int:
        """The sparse budget in tokens for a prompt, rounded down to whole chunks (>= 1 chunk)."""
        raw = self.sparse_budget * prompt_len if self.sparse_budget < 1 else self.sparse_budget
        return max(self.chunk_size, int(raw) // self.chunk_size * self.chunk_size)


@dataclass(frozen=True)
class ShadowKVConfig(SparseConfig):
    """ShadowKV: low-rank pre-RoPE keys and landmarks on the device, values in two tiers.

    ``rank`` is a column count when >= 1 and a fraction of ``Hkv * D`` when in (0, 1]; ``None``
    picks the default (160 for keys of 512+ columns as in the paper, otherwise the small-model
    default measured in ``benchmarks/RESULTS.md``).

    Each sequence's values live wholly in one of two tiers of the same paged layout: the host
    tier (pinned on CUDA) when it has room, else the device tier, carved out of the device cache
    budget (``EngineConfig.cache_memory_gb``). ``host_memory_gb=None`` sizes the host tier for
    ``max_num_seqs`` full-context sequences, capped by a share of free RAM.
    ``device_value_memory_gb=None`` is 0 on CPU; on CUDA, and on any device when
    ``offload_values=False`` turns the host tier off, it is the size that admits the most
    sequences of the reference length the device pools are split for (``max_model_len - 512``
    prompt tokens). ``overlap_fetch``: on CUDA the value fetch runs on its own stream,
    overlapping the key rebuild (the paper's critical path).

    ``value_dtype="fp8"`` stores the prompt's values (both tiers) as e4m3 codes with a float32
    scale per token and KV head: about half the bytes of bf16 in host memory and over PCIe, so
    about twice the sequences per host tier. ``landmark_dtype="fp8"`` does the same for the
    landmarks on the device (one scale per landmark). ``"auto"`` keeps the model's dtype.
    Generated tokens and the exact local/outlier chunks stay in the model's dtype.

    ``staging_tokens``: the device memory, within the cache budget, that a sparse prompt
    prefilled in chunks stages its pre-RoPE keys and values in until its last chunk
    (``shadow_staging.py``), in tokens of all staged prompts together; ``None`` is
    ``max_model_len`` (one full-context prompt can stage), ``0`` turns staging off (every
    sparse prompt then prefills whole).

    ``shared_suffix_tokens``: a prompt that starts from a shared prefix (prefix sharing of
    memory, ``engine/prefix.py``) keeps up to this many of its own tokens after the prefix exact
    in its buffer, like generated tokens; a longer suffix is factorised as a segment of its own
    (its own key basis, landmarks and outliers, competing with the prefix's landmarks for one
    budget), or prefills from scratch when it is too short to be sparse on its own.

    ``exact_prefix_keys``: when the engine keeps prefixes of this cache's pages (its prefix
    store on), a sparse prompt in the host value tier also stores its exact post-RoPE keys there
    (the candidate region's whole pages, the values' layout and dtype), held by the prefixes
    shared from it and read only by the suffix prefill of a prompt started from one: that
    prefill then attends to exact keys, as an unshared one does. Off: it attends to the prefix's
    keys rebuilt low-rank (less host memory, less accurate). Decode reads no key copy.
    """

    method: ClassVar[str] = "shadowkv"
    rank: float | None = knob(
        None, "low-rank key rank: columns, or a fraction of Hkv*D (default: 160 for keys of 512+ "
        "columns, else max(64, Hkv*D/4))", parse=parse_budget,
    )
    outlier_chunks: int = knob(48, "chunks per KV head kept exact because landmarks miss them")
    offload_values: bool = knob(True, "keep values in host memory (off: every value on device)")
    host_memory_gb: float | None = knob(None, "host memory for offloaded values (default: auto)")
    device_value_memory_gb: float | None = knob(
        None, "device memory, within the cache budget, for the values of sequences the host "
        "tier cannot hold (default: 0 on CPU, on CUDA what balances the host tier against the "
        "device budget)",
    )
    overlap_fetch: bool = knob(True, "CUDA: fetch values on a side stream during the key rebuild")
    value_dtype: str = knob(
        "auto", "stored prompt values: auto (the model dtype) or fp8 (e4m3 + a scale per token)",
        choices=VALUE_DTYPES, variant=True,
    )
    landmark_dtype: str = knob(
        "auto", "landmarks: auto (the model dtype) or fp8 (e4m3 + a scale per landmark)",
        choices=VALUE_DTYPES, variant=True,
    )
    staging_tokens: int | None = knob(
        None, "device memory, in prompt tokens within the cache budget, for staging the chunks "
        "of sparse prompts prefilled in chunks (default: max_model_len; 0: prefill them whole)",
    )
    share_prefix_memory: bool = knob(
        True, "prefix sharing holds a stored prompt's own pages (low-rank keys, landmarks, "
        "values) once, the suffix prefilled against its exact key copy (--exact-prefix-keys) or "
        "its rebuilt keys; off: each request stores its own copy, prefilled exactly from the "
        "store's host copy",
    )
    shared_suffix_tokens: int = knob(
        2048, "most prompt tokens after a shared prefix a request keeps exact while it shares "
        "the prefix's memory (longer: factorised as a low-rank segment of its own; 0: never "
        "share memory)",
    )
    exact_prefix_keys: bool = knob(
        True, "with prefix sharing, keep a stored prompt's exact keys in the host value tier "
        "for the suffix prefills started from it (off: they attend to its keys rebuilt low-rank, "
        "less host memory)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None and (self.rank <= 0 or (1 < self.rank != int(self.rank))):
            raise ConfigError("rank must be a positive integer or a fraction in (0, 1]")
        if self.outlier_chunks < 0:
            raise ConfigError("outlier_chunks must be >= 0")
        for name in ("value_dtype", "landmark_dtype"):
            if getattr(self, name) not in VALUE_DTYPES:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is not one of {', '.join(VALUE_DTYPES)}"
                )
        if self.staging_tokens is not None and self.staging_tokens < 0:
            raise ConfigError(
                f"staging_tokens={self.staging_tokens} must be >= 0 (0 turns chunked-prefill "
                "staging off; None sizes it for one max_model_len prompt)"
            )
        if self.shared_suffix_tokens < 0:
            raise ConfigError(
                f"shared_suffix_tokens={self.shared_suffix_tokens} must be >= 0 (0: a request "
                "never shares a prefix's memory)"
            )
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


@dataclass(frozen=True)
class QuestConfig(SparseConfig):
    """Quest: per-page key bounds choose ``sparse_budget // page_size`` pages per KV head."""

    method: ClassVar[str] = "quest"


@dataclass(frozen=True)
class LokiConfig(SparseConfig):
    """Loki: scores in a per-head principal subspace of the prompt's keys."""

    method: ClassVar[str] = "loki"
    loki_rank: float = knob(0.25, "Loki: fraction of the head dim kept for scoring")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.loki_rank <= 1:
            raise ConfigError("loki_rank must be a fraction in (0, 1]")


@dataclass(frozen=True)
class StreamingConfig(SparseConfig):
    """StreamingLLM: attention sinks plus the most recent tokens."""

    method: ClassVar[str] = "streaming"
    sink_tokens: int = knob(4, "StreamingLLM: first prompt tokens always attended (sinks)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink_tokens < 0:
            raise ConfigError("sink_tokens must be >= 0")


@dataclass(frozen=True)
class OracleConfig(SparseConfig):
    """Oracle top-k: exact attention scores choose the rows (an upper bound for any selector)."""

    method: ClassVar[str] = "oracle"


@dataclass(frozen=True)
class Method:
    """A registered cache method: its config class, and its cache class as ``module:Class``
    under ``shadowkv.cache`` (imported only when such a cache is built)."""

    name: str
    config: type[CacheConfig]
    impl: str
    summary: str

    def cache_class(self) -> type:
        module, cls = self.impl.split(":")
        return getattr(importlib.import_module(f"shadowkv.cache.{module}"), cls)


METHODS: dict[str, Method] = {}


def register(config: type[CacheConfig], impl: str, summary: str) -> None:
    """Register a method under ``config.method``."""
    if not config.method or config.method in METHODS:
        raise ValueError(f"method name {config.method!r} is empty or already registered")
    METHODS[config.method] = Method(config.method, config, impl, summary)


register(DenseConfig, "dense:DenseCache", "full attention (the baseline)")
register(ShadowKVConfig, "shadow:ShadowKVCache", "low-rank keys, offloaded values, sparse chunks")
register(QuestConfig, "quest:QuestCache", "baseline: query-aware page selection")
register(LokiConfig, "loki:LokiCache", "baseline: low-dimensional key scores")
register(StreamingConfig, "streaming:StreamingCache", "baseline: sinks + recent window")
register(OracleConfig, "oracle:OracleCache", "baseline: exact top-k (upper bound)")


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown cache method {name!r}; choose one of {', '.join(METHODS)}"
        ) from None


def method_config(method: str, **knobs: Any) -> CacheConfig:
    """``method``'s config from the knobs it has; knobs of other methods are ignored (a CLI or an
    evaluation hands every method the same set)."""
    cls = get_method(method).config
    own = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in knobs.items() if k in own})


def split_label(label: str) -> tuple[str, dict[str, str]]:
    """``"shadowkv:value_dtype=fp8"`` -> ``("shadowkv", {"value_dtype": "fp8"})``; only variant
    knobs may be named (the others are flags shared by every run)."""
    method, *parts = label.split(":")
    cls = get_method(method).config
    variants = {f.name: f for f in fields(cls) if f.metadata.get("variant")}
    knobs: dict[str, str] = {}
    for part in parts:
        name, sep, value = part.partition("=")
        if not sep or name not in variants:
            raise ConfigError(
                f"{label!r}: after the method name come variant knobs as :name=value; {method} "
                f"has {', '.join(variants) or 'none'}"
            )
        choices = variants[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{label!r}: {name} must be one of {', '.join(choices)}")
        knobs[name] = value
    return method, knobs


def method_config_for(label: str, **knobs: Any) -> CacheConfig:
    """The config a run label names (``split_label``), the label's knobs over ``knobs``."""
    method, own = split_label(label)
    return method_config(method, **{**knobs, **own})


def config_knobs(cfg: CacheConfig) -> dict[str, Any]:
    """A config's fields as keyword arguments (``method_config(m, **config_knobs(cfg))``)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
