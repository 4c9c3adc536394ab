"""Symmetric buffers in POSIX shared memory, for ranks that are processes on one machine.

Each rank creates one segment, ``/dev/shm/tpcomm-<token>-r<rank>`` (mode 0600, the token a random
string that rank 0 shares through the launcher's store), maps every peer's segment, and once all
ranks have mapped all segments each rank unlinks its own name. From then on the segments live
only as mappings: nothing is left in /dev/shm even if every process is killed with SIGKILL, and
the memory goes back to the system when the last process unmaps it. Until then the names are
unlinked by ``close()``, by the error path of the constructor, and at interpreter exit.

Layout of one rank's segment::

    offset 0                     4 KiB                                  4 KiB + nbytes
    +----------------------------+--------------------------------------+
    | signal pad (512 x int64)   | data region                          |
    +----------------------------+--------------------------------------+

The signal pad is written only by its owner and read by peers; its word map is the business of
the collectives that use it (tpcomm.cpu.shm_collectives).
"""
from __future__ import annotations

import atexit
import mmap
import os
import secrets
import threading

import torch

from ..errors import TpcommError
from ..groups.group import GroupInfo, GroupStore
from .base import SymmetricBuffer

SIGNAL_PAD_NBYTES = 4096
SHM_DIR = "/dev/shm"
NAME_PREFIX = "tpcomm-"

# Names this process created and has not unlinked yet: unlinked at exit on every path.
_pending_unlink: set[str] = set()
_pending_lock = threading.Lock()


def _unlink(path: str) -> None:
    with _pending_lock:
        _pending_unlink.discard(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@atexit.register
def _unlink_pending() -> None:
    for path in list(_pending_unlink):
        _unlink(path)


def shm_available() -> str | None:
    """None when POSIX shared memory can be used here, else the reason it cannot."""
    if not os.path.isdir(SHM_DIR) or not os.access(SHM_DIR, os.W_OK):
        return f"{SHM_DIR} is missing or not writable"
    return None


class ShmSymmetricBuffer(SymmetricBuffer):
    def __init__(self, info: GroupInfo, nbytes: int, timeout_s: float):
        if nbytes <= 0 or nbytes % 64:
            raise ValueError(f"symmetric buffer size must be a positive multiple of 64, got {nbytes}")
        self.rank, self.world_size = info.rank, info.world_size
        self.nbytes, self.signal_pad_nbytes = nbytes, SIGNAL_PAD_NBYTES
        self.device = torch.device("cpu")
        self._maps: list[mmap.mmap | None] = [None] * self.world_size
        self._data: list[torch.Tensor] = []
        self._pads: list[torch.Tensor] = []
        self._closed = False
        store = GroupStore(info, "shm", timeout_s)
        if self.rank == 0:
            store.set("token", secrets.token_hex(8))
        token = store.get("token", "shm token").decode()
        paths = [f"{SHM_DIR}/{NAME_PREFIX}{token}-r{r}" for r in range(self.world_size)]
        own = paths[self.rank]
        total = SIGNAL_PAD_NBYTES + nbytes
        try:
            # each step ends in an all-gather of the ranks' status, so a rank that fails makes
            # every rank raise at the same step instead of leaving them waiting
            self._step(store, "created", lambda: self._create_own(own, total))
            self._step(store, "attached", lambda: self._attach_peers(paths, total))
        except BaseException:
            _unlink(own)
            self._unmap()
            raise
        # every rank holds every mapping: the names are no longer needed
        _unlink(own)
        for m in self._maps:
            t = torch.frombuffer(m, dtype=torch.uint8)
            self._pads.append(t[:SIGNAL_PAD_NBYTES].view(torch.int64))
            self._data.append(t[SIGNAL_PAD_NBYTES:])

    def _step(self, store: GroupStore, name: str, action) -> None:
        error = ""
        try:
            action()
        except Exception as e:  # reported to every rank below
            error = f"{type(e).__name__}: {e}"
        statuses = store.all_gather(name, error)
        failed = [(r, v.decode()) for r, v in enumerate(statuses) if v]
        if failed:
            r, why = failed[0]
            raise TpcommError(f"shared-memory set-up failed on rank {r} ({name}): {why}")

    def _create_own(self, path: str, total: int) -> None:
        self._maps[self.rank] = self._create(path, total)

    def _attach_peers(self, paths: list[str], total: int) -> None:
        for r, path in enumerate(paths):
            if r != self.rank:
                self._maps[r] = self._attach(path, total)

    @staticmethod
    def _create(path: str, total: int) -> mmap.mmap:
        with _pending_lock:
            _pending_unlink.add(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            try:
                # reserve the pages now: on a full tmpfs a plain ftruncate succeeds and the
                # first touch of a missing page kills the process with SIGBUS
                os.posix_fallocate(fd, 0, total)
            except OSError as e:
                raise TpcommError(f"cannot reserve {total} bytes in {SHM_DIR} ({e.strerror}); "
                                  f"free space there or lower max_bytes / TPCOMM_MAX_BYTES") from e
            return mmap.mmap(fd, total)
        finally:
            os.close(fd)

    @staticmethod
    def _attach(path: str, total: int) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size != total:
                raise TpcommError(f"shared segment {path} has {size} bytes, expected {total}: "
                                  f"ranks disagree on max_bytes")
            return mmap.mmap(fd, total)
        finally:
            os.close(fd)

    def data(self, peer: int) -> torch.Tensor:
        self._check_open()
        return self._data[peer]

    def signal_pad(self, peer: int) -> torch.Tensor:
        self._check_open()
        return self._pads[peer]

    def pad_memoryview(self, peer: int) -> memoryview:
        """The peer's signal pad as int64 words, for cheap scalar reads and writes."""
        self._check_open()
        return memoryview(self._maps[peer])[:SIGNAL_PAD_NBYTES].cast("q")

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self):
        if self._closed:
            raise TpcommError("symmetric buffer used after close()")

    def _unmap(self):
        for i, m in enumerate(self._maps):
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    # a tensor or memoryview over the mapping is still alive somewhere; the
                    # mapping goes when it does (the name is already unlinked)
                    pass
                self._maps[i] = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._data.clear()
        self._pads.clear()
        self._unmap()
