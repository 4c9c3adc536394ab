"""What every ``tpcomm`` subcommand shares with the command around it: :class:`UsageError` and
:func:`execute`. A leaf module (it imports only settings and groups.launch's RankFailed), so that the subcommands' own modules
(``tpcomm.bench``, ``cli/check.py``, ``cli/plan.py``) never import the CLI's top (``cli/main.py``),
which finds them by name (``SUBCOMMANDS``)."""
from __future__ import annotations

import argparse
import os
import sys

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
    - a rank that failed (:class:`tpcomm.groups.launch.RankFailed`, from the ranks a benchmark
      started): one line, ``PROG: message``, exit code 1;
    - a closed stdout (``| head``): no traceback, exit code ``EXIT_BROKEN_PIPE``.
    """
    from ..groups.launch import RankFailed
    from ..settings import SettingsError, get_settings
    try:
        get_settings()
        code = args.func(args)
        sys.stdout.flush()   # inside the try: a pipe closed early fails here, not at exit
        return code
    except UsageError as e:
        args.parser.exit(2, f"{args.parser.prog}: error: {e}\n")
    except RankFailed as e:
        print(f"{args.parser.prog}: {e}", file=sys.stderr)
        return 1
    except SettingsError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # stdout to /dev/null, so that the interpreter's last flush at exit does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
