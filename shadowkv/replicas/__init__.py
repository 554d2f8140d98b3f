"""Engine replicas behind Ray Serve (``shadowkv serve --replicas N``), and their routing.

``routing`` (which replica serves a request), ``aggregate`` (``/health`` and ``/metrics`` over
the replicas) and ``forward`` (a request through the one-server app) need no Ray; ``deploy``
does, and ``require_ray`` says how to get it.
"""

from __future__ import annotations

from shadowkv.config import ConfigError

RAY_EXTRA = "pip install 'shadowkv[replicas]'"


def require_ray() -> None:
    """Raise a ``ConfigError`` naming the extra when Ray Serve is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"--replicas and --ray-address run the engine replicas on Ray Serve, which is not "
            f"installed ({err.name} is missing): {RAY_EXTRA}"
        ) from err
