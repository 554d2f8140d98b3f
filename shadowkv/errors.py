"""The exceptions that mean "bad input or resources, the message says how to fix it".

CLI and server turn these into a one-line message / a 4xx response instead of a traceback.
"""

from __future__ import annotations

from shadowkv.cache.base import CacheCapacityError
from shadowkv.config import ConfigError
from shadowkv.engine.engine import ContextLengthError, PromptError
from shadowkv.engine.sampling import SamplingError
from shadowkv.models.loader import ModelLoadError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    ModelLoadError,
    ContextLengthError,
    PromptError,
    SamplingError,
    CacheCapacityError,
    FileNotFoundError,
)

__all__ = [
    "USER_ERRORS",
    "CacheCapacityError",
    "ConfigError",
    "ContextLengthError",
    "ModelLoadError",
    "PromptError",
    "SamplingError",
]
