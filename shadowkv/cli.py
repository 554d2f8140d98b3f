"""``shadowkv generate | eval | bench | serve``: thin clients of the public API.

Each subcommand lives in ``shadowkv/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; errors the user can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "generate": "generate text for a prompt (argument, file or stdin)",
    "eval": "offline accuracy: RULER-style tasks and needle-in-a-haystack, method vs method",
    "bench": "throughput and memory: ShadowKV vs dense at each method's largest batch",
    "serve": "OpenAI-compatible HTTP server with continuous batching",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shadowkv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"shadowkv.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"shadowkv.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from shadowkv.errors import USER_ERRORS

    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as err:
        print(f"shadowkv {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shadowkv {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
