"""tpcomm's ops as torch custom ops, ``torch.ops.tpcomm.<op>``: what torch.compile sees.

Problem: torch.compile cannot trace into a collective (shared memory, peer memory, flags): a
plain Python method breaks the graph at every call. Registered as custom ops with fake
implementations (output shapes only), the collectives are opaque nodes of one graph, that
inductor schedules, that CUDA graphs capture, and that a pass can pattern-match
(``tpcomm.integrations.compile``).

Ops (the Communicator is named by ``comm``, its handle; ``algorithm`` as in its methods)::

    all_reduce(Tensor x, str comm, str algorithm) -> Tensor
    all_reduce_(Tensor(a!) x, str comm, str algorithm) -> ()
    reduce_scatter(Tensor x, str comm, str algorithm) -> Tensor          # [R*m, ...] -> [m, ...]
    all_gather(Tensor x, str comm, str algorithm) -> Tensor              # [m, ...] -> [R*m, ...]
    all_reduce_coalesced(Tensor[] tensors, str comm, str algorithm) -> Tensor[]
    all_reduce_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps,
                            str comm, str algorithm) -> Tensor normed     # x, residual in place
    matmul_all_reduce(Tensor a, Tensor b, str comm, int? chunks) -> Tensor
    matmul_reduce_scatter(Tensor a, Tensor b, str comm, int? chunks, str method) -> Tensor
    all_gather_matmul(Tensor a_shard, Tensor b, str comm, int? chunks, bool return_gathered)
        -> (Tensor out, Tensor gathered)        # gathered is [0] unless return_gathered

The ops that mutate declare it in their schema (``Tensor(a!)``); torch functionalizes them
while compiling and inductor writes in place again where the input is dead afterwards.
``all_reduce_coalesced`` is functional (a list of mutated tensors is awkward to functionalize);
the Communicator copies its results back, which is what functionalization would emit.

Handles: a Communicator registers itself here when it is made (``register``: ``"comm0"``,
``"comm1"``, ... in creation order within the process, the same on every rank of a program
that creates them in the same order) and is dropped at ``close()``. The table holds weak
references, so it never keeps a Communicator alive; an op naming a closed or unknown handle
raises :class:`~tpcomm.errors.CommunicatorClosedError`.

Routing: each op's implementation is the Communicator's eager method, so the algorithm is
chosen inside the op at run time, per call (no recompiles per size: the fake implementations
depend on shapes only). The Communicator's methods call these ops only while torch.compile's
frontend traces them (``torch.compiler.is_dynamo_compiling()``, true in the traced frame only:
an op's implementation, running the same method eagerly, never re-enters the op, whatever
another thread compiles); eagerly they run their direct path and never pay the dispatcher
(``scripts/host_cost_compile.py`` measures both).
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from torch.library import custom_op

from ..errors import CommunicatorClosedError

_COMMS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()
_NEXT = itertools.count()


def register(comm) -> str:
    """A new handle for ``comm`` (called by the Communicator's constructor)."""
    handle = f"comm{next(_NEXT)}"
    _COMMS[handle] = comm
    return handle


def unregister(handle: str) -> None:
    """Forget ``handle`` (called by ``Communicator.close``); unknown handles are ignored."""
    _COMMS.pop(handle, None)


def lookup(handle: str):
    """The open Communicator registered as ``handle``."""
    comm = _COMMS.get(handle)
    if comm is None:
        raise CommunicatorClosedError(
            f"torch.ops.tpcomm: no open Communicator has the handle {handle!r} (it was closed, "
            f"or it was made in another process); open handles: {sorted(_COMMS)}")
    return comm


def _world(handle: str) -> int:
    return lookup(handle).world_size


# ---------------------------------------------------------------- collectives
def _collective(op: str, fake):
    """``torch.ops.tpcomm.<op>(Tensor x, str comm, str algorithm) -> Tensor``: the
    Communicator's eager method ``op`` on a contiguous ``x``; ``fake(x, comm, algorithm)``, its
    output's shape (an empty tensor), is what torch.compile sees."""
    def impl(x: torch.Tensor, comm: str, algorithm: str) -> torch.Tensor:
        return getattr(lookup(comm), op)(x.contiguous(), algorithm=algorithm)
    registered = custom_op(f"tpcomm::{op}", impl, mutates_args=())
    registered.register_fake(fake)
    return registered


def _reduce_scatter_shape(x, comm, algorithm):
    R = _world(comm)
    torch._check(x.dim() > 0 and x.shape[0] % R == 0, lambda: (
        f"reduce_scatter needs dim 0 divisible by the world size {R}, got shape "
        f"{tuple(x.shape)}"))
    return x.new_empty((x.shape[0] // R, *x.shape[1:]))


def _all_gather_shape(x, comm, algorithm):
    R = _world(comm)
    return x.new_empty((R * x.shape[0], *x.shape[1:]) if x.dim() else (R,))


all_reduce = _collective("all_reduce", lambda x, comm, algorithm: x.new_empty(x.shape))
reduce_scatter = _collective("reduce_scatter", _reduce_scatter_shape)
all_gather = _collective("all_gather", _all_gather_shape)


@custom_op("tpcomm::all_reduce_", mutates_args=("x",))
def all_reduce_(x: torch.Tensor, comm: str, algorithm: str) -> None:
    c = lookup(comm)
    if x.is_contiguous():
        c.all_reduce_(x, algorithm=algorithm)
    else:
        x.copy_(c.all_reduce(x.contiguous(), algorithm=algorithm))


@all_reduce_.register_fake
def _(x, comm, algorithm):
    return None


@custom_op("tpcomm::all_reduce_coalesced", mutates_args=())
def all_reduce_coalesced(tensors: list[torch.Tensor], comm: str,
                         algorithm: str) -> list[torch.Tensor]:
    outs = [t.clone(memory_format=torch.contiguous_format) for t in tensors]
    lookup(comm).all_reduce_coalesced(outs, algorithm=algorithm)
    return outs


@all_reduce_coalesced.register_fake
def _(tensors, comm, algorithm):
    return [t.new_empty(t.shape) for t in tensors]


@custom_op("tpcomm::all_reduce_add_rms_norm", mutates_args=("x", "residual"))
def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float, comm: str, algorithm: str) -> torch.Tensor:
    xc, rc = x.contiguous(), residual.contiguous()
    normed, _ = lookup(comm).all_reduce_add_rms_norm(xc, rc, weight, eps, algorithm=algorithm)
    if xc is not x:
        x.copy_(xc)
    if rc is not residual:
        residual.copy_(rc)
    return normed


@all_reduce_add_rms_norm.register_fake
def _(x, residual, weight, eps, comm, algorithm):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------- GEMM + collective
@custom_op("tpcomm::matmul_all_reduce", mutates_args=())
def matmul_all_reduce(a: torch.Tensor, b: torch.Tensor, comm: str,
                      chunks: Optional[int]) -> torch.Tensor:
    from .overlap import matmul_all_reduce as fn
    return fn(a, b, lookup(comm), chunks=chunks)


@matmul_all_reduce.register_fake
def _(a, b, comm, chunks):
    return a.new_empty((a.shape[0], b.shape[1]))


@custom_op("tpcomm::matmul_reduce_scatter", mutates_args=())
def matmul_reduce_scatter(a: torch.Tensor, b: torch.Tensor, comm: str, chunks: Optional[int],
                          method: str) -> torch.Tensor:
    from .overlap import matmul_reduce_scatter as fn
    return fn(a, b, lookup(comm), chunks=chunks, method=method)


@matmul_reduce_scatter.register_fake
def _(a, b, comm, chunks, method):
    R = _world(comm)
    torch._check(a.shape[0] % R == 0, lambda: (
        f"matmul_reduce_scatter: a's rows M={a.shape[0]} must be divisible by the world "
        f"size {R}"))
    return a.new_empty((a.shape[0] // R, b.shape[1]))


@custom_op("tpcomm::all_gather_matmul", mutates_args=())
def all_gather_matmul(a_shard: torch.Tensor, b: torch.Tensor, comm: str, chunks: Optional[int],
                      return_gathered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from .overlap import all_gather_matmul as fn
    if return_gathered:
        return fn(a_shard, b, lookup(comm), chunks=chunks, return_gathered=True)
    return fn(a_shard, b, lookup(comm), chunks=chunks), a_shard.new_empty(0)


@all_gather_matmul.register_fake
def _(a_shard, b, comm, chunks, return_gathered):
    R = _world(comm)
    rows = R * a_shard.shape[0]
    gathered = a_shard.new_empty((rows, a_shard.shape[1]) if return_gathered else (0,))
    return a_shard.new_empty((rows, b.shape[1])), gathered
