"""torch.distributed versions of every op: the fallback path, the tests' oracle, the benchmarks'
baseline. Same signatures as the fast paths: (input, out, group) with ``out`` preallocated.

``timeout_s`` (the Communicator's fallback path passes it for CPU tensors): the collective is
issued asynchronously and its work object waited for with that bound; past it
:class:`TimeoutError` is raised (the Communicator turns it into ``PeerTimeoutError``) instead of
waiting for the process group's own timeout (gloo's default is 30 minutes). gloo's
reduce_scatter ignores ``wait(timeout=...)``, so a bounded reduce_scatter is an all-reduce of
the whole input followed by the slice of this rank. Without ``timeout_s`` the calls are the
plain synchronous ones (NCCL: ordered on the stream, no host wait).

Shapes: ``all_reduce``: out like x. ``reduce_scatter``: x is [R*m, ...], out [m, ...], rank r
gets the sum of rows [r*m, (r+1)*m). ``all_gather``: x is [m, ...], out [R*m, ...].
"""
from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

# torch 2.13 renamed the *_tensor collectives to *_single (the old names warn); torch 2.11, on
# the GPU machines, has only the old ones
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _wait(work, timeout_s: float | None, what: str) -> None:
    """Wait for an async work object at most ``timeout_s``; TimeoutError past it."""
    if work is None:
        return
    t0 = time.monotonic()
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:   # gloo: "Operation timed out!" (DistBackendError)
        waited = time.monotonic() - t0
        if "timed out" in str(e).lower() or waited >= timeout_s:
            raise TimeoutError(f"torch.distributed {what} did not complete within "
                               f"{timeout_s:g} s: {e}") from e
        raise


def all_reduce(x: torch.Tensor, out: torch.Tensor, group=None,
               timeout_s: float | None = None) -> torch.Tensor:
    if out.data_ptr() != x.data_ptr():
        out.copy_(x)
    _wait(dist.all_reduce(out, group=group, async_op=timeout_s is not None), timeout_s,
          "all_reduce")
    return out


def reduce_scatter(x: torch.Tensor, out: torch.Tensor, group=None,
                   timeout_s: float | None = None) -> torch.Tensor:
    if timeout_s is None:
        _reduce_scatter(out, x, group=group)
        return out
    # bounded: gloo's reduce_scatter work ignores wait(timeout); an all-reduce honours it
    full = x.contiguous().clone()
    _wait(dist.all_reduce(full, group=group, async_op=True), timeout_s, "reduce_scatter")
    rows = full.view(dist.get_world_size(group), -1)[dist.get_rank(group)]
    out.copy_(rows.view(out.shape))
    return out


def all_gather(x: torch.Tensor, out: torch.Tensor, group=None,
               timeout_s: float | None = None) -> torch.Tensor:
    _wait(_all_gather(out, x, group=group, async_op=timeout_s is not None), timeout_s,
          "all_gather")
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The epilogue of a TP sublayer, unfused: ``residual = x + residual`` (rounded to the
    dtype, as an unfused model stores it), then ``normed = residual * rsqrt(mean(residual^2) +
    eps) * weight`` computed in float32. Updates ``residual`` in place; returns (normed,
    residual). x, residual: [..., H]; weight: [H]."""
    residual.add_(x)
    r = residual.float()
    normed = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype), residual


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    dist.all_reduce(x, group=group)
    return add_rms_norm(x, residual, weight, eps)
