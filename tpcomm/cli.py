"""The ``tpcomm`` command (also ``python -m tpcomm``): one argparse subcommand per module.

To add a subcommand, write a module with ``add_parser(subparsers)`` that adds its parser and sets
``func`` (``args -> exit code``) and ``parser`` (that parser) with ``set_defaults``, and list the
module in ``SUBCOMMANDS``. ``args.argv`` holds the arguments as given (for a results file's
command line). A subcommand reports bad arguments by raising :class:`UsageError`: the user gets
the message under its usage line, and exit code 2, as for argparse's own errors.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("tpcomm.bench.cli", "tpcomm.check", "tpcomm.plan_cli")


class UsageError(ValueError):
    """Arguments that make no sense together (raised by a subcommand after parsing)."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="tpcomm", description="tpcomm: tensor-parallel communication for LLM inference")
    parser.add_argument("--version", action="version", version=f"tpcomm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except UsageError as e:
        args.parser.error(str(e))   # prints usage + message, exits 2
