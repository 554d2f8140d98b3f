"""shadowkv: high-throughput long-context inference with the ShadowKV method."""

from shadowkv.cache.base import CacheOptions
from shadowkv.config import CacheConfig, EngineConfig
from shadowkv.engine.sampling import SamplingParams
from shadowkv.llm import LLM

__all__ = ["LLM", "SamplingParams", "CacheConfig", "CacheOptions", "EngineConfig"]
__version__ = "0.1.0"
