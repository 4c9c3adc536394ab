"""The communication backend of the models, as a switch: ``tpcomm``, or torch.distributed
(``nccl`` on GPU, ``gloo`` on CPU) called directly.

Both expose the subset of the Communicator's interface the TP layers use, so the model code is
the same whichever is chosen and the comparison measures the communication only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import reference

# what --comm accepts on each device
COMM_CHOICES = {"cpu": ("tpcomm", "gloo"), "cuda": ("tpcomm", "nccl")}


class TorchDistComm:
    """torch.distributed with the Communicator's interface (no buffers, no fallback logic).

    Without an initialized process group it is a world of one: every op is the identity, which
    is what an unsharded model needs.
    """

    def __init__(self, group=None, *, name: str | None = None):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
            self.backend_name = name or str(dist.get_backend(group))
        else:
            self.rank, self.world_size = 0, 1
            self.backend_name = name or "local"

    def all_reduce(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        out = x.clone() if out is None else out
        if self.world_size == 1:
            if out.data_ptr() != x.data_ptr():
                out.copy_(x)
            return out
        return reference.all_reduce(x, out, self.group)

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(x, out=x)

    def all_gather(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: [m, ...] -> [W*m, ...], rank p's x in rows [p*m, (p+1)*m)."""
        if out is None:
            out = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype,
                              device=x.device)
        if self.world_size == 1:
            out.copy_(x)
            return out
        return reference.all_gather(x, out, self.group)

    def all_reduce_add_rms_norm(self, x, residual, weight, eps):
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return reference.add_rms_norm(x, residual, weight, eps)

    def close(self) -> None:
        pass

    def __repr__(self):
        return f"TorchDistComm({self.backend_name}, rank={self.rank}, world_size={self.world_size})"


def make_comm(name: str, device: torch.device, group=None):
    """The backend called ``name`` (``tpcomm``, ``nccl``, ``gloo``) on ``device``."""
    kind = torch.device(device).type
    choices = COMM_CHOICES.get(kind, ())
    if name not in choices:
        raise ValueError(f"--comm {name!r} is not available on {kind}; choose one of {choices}")
    if name == "tpcomm":
        from ..communicator import Communicator
        return Communicator(group, device=device)
    return TorchDistComm(group, name=name)
