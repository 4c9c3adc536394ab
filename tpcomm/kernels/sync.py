"""The named bundle of synchronization arguments that every collective launcher takes.

The GPU engine builds one :class:`SyncArgs` per kernel family (push, pull, standalone
barrier: they differ in their epoch counters only) once, at set-up, and hands it to every
``bind_*`` launcher (and to the fused GEMM launchers) as one value::

    SyncArgs(recv_addrs, my_recv_addr, buf_stride,     push receive regions (every rank's, mine)
             counters, call_off,                       epochs: per-block counters, call counters
             err_dev, err_host,                        the error word: device copy, host-mapped
             rank, timeout_ns, wp,                     who I am, the wait bound, padded world
             hdr_addrs, pad_addrs, my_pad_addr)        call headers, signal-pad flags

Device side, the push kernels take :meth:`SyncArgs.device` as one tuple parameter ``sync``
(fields read as ``sync.counter_ptr`` etc. in ``_lamport.py``'s helpers); ``rank`` stays a
parameter of its own, because the kernels must not specialize on it (``kernels/__init__``) and
Triton's ``do_not_specialize`` applies to a whole parameter.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class DeviceSync(NamedTuple):
    """The push kernels' ``sync`` parameter (a Triton tuple; every field specialized as the
    separate parameters it replaces were)."""
    recv_addrs: tuple[int, ...]
    my_recv_addr: int
    buf_stride: int
    counter_ptr: torch.Tensor
    err_ptr: torch.Tensor
    err_host: int
    timeout_ns: int


class SyncArgs(NamedTuple):
    """What one Communicator's kernels of one family need to synchronize with the peers
    (built once at engine set-up; see the module docstring)."""
    recv_addrs: tuple[int, ...]   # every rank's push receive base (region 0), mapped on this GPU
    my_recv_addr: int             # this rank's receive base
    buf_stride: int               # bytes from region 0 to region 1 (the call headers at 2x)
    counters: torch.Tensor        # int64 [MAX_GRID]: the family's epoch counter per block
    call_off: int                 # words from ``counters`` to the call check's counters
    err_dev: torch.Tensor         # int64 [3]: the error word, then a mismatch's two hashes
    err_host: int                 # address of the host-mapped error word (0: none)
    rank: int
    timeout_ns: int               # bound of every wait (GPU global timer)
    wp: int                       # the world rounded up to a power of two (>= 2)
    hdr_addrs: tuple[int, ...]    # every rank's call-header area (the pull kernel's check)
    pad_addrs: tuple[int, ...]    # every rank's signal-pad flags (barriers)
    my_pad_addr: int              # this rank's flags

    @property
    def world(self) -> int:
        return len(self.recv_addrs)

    def device(self) -> DeviceSync:
        """The push kernels' ``sync`` parameter (bind time only: it builds a tuple)."""
        return DeviceSync(self.recv_addrs, self.my_recv_addr, self.buf_stride, self.counters,
                          self.err_dev, self.err_host, self.timeout_ns)
