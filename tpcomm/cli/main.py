"""The ``tpcomm`` command (also ``python -m tpcomm``): one argparse subcommand per module.

To add a subcommand, write a module with ``add_parser(subparsers)`` that adds its parser and sets
``func`` (``args -> exit code``) and ``parser`` (that parser) with ``set_defaults``, and list the
module in ``SUBCOMMANDS``. ``args.argv`` holds the arguments as given (for a results file's
command line). A subcommand reports bad arguments by raising :class:`UsageError`
(``tpcomm.cli.command``): the user gets one line, ``tpcomm bench: error: ...``, and exit code 2,
as for argparse's own errors (which print the usage too).

Every command runs through :func:`execute` (the ``python -m`` entry points too): a bad
``TPCOMM_*`` variable is one line on stderr and exit code 2, before any rank starts; a reader
that closes the pipe (``tpcomm plan --measured | head``) ends the command quietly.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .command import EXIT_BROKEN_PIPE, UsageError, execute  # noqa: F401  (the subcommands' protocol)

SUBCOMMANDS = ("tpcomm.bench.cli", "tpcomm.cli.check", "tpcomm.cli.plan")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
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
    return execute(args)
