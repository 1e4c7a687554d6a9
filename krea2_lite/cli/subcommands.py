"""`python -m krea2_lite SUBCOMMAND …`: the table of subcommands and the one place that runs them.

A subcommand is one module in this folder with
  NAME                  what the user types (`generate`)
  HELP                  one line for `python -m krea2_lite --help`
  add_arguments(parser) its flags, on the argparse sub-parser made for it
  run(args) -> int      its work; errors follow the contract in `error_contract.py`
and one entry in SUBCOMMANDS below. A command with a module of its own
(`python -m krea2_lite.quantize`) has a `main(argv)` in its module here and a three-line `__main__.py`.
"""

from __future__ import annotations

import argparse
import logging

from . import generate, inspect, serve
from .error_contract import run_cli

SUBCOMMANDS = (generate, inspect, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m krea2_lite", description="Krea 2 image generation")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_arguments(sub.add_parser(command.NAME, help=command.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    command = next(c for c in SUBCOMMANDS if c.NAME == args.command)
    return run_cli(lambda: command.run(args))  # one `error: …` line, exit 2 (error_contract.py)
