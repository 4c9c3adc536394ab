"""Inter-node transports: how the two-level all-reduce crosses nodes.

A transport sums a buffer in place over one cross-node sub-group (the ranks with the same local
index on every node) and returns a handle at once, so the caller can overlap the network with
its intra-node work::

    pending = transport.all_reduce_start(slice_)   # slice_ := sum over the nodes, in place
    ...                                             # intra-node work of other chunks
    pending.wait()                                  # slice_ is final (see "completion" below)

Completion: on the CPU ``wait()`` returns when the data is there. On the GPU it is stream
ordered: ``wait()`` makes the *current* CUDA stream wait for the transfer and returns at once, so
kernels launched afterwards on that stream see the result and nothing blocks the host.

Backends:

- ``"torch"`` (:class:`TorchDistTransport`): a torch.distributed sub-group with the parent group's
  backend: NCCL on GPUs (InfiniBand/RoCE with GPUDirect RDMA where the cluster has it, sockets
  otherwise; it runs on ProcessGroupNCCL's own stream, which is the second stream that overlaps
  with the caller's), gloo on CPUs (TCP; it runs on gloo's worker threads).

Not built: a GPU-initiated NVSHMEM transport (puts with signals from a Triton kernel, no host
thread). It needs a GPU with NVSHMEM to write and test against; see docs/multinode.md. Asking for
it raises a clear error rather than pretending.
"""
from __future__ import annotations

import abc

import torch
import torch.distributed as dist


class Pending(abc.ABC):
    @abc.abstractmethod
    def wait(self) -> None:
        """Until the transfer is complete (CPU) or ordered before later work on the current
        stream (GPU)."""


class InterNodeTransport(abc.ABC):
    """Sum of a tensor over the nodes, in place, started asynchronously."""

    name: str = "?"
    world_size: int = 1     # number of nodes this transport spans

    @abc.abstractmethod
    def all_reduce_start(self, x: torch.Tensor) -> Pending:
        """Start ``x := sum of x over the sub-group``. ``x`` must stay alive and untouched until
        the returned handle's ``wait()``; every member starts the same sequence of calls."""

    def close(self) -> None:
        """Release what the transport owns (the torch backend owns nothing: its sub-group
        belongs to torch.distributed and goes with ``destroy_process_group()``)."""


class _WorkPending(Pending):
    __slots__ = ("work",)

    def __init__(self, work):
        self.work = work

    def wait(self) -> None:
        self.work.wait()


class TorchDistTransport(InterNodeTransport):
    """All-reduce over a torch.distributed group (NCCL or gloo), ``async_op=True``."""

    name = "torch"

    def __init__(self, group):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))

    def all_reduce_start(self, x: torch.Tensor) -> Pending:
        return _WorkPending(dist.all_reduce(x, group=self.group, async_op=True))

    def __repr__(self):
        return f"TorchDistTransport(backend={self.backend!r}, nodes={self.world_size})"


TRANSPORTS = {"torch": TorchDistTransport}
NOT_BUILT = {
    "nvshmem": "GPU-initiated NVSHMEM puts are future work: not implemented in this tree "
               "(see docs/multinode.md); use transport='torch' (NCCL across nodes)",
}


def make_transport(name: str, group) -> InterNodeTransport:
    """The transport called ``name`` over ``group`` (the cross-node sub-group of this rank)."""
    if name in NOT_BUILT:
        raise NotImplementedError(f"transport {name!r}: {NOT_BUILT[name]}")
    try:
        cls = TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown inter-node transport {name!r}; choose one of "
                         f"{sorted(TRANSPORTS)}") from None
    return cls(group)
