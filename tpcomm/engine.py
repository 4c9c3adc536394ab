"""The contract between the Communicator and a device engine (CPU: ``cpu/shm_collectives.py``,
GPU: ``cuda/p2p_collectives.py``). "Backend" keeps its torch.distributed meaning (gloo, NCCL);
an engine is what moves tpcomm's own bytes.

The Communicator validates tensors, makes the call's :class:`tpcomm.algorithms.Choice` (the
algorithm, the mechanism, the round size: :func:`tpcomm.selection.select.engine_choice` asks the
engine for :meth:`Engine.round_limit`), keeps the stats and handles fallbacks; an engine only
moves bytes. Every engine call is collective: all ranks make it with the same op, name, dtype and
sizes. ``total`` is the numel of the whole Communicator call a round belongs to (-1: the round is
the call) and ``offset`` the round's place in it: an engine compares (op, dtype, total) across
ranks and raises :class:`tpcomm.errors.MismatchError` on every rank where they differ. What an
engine offers beyond the three collectives it says through :meth:`Engine.supports` (never
probed with ``getattr``).

Decide once, chunk once. The protocol of a collective call::

    Communicator     choice = engine_choice(...)   once per (op, size, dtype, request, capture)
                     run_rounds(engine, op, x, out, choice.name, choice.chunk)  (the one loop;
                     a call of one round skips it and calls the engine directly)
    engine           one round per call, as choice.name: no push/pull decision, no loop; a
                     round larger than round_limit(op, name) or a name without its mechanism
                     (a caller outside a Communicator: tests, benchmarks) goes to run_call,
                     which makes the same choice and runs the same loop

The fused all-reduce + add + RMSNorm is one engine call whose rounds (of whole rows, bounded by
the push slot) stay in the engine: nothing above it chunks that op.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .algorithms import split
from .selection.select import engine_choice

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
    # the column of tpcomm.algorithms.SUPPORTED / MECHANISMS this engine runs ("cpu", "cuda")
    device_type: str
    # Bytes of the engine's largest round buffer (informational: round_limit gives the rounds).
    capacity: int
    # None while healthy, else why the engine refuses further calls.
    broken: str | None
    # The GPU engine's verdict of the data-moving P2P check (cuda/p2p_check.py); None elsewhere.
    p2p_check: object | None

    def supports(self, op: str) -> bool:
        """True where this engine runs ``op`` (one of CORE_OPS + EXTRA_OPS)."""

    def round_limit(self, op: str, name: str, dtype: torch.dtype) -> int:
        """Elements of one round of ``op`` run as ``name`` (a Choice's name, mechanism
        included; all_reduce, all_gather: of the input; reduce_scatter: of the output): the
        step of the one chunk loop. ValueError for a name the engine does not run."""

    def all_reduce(self, inp: torch.Tensor, out: torch.Tensor, algorithm: str, *,
                   total: int = -1, offset: int = 0) -> None:
        """out = sum over ranks of inp: one round (``algorithm`` a Choice's name, numel at most
        its round_limit). Contiguous, same numel and dtype (any shape: the engine flattens);
        out may alias inp."""

    def reduce_scatter(self, inp: torch.Tensor, out: torch.Tensor, algorithm: str, *,
                       total: int = -1, offset: int = 0) -> None:
        """inp is [world, c] (rows may be strided), out is [c]: out = sum over ranks of
        inp[rank]."""

    def all_gather(self, inp: torch.Tensor, out: torch.Tensor, algorithm: str, *,
                   total: int = -1, offset: int = 0) -> None:
        """inp is [c], out is [world, c] (rows may be strided): out[p] = inp of rank p."""

    def close(self) -> None:
        """Release everything; safe to call twice."""


def run_rounds(engine: Engine, op: str, x: torch.Tensor, out: torch.Tensor, name: str,
               chunk: int, world: int) -> None:
    """The one chunk loop: ``op`` of a whole call on ``engine`` as ``name``, in rounds of at most
    ``chunk`` elements (a Choice's chunk; all_reduce, all_gather: input elements;
    reduce_scatter: output elements). Every round carries the whole call's numel and its own
    offset (``total``, ``offset``): the engines compare them across ranks, so a size mismatch
    raises in the first round on every rank. x and out contiguous: all_reduce [n] -> [n],
    reduce_scatter [world*c] -> [c], all_gather [c] -> [world*c] (any shapes of those numels)."""
    if chunk <= 0:
        raise ValueError(f"{op} as {name!r}: a round of {chunk} elements")
    total = x.numel()
    if op == "all_reduce":
        if total <= chunk:  # the common case: one round, no slicing
            engine.all_reduce(x, out, name, total=total)
            return
        xf, of = x.view(-1), out.view(-1)
        for lo in range(0, total, chunk):
            engine.all_reduce(xf[lo:lo + chunk], of[lo:lo + chunk], name, total=total,
                              offset=lo)
    elif op == "reduce_scatter":
        c = out.numel()
        x2, o1 = x.view(world, c), out.view(-1)
        if c <= chunk:
            engine.reduce_scatter(x2, o1, name, total=total)
            return
        for lo in range(0, c, chunk):
            engine.reduce_scatter(x2[:, lo:lo + chunk], o1[lo:lo + chunk], name, total=total,
                                  offset=lo)
    elif op == "all_gather":
        x1, o2 = x.view(-1), out.view(world, total)
        if total <= chunk:
            engine.all_gather(x1, o2, name, total=total)
            return
        for lo in range(0, total, chunk):
            engine.all_gather(x1[lo:lo + chunk], o2[:, lo:lo + chunk], name, total=total,
                              offset=lo)
    else:
        raise ValueError(f"run_rounds: unknown op {op!r}")


def run_call(engine: Engine, op: str, x: torch.Tensor, out: torch.Tensor, algorithm: str,
             world: int) -> None:
    """A whole call on ``engine`` from a caller outside a Communicator (tests, benchmarks): the
    Choice a Communicator makes for ``algorithm`` (its mechanism where it names none, the
    engine's round size), then :func:`run_rounds`. Shapes as there."""
    algo, mechanism = split(algorithm)
    numel = out.numel() if op == "reduce_scatter" else x.numel()
    c = engine_choice(op, algo, mechanism, numel, x.dtype, engine)
    run_rounds(engine, op, x, out, c.name, c.chunk, world)
