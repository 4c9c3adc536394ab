"""The one output writer of the benchmarks (``tpcomm bench`` and its subcommands ``overlap``,
``model``, ``two-level``, ``host``): tables as text and markdown, and the files of --json,
--markdown and --plot.

Each benchmark keeps what is its own (which tables, which header lines, what a plot draws) and
hands the writer the finished pieces::

    check_outputs(args)                   # before any rank starts: every output file writable
                                          # (tpcomm.bench.args.check_outputs)
    ...                                   # the run
    write_outputs(args, text,             # stdout
                  doc=...,                # --json (json.dump, indent 1)
                  plot=lambda path: ...,  # --plot (drawn before the markdown that shows it)
                  markdown=lambda plot_name: ...)  # --markdown; plot_name: --plot relative to it
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable


def write_outputs(args, text: str, *, doc: dict | None = None,
                  markdown: Callable[[str | None], str] | None = None,
                  plot: Callable[[str], None] | None = None) -> None:
    """Print ``text``; write ``doc`` to --json, ``plot(path)`` to --plot and
    ``markdown(plot_name)`` to --markdown, for those of the flags that are given (``plot_name``:
    the --plot file relative to the markdown file's folder, None without --plot)."""
    sys.stdout.write(text)
    sys.stdout.flush()
    json_path = getattr(args, "json", None)
    if json_path and doc is not None:
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1, default=str)
            f.write("\n")
    plot_path = getattr(args, "plot", None) if plot is not None else None
    if plot_path:
        plot(plot_path)
    md_path = getattr(args, "markdown", None)
    if md_path and markdown is not None:
        plot_name = None
        if plot_path:
            plot_name = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(md_path)))
        with open(md_path, "w") as f:
            f.write(markdown(plot_name))


# ---------------------------------------------------------------- tables
def text_table(titles: list[str], units: list[str] | None, cells: list[list[str]]) -> str:
    """nccl-tests layout: right-aligned columns, header lines starting with '#'."""
    heads = [titles] + ([units] if units else [])
    widths = [max(len(r[i]) for r in heads + cells) + 2 for i in range(len(titles))]
    widths[0] = max(widths[0], 12)

    def line(parts, lead):
        return lead + "".join(p.rjust(w) for p, w in zip(parts, widths))[1:]
    return "\n".join([line(h, "#") for h in heads] + [line(c, " ") for c in cells])


def columns(head: list[str], body: list[list[str]], *, lead: tuple[str, str] = ("", ""),
            free_last: bool = False) -> list[str]:
    """Right-aligned columns two spaces apart: the head line, then a line per row of ``body``.
    ``lead``: what starts the head line and each row ("# ", "  " under a commented header);
    ``free_last``: the last column left as it is (a note, not padded)."""
    n = len(head) - 1 if free_last else len(head)
    widths = [max([len(head[i])] + [len(b[i]) for b in body]) for i in range(n)]

    def line(parts: list[str], start: str) -> str:
        text = "  ".join(p.rjust(w) for p, w in zip(parts[:n], widths))
        return start + text + ("  " + parts[-1] if free_last else "")
    return [line(head, lead[0])] + [line(b, lead[1]) for b in body]


def markdown_table(titles: list[str], cells: list[list[str]], left: int = 0,
                   free_last: bool = False) -> str:
    """Columns right-aligned except the first ``left`` ones (and the last, ``free_last``)."""
    align = ["---" if i < left else "---:" for i in range(len(titles))]
    if free_last:
        align[-1] = "---"
    rows = [titles, align] + cells
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)
