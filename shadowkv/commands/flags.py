"""Command-line flags generated from the config dataclasses, so the CLI and the library never
disagree: every field becomes ``--field-name`` with the field's help (``config.knob``), default,
parser and choices.

``add_cache_flags`` offers the fields of every cache method's config (each flag once) plus
``--cache METHOD`` or ``--methods a,b``; ``add_engine_flags`` offers ``EngineConfig``'s. The
``*_config_from_args`` functions turn the parsed flags back into configs.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, Field, fields
from typing import Any, TypeVar

from shadowkv.cache.methods import (
    CacheConfig,
    get_method,
    method_config_for,
    method_names,
)
from shadowkv.config import EngineConfig

Group = argparse.ArgumentParser | argparse._ArgumentGroup
C = TypeVar("C")

DEFAULT_METHOD = "dense"  # --cache
DEFAULT_METHODS = ("dense", "shadowkv")  # --methods


def flag_name(field_name: str) -> str:
    """``sparse_budget`` -> ``--sparse-budget``."""
    return "--" + field_name.replace("_", "-")


def add_config_flags(
    group: Group,
    cls: type,
    *,
    skip: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> tuple[str, ...]:
    """One ``--field-name`` flag per field of the dataclass ``cls`` (but ``skip``); ``defaults``
    overrides the dataclass's defaults. Returns the field names given flags."""
    hints = typing.get_type_hints(cls)
    skipped, overrides = set(skip), dict(defaults or {})
    added = []
    for f in fields(cls):
        if f.name in skipped:
            continue
        default = overrides[f.name] if f.name in overrides else _field_default(f)
        _add_flag(group, f, hints[f.name], default)
        added.append(f.name)
    return tuple(added)


def config_from_flags(cls: Callable[..., C], args: argparse.Namespace, **overrides: Any) -> C:
    """``cls`` from the flags ``add_config_flags`` gave it (fields without a flag keep their
    defaults), with ``overrides`` on top."""
    knobs = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**knobs, **overrides})


# --- cache methods ----------------------------------------------------------------------------


def cache_fields(methods: Sequence[str] | None = None) -> dict[str, tuple[Field, Any, list[str]]]:
    """Each field of the methods' configs, once, in declaration order: the field, its type and
    the methods whose config has it."""
    out: dict[str, tuple[Field, Any, list[str]]] = {}
    for name in methods or method_names():
        cls = get_method(name).config
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            out.setdefault(f.name, (f, hints[f.name], []))[2].append(name)
    return out


def add_cache_flags(
    group: Group,
    methods: Sequence[str] | None = None,
    *,
    multiple: bool = False,
    default: str | Sequence[str] | None = None,
) -> tuple[str, ...]:
    """The fields of the ``methods``' configs (default: every registered method) as flags, and
    ``--cache METHOD`` (one method) or, with ``multiple``, ``--methods a,b,...``. A field some
    methods lack says which use it; one whose default differs between methods keeps each
    method's own unless given. Returns the knob names given flags."""
    offered = tuple(methods or method_names())
    for name in offered:
        get_method(name)  # refuses unknown names
    summary = "; ".join(f"{m}: {get_method(m).summary}" for m in offered)
    if multiple:
        chosen = tuple(default or DEFAULT_METHODS)
        text = (
            f"cache methods, comma-separated: {summary} (default: {','.join(chosen)}); a "
            "variant knob may follow a name, e.g. shadowkv:value_dtype=fp8"
        )
        group.add_argument("--methods", type=method_list, default=chosen, help=_escape(text))
    else:
        chosen_one = str(default or DEFAULT_METHOD)
        group.add_argument(
            "--cache", default=chosen_one, choices=offered, metavar="METHOD",
            help=_escape(f"attention-cache method: {summary} (default: {chosen_one})"),
        )
    added = []
    for name, (f, hint, users) in cache_fields(offered).items():
        own = [_field_default(get_method(m).config.__dataclass_fields__[name]) for m in users]
        same = all(d == own[0] for d in own)
        default_value: Any = own[0] if same else argparse.SUPPRESS
        note = _users_note(users, offered)
        if default_value is argparse.SUPPRESS:
            note += ("; " if note else "") + "default: each method's own"
        _add_flag(group, f, hint, default_value, note=note)
        added.append(name)
    return tuple(added)


def method_list(text: str) -> tuple[str, ...]:
    """``dense,shadowkv`` -> ``("dense", "shadowkv")`` (names are checked when configs are
    built, so an unknown one is a ``ConfigError`` naming the choices)."""
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated method names")
    return names


def cache_config_from_args(
    args: argparse.Namespace, method: str | None = None, **overrides: Any
) -> CacheConfig:
    """``method``'s config (default: ``--cache``) from the cache flags it has (``get_method``
    refuses an unknown method with a ``ConfigError``), with ``overrides`` on top. ``method`` may
    be a run label with variant knobs (``shadowkv:value_dtype=fp8``), which win over the
    flags."""
    knobs = {name: getattr(args, name) for name in cache_fields() if hasattr(args, name)}
    return method_config_for(method or args.cache, **{**knobs, **overrides})


# --- engine -----------------------------------------------------------------------------------


def add_engine_flags(
    group: Group, *, skip: Iterable[str] = (), defaults: Mapping[str, Any] | None = None
) -> tuple[str, ...]:
    """``EngineConfig``'s fields as flags; ``skip`` the ones the subcommand sets itself."""
    return add_config_flags(group, EngineConfig, skip=skip, defaults=defaults)


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The ``EngineConfig`` of the engine flags (skipped fields: defaults), ``overrides`` on top."""
    return config_from_flags(EngineConfig, args, **overrides)


# --- one flag ---------------------------------------------------------------------------------


def _add_flag(group: Group, f: Field, hint: Any, default: Any, note: str = "") -> None:
    meta = f.metadata
    text = str(meta.get("help") or f.name.replace("_", " "))
    extra = [note] if note else []
    if "default:" not in text and default is not argparse.SUPPRESS:
        extra.append(f"default: {_show(default)}")
    if extra:
        text += f" ({'; '.join(extra)})"
    text = _escape(text)
    flag, parse = flag_name(f.name), meta.get("parse")
    required = default is MISSING
    kwargs: dict[str, Any] = {"dest": f.name, "help": text, "required": required}
    if not required:
        kwargs["default"] = default
    if hint is bool and parse is None:
        action = group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        action.help = text  # Python 3.10 appends its own "(default: ...)"
        return
    kwargs.update(type=_parser(f.name, hint, parse), choices=meta.get("choices"))
    group.add_argument(flag, **kwargs)


def _parser(name: str, hint: Any, parse: Callable[[str], Any] | None) -> Callable[[str], Any]:
    """``parse``, else one from the type (``int``, ``float``, ``str``); for ``X | None``,
    ``none`` also parses, to None."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), None) if optional else hint
    if parse is None:
        if base not in (int, float, str):
            raise TypeError(
                f"no command-line parser for field {name!r} of type {hint!r}; "
                "declare it with knob(..., parse=...)"
            )
        parse = base
    given: Callable[[str], Any] = parse
    name_of = getattr(given, "__name__", "value")  # parse_optional_int -> "int (or 'none')"
    label = name_of.removeprefix("parse_").removeprefix("optional_")
    if optional:
        return _named(lambda text: None if text.strip().lower() == "none" else given(text),
                      f"{label} (or 'none')")
    return given if label == name_of else _named(given, label)


def _named(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """``fn`` under ``name`` (argparse says "invalid <name> value: 'x'")."""
    def parse(text: str) -> Any:
        return fn(text)

    parse.__name__ = name
    return parse


def _field_default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _users_note(users: Sequence[str], offered: Sequence[str]) -> str:
    if len(users) == len(offered):
        return ""
    missing = [m for m in offered if m not in users]
    if len(users) > 2 and len(missing) < len(users):
        return f"all but {', '.join(missing)}"
    return ", ".join(users)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _escape(text: str) -> str:
    return text.replace("%", "%%")
