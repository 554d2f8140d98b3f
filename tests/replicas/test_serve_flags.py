"""``serve --replicas`` / ``--ray-address``: without Ray, a clear error before any model loads;
``--replicas 1`` alone is today's one server (no Ray)."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: "
                    "pip install 'shadowkv[serve]'")

from shadowkv.cli import main as cli_main  # noqa: E402
from shadowkv.commands import serve as serve_cmd  # noqa: E402


class Loaded(Exception):
    """Raised instead of loading a model: the one-server path was taken."""


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.serve", None)

    def load(args):
        raise Loaded

    monkeypatch.setattr(serve_cmd, "llm_from_args", load)


@pytest.mark.parametrize("argv", [["--replicas", "2"], ["--ray-address", "auto"]])
def test_ray_flags_without_ray_name_the_extra(no_ray, argv, capsys) -> None:
    assert cli_main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert "pip install 'shadowkv[replicas]'" in err and "Ray Serve" in err


def test_one_replica_is_the_one_server_without_ray(no_ray) -> None:
    with pytest.raises(Loaded):
        cli_main(["serve", "--replicas", "1"])


def test_replicas_must_be_positive(capsys) -> None:
    assert cli_main(["serve", "--replicas", "0"]) == 2
    assert "--replicas must be >= 1, got 0" in capsys.readouterr().err


def test_flags_parse_with_their_defaults() -> None:
    from tests.test_cli_flags import parse

    args = parse("serve")
    assert (args.replicas, args.ray_address) == (1, None)
    args = parse("serve", "--replicas", "3", "--ray-address", "ray://head:10001")
    assert (args.replicas, args.ray_address) == (3, "ray://head:10001")
