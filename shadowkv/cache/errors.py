"""Errors the caches raise for requests that cannot be served as asked."""

from __future__ import annotations

from shadowkv.config import ConfigError


class CacheCapacityError(RuntimeError):
    """A sequence cannot be admitted: the cache pools are too small for it."""


class CacheOptionsError(ConfigError):
    """A request's cache options do not apply to the engine's cache method."""
