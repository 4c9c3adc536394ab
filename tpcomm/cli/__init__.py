"""The ``tpcomm`` command: ``main`` (the parser of every subcommand), ``check``, ``plan``; the
subcommands' protocol is in ``command.py``."""
from .command import EXIT_BROKEN_PIPE, UsageError, execute
from .main import build_parser, main

__all__ = ["EXIT_BROKEN_PIPE", "UsageError", "build_parser", "execute", "main"]
