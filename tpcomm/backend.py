"""The contract between the Communicator and a device backend (CPU shared memory, GPU P2P).

The Communicator validates tensors, picks the algorithm, chunks calls larger than ``capacity``,
keeps the stats and handles fallbacks; a backend only moves bytes. Every backend call is
collective: all ranks make it with the same op, algorithm, dtype and sizes. ``total`` is the
numel of the whole Communicator call a chunk belongs to (-1: the chunk is the call) and
``offset`` the chunk's place in it: a backend compares (op, dtype, total) across ranks and raises
:class:`tpcomm.errors.MismatchError` on every rank where they differ.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Backend(Protocol):
    name: str
    # Largest input of one call in bytes (the Communicator chunks larger ones).
    capacity: int
    # None while healthy, else why the backend refuses further calls.
    broken: str | None

    def all_reduce(self, inp: torch.Tensor, out: torch.Tensor, algorithm: str, *,
                   total: int = -1, offset: int = 0) -> None:
        """out = sum over ranks of inp. Both 1-D, same numel and dtype; out may alias inp."""

    def reduce_scatter(self, inp: torch.Tensor, out: torch.Tensor, algorithm: str, *,
                       total: int = -1, offset: int = 0) -> None:
        """inp is [world, c] (rows may be strided), out is [c]: out = sum over ranks of
        inp[rank]."""

    def all_gather(self, inp: torch.Tensor, out: torch.Tensor, algorithm: str, *,
                   total: int = -1, offset: int = 0) -> None:
        """inp is [c], out is [world, c] (rows may be strided): out[p] = inp of rank p."""

    def close(self) -> None:
        """Release everything; safe to call twice."""
