"""shadowkv: high-throughput long-context inference with the ShadowKV method."""

from shadowkv.cache.base import CacheOptions
from shadowkv.cache.methods import (
    CacheConfig,
    DenseConfig,
    LokiConfig,
    OracleConfig,
    QuestConfig,
    ShadowKVConfig,
    StreamingConfig,
    method_config,
)
from shadowkv.config import EngineConfig
from shadowkv.engine.sampling import SamplingParams
from shadowkv.llm import LLM

__all__ = [
    "LLM",
    "SamplingParams",
    "CacheConfig",
    "CacheOptions",
    "DenseConfig",
    "EngineConfig",
    "LokiConfig",
    "OracleConfig",
    "QuestConfig",
    "ShadowKVConfig",
    "StreamingConfig",
    "method_config",
]
__version__ = "0.1.0"
