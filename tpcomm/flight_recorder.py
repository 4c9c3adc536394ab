"""Flight recorder: the last N calls of each Communicator, for tracing a hang to its rank.

Each call is one record: call number, op, algorithm, bytes, dtype, state (running / done /
failed), start and end times. ``comm.dump()`` renders them; they are also written to the
``tpcomm`` logger when a call fails, and to stderr for every live Communicator of the process on
SIGUSR1 (``kill -USR1 <pid>`` on a rank that seems stuck shows what it is waiting on).
"""
from __future__ import annotations

import signal
import sys
import threading
import time
import weakref
from time import perf_counter

RUNNING, DONE, FAILED = "running", "done", "failed"
_live: "weakref.WeakSet" = weakref.WeakSet()
_signal_installed = False


class FlightRecorder:
    """A ring buffer of call records; O(1) per call, nothing allocated after warm-up but the
    record list itself.

    Times are ``time.perf_counter()`` readings (one clock read at each end of a call, which the
    Communicator also uses for its stats: ``rec[6]`` start, ``rec[7]`` end); :meth:`records`
    turns them into wall-clock seconds."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._ring: list[list | None] = [None] * capacity
        self._n = 0
        self._wall_offset = time.time() - time.perf_counter()

    def start(self, op: str, algorithm: str, nbytes: int, dtype) -> list:
        n = self._n
        rec = [n, op, algorithm, nbytes, dtype, RUNNING, perf_counter(), None, ""]
        self._ring[n % self.capacity] = rec
        self._n = n + 1
        return rec

    @staticmethod
    def finish(rec: list, error: BaseException | None = None) -> None:
        rec[7] = perf_counter()
        if error is None:
            rec[5] = DONE
        else:
            rec[5] = FAILED
            rec[8] = f"{type(error).__name__}: {error}"

    def records(self) -> list[dict]:
        """Oldest first."""
        n, cap, off = self._n, self.capacity, self._wall_offset
        out = []
        for i in range(max(0, n - cap), n):
            r = self._ring[i % cap]
            out.append({"call": r[0], "op": r[1], "algorithm": r[2], "bytes": r[3],
                        "dtype": str(r[4]).removeprefix("torch."), "state": r[5],
                        "start": r[6] + off, "end": r[7] and r[7] + off, "error": r[8]})
        return out

    def render(self, title: str) -> str:
        lines = [f"tpcomm flight recorder: {title}; last {min(self._n, self.capacity)} of "
                 f"{self._n} calls (oldest first)",
                 f"{'call':>7} {'op':<24} {'algorithm':<13} {'bytes':>11} {'dtype':<8} "
                 f"{'state':<7} {'start':>15} {'ms':>9}  error"]
        for r in self.records():
            start = time.strftime("%H:%M:%S", time.localtime(r["start"])) + \
                f".{int(r['start'] % 1 * 1e6):06d}"
            ms = f"{(r['end'] - r['start']) * 1e3:9.3f}" if r["end"] else f"{'...':>9}"
            lines.append(f"{r['call']:>7} {r['op']:<24} {r['algorithm']:<13} {r['bytes']:>11} "
                         f"{r['dtype']:<8} {r['state']:<7} {start:>15} {ms}  {r['error']}")
        return "\n".join(lines)


def register(comm) -> None:
    """Track a Communicator for the SIGUSR1 dump; install the handler once, if we can."""
    global _signal_installed
    _live.add(comm)
    if _signal_installed or threading.current_thread() is not threading.main_thread():
        return
    if not hasattr(signal, "SIGUSR1") or signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None):
        return  # never take the signal from an application that handles it
    signal.signal(signal.SIGUSR1, _dump_all)
    _signal_installed = True


def _dump_all(signum, frame) -> None:
    for comm in list(_live):
        try:
            sys.stderr.write(comm.dump() + "\n")
        except Exception as e:  # a dump must never kill the process
            sys.stderr.write(f"tpcomm: flight recorder dump failed: {e}\n")
    sys.stderr.flush()
