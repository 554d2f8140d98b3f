"""``shadowkv serve``: the OpenAI-compatible HTTP server over one model and cache method."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from shadowkv.commands.common import add_model_args, llm_from_args
from shadowkv.config import ConfigError

API_KEY_ENV = "SHADOWKV_API_KEY"
DEFAULT_MAX_BODY_BYTES = 4 * 2**20  # = server.body.DEFAULT_MAX_BODY_BYTES (no fastapi import here)
DEFAULT_MAX_TOKENS = 1024  # = server.app.DEFAULT_MAX_TOKENS


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    s = p.add_argument_group("server")
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0: the network)",
    )
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer <key>' on /v1 routes (or set ${API_KEY_ENV})",
    )
    s.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients pass as 'model' (default: the --model value, or its folder name)",
    )
    s.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies get a 413 before they are parsed (default %(default)s)",
    )
    s.add_argument(
        "--default-max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="tokens generated at most by a request that sets no max_tokens (default "
        "%(default)s; never more than the context has room for)",
    )
    s.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    r = p.add_argument_group("replicas (Ray Serve: pip install 'shadowkv[replicas]')")
    r.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="engine replicas, each with its own model, cache and device, behind Ray Serve's "
        "HTTP proxy; requests that share a prompt prefix prefer the replica holding it "
        "(default 1: one server in this process, no Ray)",
    )
    r.add_argument(
        "--ray-address",
        default=None,
        help="run the replicas on this existing Ray cluster (e.g. 'auto' or 'ray://head:10001'; "
        "default: start a local one); implies Ray Serve even with --replicas 1",
    )


def served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        return "smollm2"
    path = Path(args.model)
    return path.name if path.exists() else str(args.model)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from shadowkv.server import create_app
    except ImportError as err:
        raise ConfigError(
            f"serving needs fastapi, uvicorn and prometheus-client ({err.name} is missing): "
            "pip install 'shadowkv[serve]'"
        ) from err
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    for flag, value in (("--max-request-bytes", args.max_request_bytes),
                        ("--default-max-tokens", args.default_max_tokens)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {args.replicas}")
    use_ray = args.replicas > 1 or args.ray_address is not None
    if use_ray and args.tensor_parallel > 1:
        raise ConfigError(
            "--replicas (Ray Serve) with --tensor-parallel is not supported yet: a replica is one "
            "engine process on one device; use one of the two"
        )
    if use_ray:
        from shadowkv.replicas import require_ray

        require_ray()  # before any model is loaded
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and api_key is None:
        print(
            f"shadowkv serve: warning: listening on {args.host} without an API key; anyone who can "
            "reach this port can use the model (set --api-key)",
            file=sys.stderr,
        )
    name = served_name(args)
    settings = {"api_key": api_key, "max_body_bytes": args.max_request_bytes,
                "default_max_tokens": args.default_max_tokens}
    if use_ray:
        return _run_replicas(args, name, settings)
    llm = llm_from_args(args)
    app = create_app(llm, name, **settings)
    print(
        f"shadowkv serve: {name!r} ({llm.cache_config.method} cache, "
        f"context {llm.max_model_len}) on "
        f"http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        llm.close()  # stops tensor-parallel workers
    return 0


def _run_replicas(args: argparse.Namespace, name: str, settings: dict[str, object]) -> int:
    from shadowkv.replicas import deploy

    gpu = _wants_gpu(args)
    # Ray sets a replica's OMP_NUM_THREADS to its num_cpus: a CPU replica of a local cluster
    # gets its share of this machine's cores (torch's threads), a GPU replica one core.
    cpus = 1 if gpu or args.ray_address else max(1, (os.cpu_count() or 1) // args.replicas)
    replica = deploy.ReplicaSettings(args.replicas, num_gpus=1.0 if gpu else 0.0, num_cpus=cpus)
    where = args.ray_address or "a local Ray cluster"
    print(f"shadowkv serve: starting {args.replicas} replica(s) of {name!r} on {where}",
          file=sys.stderr)
    deploy.start(args, name, settings, replica, args.host, args.port, args.ray_address)
    print(f"shadowkv serve: {name!r}, {args.replicas} replica(s), on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    if args.ray_address is None:
        print("shadowkv serve: replica logs under /tmp/ray/session_latest/logs/serve/",
              file=sys.stderr)
    deploy.run_until_stopped(stop_ray=args.ray_address is None)
    return 0


def _wants_gpu(args: argparse.Namespace) -> bool:
    """A GPU per replica: --device cuda, or no --device and CUDA here (on a cluster whose head
    has no GPU, pass --device cuda)."""
    if args.device is not None:
        return str(args.device).startswith("cuda")
    import torch

    return torch.cuda.is_available()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
