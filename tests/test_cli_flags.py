"""The CLI's config flags are generated from the config dataclasses (``commands/flags.py``): every
field has a flag on every subcommand that uses it, defaults are the dataclasses', values round-trip.
Fast: parsers and configs only, no model is loaded."""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import pytest

from shadowkv.cache import methods as methods_mod
from shadowkv.cache.methods import (
    CacheConfig,
    DenseConfig,
    LokiConfig,
    Method,
    ShadowKVConfig,
    get_method,
    method_names,
)
from shadowkv.cli import build_parser
from shadowkv.cli import main as cli_main
from shadowkv.commands.common import cache_config_from_args, engine_config_from_args
from shadowkv.commands.flags import add_cache_flags, add_config_flags, flag_name
from shadowkv.config import ConfigError, EngineConfig, knob

COMMANDS = ("generate", "serve", "eval", "bench")
REQUIRED = {"generate": [], "serve": [], "eval": ["--out", "x.jsonl"], "bench": ["--arch", "tiny"]}
ALL_METHODS = ",".join(method_names())
# Engine fields a subcommand sets itself instead of offering a flag.
ENGINE_SKIPPED = {
    "generate": set(),
    "serve": set(),
    "eval": {"max_num_seqs"},  # --batch-size
    "bench": {"max_num_seqs", "max_model_len", "chunked_prefill", "max_num_batched_tokens"},
}
# A valid non-default value of every non-bool field: (command-line text, parsed value).
NON_DEFAULT: dict[str, tuple[str, Any]] = {
    "page_size": ("32", 32),
    "sparse_budget": ("1.5%", 0.015),
    "chunk_size": ("16", 16),
    "local_chunks": ("2", 2),
    "rank": ("0.5", 0.5),
    "outlier_chunks": ("7", 7),
    "host_memory_gb": ("1.5", 1.5),
    "device_value_memory_gb": ("0.25", 0.25),
    "loki_rank": ("0.5", 0.5),
    "sink_tokens": ("8", 8),
    "value_dtype": ("fp8", "fp8"),
    "landmark_dtype": ("fp8", "fp8"),
    "staging_tokens": ("4096", 4096),
    "shared_suffix_tokens": ("512", 512),
    "max_num_seqs": ("3", 3),
    "max_model_len": ("512", 512),
    "prefill_mlp_chunk": ("128", 128),
    "max_num_batched_tokens": ("512", 512),
    "admission_reserve": ("64", 64),
    "cache_memory_gb": ("0.5", 0.5),
    "dtype": ("float16", "float16"),
    "decode_mode": ("eager", "eager"),
    "prefix_cache_gb": ("0.5", 0.5),
    "tensor_parallel": ("2", 2),
}
# generate and serve turn prefix sharing on; eval and bench keep the library's default (off).
COMMAND_ENGINE = {"generate": {"prefix_cache": True}, "serve": {"prefix_cache": True}}


def method_configs() -> list[type[CacheConfig]]:
    return [get_method(m).config for m in method_names()]


def cache_field_names() -> set[str]:
    return {f.name for cls in method_configs() for f in fields(cls)}


def engine_field_names(command: str = "generate") -> set[str]:
    return {f.name for f in fields(EngineConfig)} - ENGINE_SKIPPED[command]


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def parse(command: str, *argv: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *REQUIRED[command], *argv])


def flag_argv(name: str, value: Any = None) -> list[str]:
    """The flags that set field ``name`` to a non-default value (bools: the other switch)."""
    if name in NON_DEFAULT:
        return [flag_name(name), NON_DEFAULT[name][0]]
    return [("--" if value else "--no-") + name.replace("_", "-")]


def non_default(cls: type, name: str) -> Any:
    default = next(f.default for f in fields(cls) if f.name == name)
    return (not default) if isinstance(default, bool) else NON_DEFAULT[name][1]


def caches_of(command: str, args: argparse.Namespace) -> dict[str, CacheConfig]:
    if command in ("generate", "serve"):
        return {m: cache_config_from_args(args, m) for m in method_names()}
    cfg = importlib.import_module(f"shadowkv.commands.{command}").config_from_args(args)
    return {c.method: c for c in cfg.caches}


def engine_of(command: str, args: argparse.Namespace) -> EngineConfig:
    if command in ("generate", "serve"):
        return engine_config_from_args(args)
    return importlib.import_module(f"shadowkv.commands.{command}").config_from_args(args).engine


def test_the_value_table_covers_every_field() -> None:
    bools = {
        f.name for cls in (*method_configs(), EngineConfig) for f in fields(cls)
        if isinstance(f.default, bool)
    }
    assert set(NON_DEFAULT) | bools == cache_field_names() | engine_field_names(), (
        "a config field was added: give it a value in NON_DEFAULT"
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_config_field_has_a_flag(command: str) -> None:
    options = subparser(command)._option_string_actions
    wanted = cache_field_names() | engine_field_names(command)
    missing = sorted(flag_name(n) for n in wanted if flag_name(n) not in options)
    assert not missing, f"{command} lacks {missing}"
    for name in wanted:
        action = options[flag_name(name)]
        assert action.dest == name and action.help, name
    chooser = "--methods" if command in ("eval", "bench") else "--cache"
    assert chooser in options
    for skipped in ENGINE_SKIPPED[command]:
        assert flag_name(skipped) not in options


def test_help_names_the_methods_that_use_a_field() -> None:
    options = subparser("generate")._option_string_actions
    assert "(shadowkv; default: 48)" in options["--outlier-chunks"].help
    assert "all but dense" in options["--sparse-budget"].help
    assert "(loki; default: 0.25)" in options["--loki-rank"].help
    assert "shadowkv" not in options["--page-size"].help  # every method has it
    assert "--no-offload-values" in options and "--no-overlap-fetch" in options
    assert options["--cache"].choices == method_names()
    subparser("bench").format_help()  # every help string formats ('%' escaped)


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults_are_the_dataclasses(command: str) -> None:
    args = parse(command, *(["--methods", ALL_METHODS] if command in ("eval", "bench") else []))
    caches = caches_of(command, args)
    assert caches == {m: get_method(m).config() for m in method_names()}
    assert caches["dense"] == DenseConfig() and caches["shadowkv"] == ShadowKVConfig()
    expected = EngineConfig(max_num_seqs=4) if command == "eval" else EngineConfig()
    assert engine_of(command, args) == replace(expected, **COMMAND_ENGINE.get(command, {}))


def test_plain_generate_is_dense_with_default_engine() -> None:
    args = parse("generate")
    assert cache_config_from_args(args) == DenseConfig()
    assert engine_config_from_args(args) == EngineConfig(prefix_cache=True)
    assert args.cache == "dense"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_cache_field_round_trips(command: str) -> None:
    for cls in method_configs():
        methods = ["--cache", cls.method] if command in ("generate", "serve") else [
            "--methods", cls.method
        ]
        for f in fields(cls):
            value = non_default(cls, f.name)
            args = parse(command, *methods, *flag_argv(f.name, value))
            got = caches_of(command, args)[cls.method]
            assert got == replace(cls(), **{f.name: value}), (cls.method, f.name)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_engine_field_round_trips(command: str) -> None:
    base = engine_of(command, parse(command))
    for name in engine_field_names(command):
        value = non_default(EngineConfig, name)
        got = engine_of(command, parse(command, *flag_argv(name, value)))
        assert got == replace(base, **{name: value}), name


def test_boolean_switches() -> None:
    args = parse("generate", "--cache", "shadowkv", "--no-offload-values", "--no-overlap-fetch")
    assert cache_config_from_args(args) == ShadowKVConfig(offload_values=False, overlap_fetch=False)
    args = parse("generate", "--cache", "shadowkv", "--offload-values")
    assert cache_config_from_args(args).offload_values is True
    args = parse("serve", "--cache", "shadowkv", "--no-offload-values", "--host-memory-gb", "1")
    with pytest.raises(ConfigError, match="drop one"):
        cache_config_from_args(args)


def test_a_knob_of_one_method_leaves_the_others_alone() -> None:
    argv = ["--rank", "0.5", "--no-offload-values", "--host-memory-gb", "1", "--loki-rank", "0.5",
            "--sink-tokens", "0", "--sparse-budget", "64"]
    args = parse("generate", *argv)  # an invalid ShadowKV config, but --cache is dense
    assert cache_config_from_args(args) == DenseConfig()
    assert cache_config_from_args(args, "loki") == LokiConfig(sparse_budget=64, loki_rank=0.5)
    bench = importlib.import_module("shadowkv.commands.bench")
    cfg = bench.config_from_args(parse("bench", "--methods", "dense,loki", *argv))
    assert cfg.caches == (DenseConfig(), LokiConfig(sparse_budget=64, loki_rank=0.5))


def test_old_spellings_still_parse() -> None:
    args = parse("generate", "--cache", "shadowkv", "--sparse-budget", "1024", "--rank", "96",
                 "--chunk-size", "16", "--outlier-chunks", "4", "--local-chunks", "1",
                 "--host-memory-gb", "2", "--device-value-memory-gb", "0.5", "--decode-mode",
                 "static", "--no-chunked-prefill", "--max-model-len", "1024",
                 "--max-num-seqs", "2", "--cache-memory-gb", "0.1", "--dtype", "float32")
    assert cache_config_from_args(args) == ShadowKVConfig(
        sparse_budget=1024, rank=96, chunk_size=16, outlier_chunks=4, local_chunks=1,
        host_memory_gb=2, device_value_memory_gb=0.5,
    )
    assert engine_config_from_args(args) == EngineConfig(
        decode_mode="static", chunked_prefill=False, max_model_len=1024, max_num_seqs=2,
        cache_memory_gb=0.1, dtype="float32", prefix_cache=True,
    )
    eval_cmd = importlib.import_module("shadowkv.commands.eval")
    cfg = eval_cmd.config_from_args(parse(
        "eval", "--methods", "quest,streaming,loki", "--page-size", "8", "--sink-tokens", "2",
        "--loki-rank", "0.5", "--budgets", "64,128", "--batch-size", "2", "--decode-mode", "eager",
    ))
    assert cfg.budgets == (64, 128) and cfg.methods == ("quest", "streaming", "loki")
    assert (cfg.caches[0].page_size, cfg.caches[1].sink_tokens, cfg.caches[2].loki_rank) == (
        8, 2, 0.5
    )
    assert (cfg.engine.max_num_seqs, cfg.engine.decode_mode) == (2, "eager")
    bench_cmd = importlib.import_module("shadowkv.commands.bench")
    cfg = bench_cmd.config_from_args(parse(
        "bench", "--hit-rates", "query,0.5", "--prefill", "synthetic", "--max-batch", "8",
        "--contexts", "96,128", "--batch", "2", "--decode-steps", "3",
    ))
    assert (cfg.hit_rates, cfg.prefill, cfg.max_batch) == ((None, 0.5), "synthetic", 8)
    assert (cfg.contexts, cfg.batches, cfg.decode_steps) == ((96, 128), (2,), 3)
    assert cfg.methods == ("dense", "shadowkv")


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("generate", ["--chunk-size", "eight"], "invalid int value: 'eight'"),
        ("generate", ["--sparse-budget", "lots"], "invalid budget value: 'lots'"),
        ("serve", ["--rank", "high"], "invalid budget (or 'none') value"),
        ("generate", ["--max-model-len", "long"], "invalid int (or 'none') value"),
        ("generate", ["--max-num-batched-tokens", "1.5"], "--max-num-batched-tokens: invalid"),
        ("serve", ["--cache-memory-gb", "lots"], "invalid float (or 'none') value"),
        ("generate", ["--dtype", "float8"], "invalid choice: 'float8'"),
        ("eval", ["--decode-mode", "fast"], "invalid choice: 'fast'"),
        ("serve", ["--cache", "magic"], "invalid choice: 'magic'"),
        ("bench", ["--methods", ","], "expected comma-separated method names"),
        ("bench", ["--loki-rank", "x"], "--loki-rank: invalid float value"),
    ],
)
def test_bad_values_exit_2_with_a_message(
    command: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(command, *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--arch", "tiny", "--methods", "dense,magic"],
         f"unknown cache method 'magic'; choose one of {', '.join(method_names())}"),
        (["eval", "--out", "x.jsonl", "--methods", "nope"], "unknown cache method 'nope'"),
        (["bench", "--arch", "tiny", "--chunk-size", "0"], "chunk_size must be >= 1"),
        (["eval", "--out", "x.jsonl", "--prefill-mlp-chunk", "0"], "prefill_mlp_chunk must be"),
    ],
)
def test_invalid_configs_exit_2_before_any_work(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err


@dataclass(frozen=True)
class Toy:
    count: int = knob(3, "how many")
    limit: int | None = knob(None, "upper bound")
    mode: str = knob("a", "which mode", choices=("a", "b"))
    on: bool = knob(False, "switch")
    plain: float = 1.5  # no knob: a generic help


def test_add_config_flags_on_any_dataclass() -> None:
    p = argparse.ArgumentParser()
    added = add_config_flags(p, Toy, skip=("plain",), defaults={"count": 5})
    assert added == ("count", "limit", "mode", "on")
    assert p.parse_args([]) == argparse.Namespace(count=5, limit=None, mode="a", on=False)
    args = p.parse_args(["--count", "1", "--limit", "none", "--mode", "b", "--on"])
    assert vars(args) == {"count": 1, "limit": None, "mode": "b", "on": True}
    assert p.parse_args(["--limit", "9"]).limit == 9
    assert "(default: 5)" in p._option_string_actions["--count"].help
    q = argparse.ArgumentParser()
    add_config_flags(q, Toy)
    assert q.parse_args(["--plain", "2"]).plain == 2.0


def test_a_field_without_a_parser_is_refused_when_flags_are_built() -> None:
    @dataclass(frozen=True)
    class Odd:
        sizes: tuple[int, ...] = ()

    with pytest.raises(TypeError, match="knob"):
        add_config_flags(argparse.ArgumentParser(), Odd)


@dataclass(frozen=True)
class WideConfig(CacheConfig):
    method: ClassVar[str] = "wide"
    page_size: int = knob(32, "rows per page")


def test_a_default_that_differs_between_methods_stays_each_methods_own(monkeypatch) -> None:
    monkeypatch.setitem(methods_mod.METHODS, "wide", Method("wide", WideConfig, "dense:X", "test"))
    p = argparse.ArgumentParser()
    add_cache_flags(p, multiple=True)
    args = p.parse_args([])
    assert cache_config_from_args(args, "wide").page_size == 32
    assert cache_config_from_args(args, "dense").page_size == 16
    args = p.parse_args(["--page-size", "8"])
    assert [cache_config_from_args(args, m).page_size for m in ("wide", "dense")] == [8, 8]
    assert "each method's own" in p._option_string_actions["--page-size"].help


# run labels: variants of one method in one eval or bench run --------------------------------
@pytest.mark.parametrize("command", ["eval", "bench"])
def test_method_variants_compare_in_one_run(command: str) -> None:
    variants = "shadowkv:value_dtype=fp8,shadowkv:value_dtype=fp8:landmark_dtype=fp8"
    args = parse(command, "--methods", f"dense,shadowkv,{variants}", "--value-dtype", "auto",
                 "--rank", "0.5")
    caches = list(caches_by_label(command, args).values())
    assert [c.label for c in caches] == [
        "dense", "shadowkv", "shadowkv:value_dtype=fp8",
        "shadowkv:value_dtype=fp8:landmark_dtype=fp8",
    ]
    assert [getattr(c, "value_dtype", None) for c in caches] == [None, "auto", "fp8", "fp8"]
    assert all(c.rank == 0.5 for c in caches[1:]), "the shared flags reach every variant"


def caches_by_label(command: str, args: argparse.Namespace) -> dict[str, CacheConfig]:
    cfg = importlib.import_module(f"shadowkv.commands.{command}").config_from_args(args)
    return {c.label: c for c in cfg.caches}


def test_variant_flag_sets_the_label_of_a_plain_method() -> None:
    args = parse("generate", "--cache", "shadowkv", "--value-dtype", "fp8")
    assert cache_config_from_args(args).label == "shadowkv:value_dtype=fp8"
    assert cache_config_from_args(parse("generate", "--cache", "shadowkv")).label == "shadowkv"


@pytest.mark.parametrize(
    "label,match",
    [
        ("shadowkv:rank=8", "variant knobs"),  # not a variant knob: use --rank
        ("shadowkv:value_dtype", "variant knobs"),
        ("shadowkv:value_dtype=int2", "one of auto, fp8"),
        ("dense:value_dtype=fp8", "dense has none"),
        ("shadowkvv:value_dtype=fp8", "unknown cache method"),
    ],
)
def test_bad_labels_are_refused_with_the_fix(label: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        methods_mod.method_config_for(label)


def test_each_label_once() -> None:
    args = parse("eval", "--methods", "shadowkv,shadowkv:value_dtype=auto")
    with pytest.raises(ConfigError, match="each method once"):
        caches_by_label("eval", args)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_prefix_cache_is_on_for_generate_and_serve(command: str) -> None:
    assert engine_of(command, parse(command)).prefix_cache is True
    assert engine_of(command, parse(command, "--no-prefix-cache")).prefix_cache is False
    assert EngineConfig().prefix_cache is False  # the library's default
