"""`osserve <command> ...`: one argparse entry point; each command lives in its own module.

To add a command, write a module with `add_parser(subparsers)` that registers a sub-parser and sets
`func=<callable taking the parsed args, returning an exit code>`, and list the module in COMMANDS.
`osserve.flags.add_engine_arguments` gives any command every EngineConfig option as a flag.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules with an `add_parser(subparsers)`, in the order `osserve --help` lists them.
COMMANDS = [
    "osserve.serve",
    "osserve.disagg.role_commands",
    "osserve.bench.commands",
    "osserve.model.make_checkpoint",
]


def build_parser() -> argparse.ArgumentParser:
    from osserve import __version__

    parser = argparse.ArgumentParser(
        prog="osserve", description="Serve OpenAI's gpt-oss models behind an OpenAI-compatible API."
    )
    parser.add_argument("--version", action="version", version=f"osserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        sys.exit(2)
    sys.exit(args.func(args) or 0)
