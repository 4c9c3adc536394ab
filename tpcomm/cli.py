"""The ``tpcomm`` command (also ``python -m tpcomm``): one argparse subcommand per module.

To add a subcommand, write a module with ``add_parser(subparsers)`` that adds its parser and sets
``func`` (``args -> exit code``) and ``parser`` (that parser) with ``set_defaults``, and list the
module in ``SUBCOMMANDS``. ``args.argv`` holds the arguments as given (for a results file's
command line). A subcommand reports bad arguments by raising :class:`UsageError`: the user gets
one line, ``tpcomm bench: error: ...``, and exit code 2, as for argparse's own errors (which
print the usage too).

Every command runs through :func:`execute` (the ``python -m`` entry points too): a bad
``TPCOMM_*`` variable is one line on stderr and exit code 2, before any rank starts; a reader
that closes the pipe (``tpcomm plan --measured | head``) ends the command quietly.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = ("tpcomm.bench.cli", "tpcomm.check", "tpcomm.plan_cli")


# exit code after the reader of stdout went away: what a shell reports for a process that
# SIGPIPE ended (128 + 13)
EXIT_BROKEN_PIPE = 141


class UsageError(ValueError):
    """Arguments that make no sense together (raised by a subcommand after parsing)."""


def execute(args: argparse.Namespace, prog: str = "tpcomm") -> int:
    """Run ``args.func(args)`` as a command and return its exit code.

    - a TPCOMM_* variable that cannot be used: one line naming it and the values accepted,
      exit code 2, read here first so that no rank is started only to fail;
    - :class:`UsageError`: one line, ``PROG: error: message``, exit code 2;
    - a closed stdout (``| head``): no traceback, exit code ``EXIT_BROKEN_PIPE``.
    """
    from .settings import SettingsError, get_settings
    try:
        get_settings()
        code = args.func(args)
        sys.stdout.flush()   # inside the try: a pipe closed early fails here, not at exit
        return code
    except UsageError as e:
        args.parser.exit(2, f"{args.parser.prog}: error: {e}\n")
    except SettingsError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # stdout to /dev/null, so that the interpreter's last flush at exit does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


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
    return execute(args)
