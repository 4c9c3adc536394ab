"""The symmetric-buffer interface shared by the CPU (POSIX shared memory) and GPU providers.

A symmetric buffer is, per rank of a group, one data region of ``nbytes`` bytes and one signal
pad of ``signal_pad_nbytes`` bytes, both readable and writable by every peer of the group. It is
registered once per Communicator (the pool: every call reuses it, nothing is allocated or
registered on the hot path) and released by :meth:`close`.

    rank 0                    rank 1                    ...   rank R-1
    +-------------+           +-------------+                 +-------------+
    | signal pad  |  <------  | signal pad  |  peers read     | signal pad  |
    +-------------+  ------>  +-------------+  and write      +-------------+
    | data region |           | data region |  every region   | data region |
    +-------------+           +-------------+                 +-------------+

``data(peer)`` and ``signal_pad(peer)`` give tensors over a peer's regions (the CPU provider maps
every segment into every process; the GPU provider maps peers' memory through NVLink P2P). The
GPU provider also exposes device-side pointer tables (``buffer_ptrs_dev``, ``signal_pad_ptrs_dev``)
for kernels; the CPU provider needs none.
"""
from __future__ import annotations

import abc

import torch


class SymmetricBuffer(abc.ABC):
    rank: int
    world_size: int
    nbytes: int
    signal_pad_nbytes: int
    device: torch.device

    @abc.abstractmethod
    def data(self, peer: int) -> torch.Tensor:
        """uint8 tensor of ``nbytes`` over ``peer``'s data region."""

    @abc.abstractmethod
    def signal_pad(self, peer: int) -> torch.Tensor:
        """int64 tensor over ``peer``'s signal pad."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every mapping this rank holds. Safe to call twice."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    def view(self, peer: int, dtype: torch.dtype, numel: int, offset_bytes: int = 0) -> torch.Tensor:
        """A typed 1-D view of ``numel`` elements at ``offset_bytes`` into ``peer``'s data region."""
        itemsize = dtype.itemsize
        end = offset_bytes + numel * itemsize
        if offset_bytes % itemsize or end > self.nbytes or offset_bytes < 0:
            raise ValueError(f"view [{offset_bytes}, {end}) of {dtype} does not fit a "
                             f"{self.nbytes}-byte symmetric buffer")
        return self.data(peer)[offset_bytes:end].view(dtype)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
