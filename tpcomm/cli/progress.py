"""A one-line progress bar on stderr (no dependency): ``[#####.....]  12/26  64K gloo``.

Drawn only when enabled and the stream is a terminal, so logs and pipes stay clean.
"""
from __future__ import annotations

import sys

WIDTH = 24


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled and self.stream.isatty()
        self._last_len = 0

    def show(self, label: str) -> None:
        """Draw the bar with ``label`` as the step now running."""
        if not self.enabled:
            return
        filled = WIDTH * self.done // self.total
        line = (f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done:>3}/{self.total} "
                f"{label}")
        self.stream.write("\r" + line.ljust(self._last_len))
        self.stream.flush()
        self._last_len = len(line)

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        """Erase the bar."""
        if self.enabled and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()
            self._last_len = 0
