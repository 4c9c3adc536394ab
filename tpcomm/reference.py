"""torch.distributed versions of every op: the fallback path, the tests' oracle, the benchmarks'
baseline. Same signatures as the fast paths: (input, out, group) with ``out`` preallocated.

Shapes: ``all_reduce``: out like x. ``reduce_scatter``: x is [R*m, ...], out [m, ...], rank r
gets the sum of rows [r*m, (r+1)*m). ``all_gather``: x is [m, ...], out [R*m, ...].
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed the *_tensor collectives to *_single (the old names warn); torch 2.11, on
# the GPU machines, has only the old ones
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce(x: torch.Tensor, out: torch.Tensor, group=None) -> torch.Tensor:
    if out.data_ptr() != x.data_ptr():
        out.copy_(x)
    dist.all_reduce(out, group=group)
    return out


def reduce_scatter(x: torch.Tensor, out: torch.Tensor, group=None) -> torch.Tensor:
    _reduce_scatter(out, x, group=group)
    return out


def all_gather(x: torch.Tensor, out: torch.Tensor, group=None) -> torch.Tensor:
    _all_gather(out, x, group=group)
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
