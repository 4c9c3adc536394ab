"""The contract between the Communicator and a device engine (CPU: ``cpu/shm_collectives.py``,
GPU: ``cuda/p2p_collectives.py``). "Backend" keeps its torch.distributed meaning (gloo, NCCL);
an engine is what moves tpcomm's own bytes.

The Communicator validates tensors, picks the algorithm, chunks calls larger than ``capacity``,
keeps the stats and handles fallbacks; an engine only moves bytes. Every engine call is
collective: all ranks make it with the same op, algorithm, dtype and sizes. ``total`` is the
numel of the whole Communicator call a chunk belongs to (-1: the chunk is the call) and
``offset`` the chunk's place in it: an engine compares (op, dtype, total) across ranks and raises
:class:`tpcomm.errors.MismatchError` on every rank where they differ. What an engine
offers beyond the three collectives it says through :meth:`Engine.supports` (never probed with
``getattr``).
"""
from __future__ import annotations

from typing import Protocol

import torch

# the collectives every engine runs
CORE_OPS = ("all_reduce", "reduce_scatter", "all_gather")
# what an engine may add (the GPU engine has all of them):
#   all_reduce_add_rms_norm   fused all-reduce + add + RMSNorm (+ fused_norm_max_hidden())
#   matmul_reduce_scatter, all_gather_matmul, matmul_all_reduce   fused GEMM + collective
#   empty                     tensors in the engine's symmetric buffer (zero-copy inputs)
EXTRA_OPS = ("all_reduce_add_rms_norm", "matmul_reduce_scatter", "all_gather_matmul",
             "matmul_all_reduce", "empty")


class Engine(Protocol):
    name: str
    # Largest input of one call in bytes (the Communicator chunks larger ones).
    capacity: int
    # None while healthy, else why the engine refuses further calls.
    broken: str | None
    # The GPU engine's verdict of the data-moving P2P check (cuda/p2p_check.py); None elsewhere.
    p2p_check: object | None

    def supports(self, op: str) -> bool:
        """True where this engine runs ``op`` (one of CORE_OPS + EXTRA_OPS)."""

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
