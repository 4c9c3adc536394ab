"""Tensor-parallel linear layers (Megatron sharding) and the sharding arithmetic behind them.

A TP sublayer is a column-parallel linear (input replicated, output split by rows of the
weight, no communication) followed by a row-parallel linear (input split, partial output on
every rank, one all-reduce). The all-reduce lives in exactly one place:
:meth:`RowParallelLinear.forward` / :meth:`RowParallelLinear.forward_add_rms_norm`. The
overlapped GEMM + collective ops will replace the "matmul, then ``comm.all_reduce``" there and
nowhere else: with ``overlap`` (default "auto") a large-M forward runs
:func:`tpcomm.ops.overlap.matmul_all_reduce` (chunked GEMM, each chunk's all-reduce overlapping the
next chunk's GEMM), and :meth:`ColumnParallelLinear.forward_all_gather` is the
sequence-parallel input path (:func:`tpcomm.ops.overlap.all_gather_matmul`).

Shape letters: W = world (TP) size, r = this rank, ``*_local`` = this rank's share.

At decode sizes (at most 16 rows) a linear may run the skinny GEMM instead of ``F.linear``
where its measured table says so (:mod:`tpcomm.models.skinny_linear`; ``TPCOMM_SKINNY_GEMM=0``:
never);
the all-reduce after a row-parallel GEMM is the same either way.

``comm`` is anything with the Communicator's interface: ``all_reduce_(x)``,
``all_reduce_add_rms_norm(x, residual, weight, eps)``, ``all_gather(x)`` (a
:class:`tpcomm.Communicator`, or :class:`tpcomm.models.comm.TorchDistComm` for NCCL / gloo).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..ops.overlap import all_gather_matmul, matmul_all_reduce, overlap_chunks
from ..reference import add_rms_norm
from .skinny_linear import linear, maybe_counters, maybe_linear


# ---------------------------------------------------------------- sharding arithmetic
def shard_range(size: int, world: int, rank: int, what: str = "dimension") -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s equal share of ``size`` (which W must divide)."""
    if size % world:
        raise ValueError(f"tensor parallelism over {world} ranks needs the {what} ({size}) to be "
                         f"divisible by {world}")
    per = size // world
    return rank * per, (rank + 1) * per


def kv_head_range(num_kv_heads: int, world: int, rank: int) -> tuple[int, int]:
    """The key/value heads rank ``rank`` holds (GQA).

    Split evenly when W divides the head count; when the head count divides W (fewer KV heads
    than ranks, e.g. 8 KV heads on 16 ranks) each head is replicated on W / heads consecutive
    ranks, as vLLM and Megatron do: rank r holds head r * heads // W.
    """
    if num_kv_heads % world == 0:
        return shard_range(num_kv_heads, world, rank, "number of key/value heads")
    if world % num_kv_heads == 0:
        h = rank * num_kv_heads // world
        return h, h + 1
    raise ValueError(f"{num_kv_heads} key/value heads cannot be spread over {world} ranks: one "
                     f"of the two must divide the other")


def padded_size(size: int, world: int) -> int:
    """``size`` rounded up to a multiple of W (the vocabulary of a vocab-parallel LM head)."""
    return -(-size // world) * world


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the arithmetic of ``tpcomm.reference.add_rms_norm`` (float32 inside)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


# ---------------------------------------------------------------- layers
class ColumnParallelLinear(nn.Module):
    """y_local = x @ W[rows of this rank]^T. No communication.

    x: [..., in_features], the same on every rank; y_local: [..., out_local].

    ``parts`` fuses several linears that read the same input (q/k/v, gate/up) into one GEMM:
    each part is split on its own, and this rank's weight is the concatenation of its share of
    every part (``[q_local; k_local; v_local]``). ``row_ranges`` gives the [start, stop) rows of
    each part explicitly (replicated KV heads); by default each part is split evenly.

    ``comm`` (optional) is only needed by :meth:`forward_all_gather`.
    """

    def __init__(self, in_features: int, out_features: int | Sequence[int], *, rank: int,
                 world: int, row_ranges: Sequence[tuple[int, int]] | None = None,
                 dtype=None, device=None, comm=None):
        super().__init__()
        self.comm = comm
        parts = [out_features] if isinstance(out_features, int) else list(out_features)
        if row_ranges is None:
            row_ranges = [shard_range(p, world, rank, "output size") for p in parts]
        if len(row_ranges) != len(parts):
            raise ValueError(f"{len(parts)} parts but {len(row_ranges)} row ranges")
        self.in_features, self.parts = in_features, parts
        self.row_ranges = [tuple(r) for r in row_ranges]
        self.out_local = sum(b - a for a, b in self.row_ranges)
        self.weight = nn.Parameter(torch.empty(self.out_local, in_features, dtype=dtype,
                                               device=device), requires_grad=False)
        self.skinny_counters = maybe_counters(self.out_local, device)   # the skinny GEMM's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.skinny_counters)

    def forward_swiglu(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of a [gate; up] layer in one skinny GEMM, [..., out_local / 2];
        None where its table has no entry for this size (the caller runs :meth:`forward`)."""
        return maybe_linear(x, self.weight, self.skinny_counters, swiglu=True)

    def forward_all_gather(self, x_shard: torch.Tensor, comm=None, *,
                           chunks: int | None = None) -> torch.Tensor:
        """Sequence-parallel input: y_local = all_gather(x_shard) @ W[rows of this rank]^T.

        x_shard: [m, ..., in_features], this rank's m rows of dim 0 (rank p holds rows
        [p*m, (p+1)*m) of the full input); returns [W*m, ..., out_local]. The gather of
        chunk i overlaps the GEMM of chunk i-1 (:func:`tpcomm.ops.overlap.all_gather_matmul`,
        ``chunks`` as there; ``comm`` defaults to the one given at construction).
        """
        comm = comm if comm is not None else self.comm
        if comm is None:
            raise ValueError("ColumnParallelLinear.forward_all_gather needs a comm (pass "
                             "comm= here or to the constructor)")
        x2 = x_shard.reshape(-1, self.in_features)
        y = all_gather_matmul(x2, self.weight.t(), comm, chunks=chunks)
        return y.view(-1, *x_shard.shape[1:-1], self.out_local)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, parts={self.parts}, rows={self.row_ranges}"


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W[:, columns of this rank]^T): the end of a TP sublayer.

    x_local: [..., in_local] (the output of a column-parallel layer); y: [..., out_features],
    the same on every rank.

    ``overlap``: "auto" (default) runs :func:`tpcomm.ops.overlap.matmul_all_reduce` when
    :func:`tpcomm.ops.overlap.overlap_chunks` picks more than one chunk for the call's shape (large
    M on CUDA; never on the CPU or at world 1), else matmul then one all-reduce; "off" always
    the latter; an int forces that many chunks.
    """

    def __init__(self, in_features: int, out_features: int, comm, *, rank: int, world: int,
                 dtype=None, device=None, overlap: str | int = "auto"):
        super().__init__()
        if overlap not in ("auto", "off") and (isinstance(overlap, bool)
                                                or not isinstance(overlap, int) or overlap < 1):
            raise ValueError(f"RowParallelLinear: overlap must be 'auto', 'off' or a positive "
                             f"int, got {overlap!r}")
        self.overlap = overlap
        self.world = world
        self.in_features, self.out_features = in_features, out_features
        self.col_range = shard_range(in_features, world, rank, "input size")
        self.comm = comm
        in_local = self.col_range[1] - self.col_range[0]
        self.weight = nn.Parameter(torch.empty(out_features, in_local, dtype=dtype,
                                               device=device), requires_grad=False)
        self.skinny_counters = maybe_counters(out_features, device)   # the skinny GEMM's

    def _linear(self, x_local: torch.Tensor) -> torch.Tensor:
        """This rank's partial product (the skinny GEMM where its table says so)."""
        return linear(x_local, self.weight, self.skinny_counters)

    def _chunks(self, x_local: torch.Tensor) -> int:
        """Row chunks of the overlapped path for this input (1: matmul, then all-reduce)."""
        if self.overlap == "off":
            return 1
        if self.overlap != "auto":
            return self.overlap
        rows = x_local.numel() // max(x_local.shape[-1], 1)
        return overlap_chunks("all_reduce", rows, self.weight.shape[1], self.out_features,
                              getattr(self.comm, "world_size", self.world), x_local.dtype,
                              x_local.device.type)

    def _overlapped(self, x_local: torch.Tensor, chunks: int) -> torch.Tensor:
        y = matmul_all_reduce(x_local.reshape(-1, x_local.shape[-1]), self.weight.t(),
                              self.comm, chunks=chunks)
        return y.view(*x_local.shape[:-1], self.out_features)

    def forward(self, x_local: torch.Tensor) -> torch.Tensor:
        """matmul, then all-reduce (in place); chunked and overlapped per ``overlap``."""
        chunks = self._chunks(x_local)
        if chunks > 1:
            return self._overlapped(x_local, chunks)
        return self.comm.all_reduce_(self._linear(x_local))

    def forward_add_rms_norm(self, x_local: torch.Tensor, residual: torch.Tensor,
                             norm_weight: torch.Tensor, eps: float, fused: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """matmul, all-reduce, ``residual += y`` (in place), RMSNorm of the new residual.

        Returns (normed, residual). ``fused``: one ``comm.all_reduce_add_rms_norm``; otherwise
        an all-reduce followed by a separate add and norm (the same arithmetic). When
        ``overlap`` picks several chunks: the overlapped matmul + all-reduce, then the epilogue.
        """
        chunks = self._chunks(x_local)
        if chunks > 1:
            return add_rms_norm(self._overlapped(x_local, chunks), residual, norm_weight, eps)
        y = self._linear(x_local)
        if fused:
            return self.comm.all_reduce_add_rms_norm(y, residual, norm_weight, eps)
        self.comm.all_reduce_(y)
        return add_rms_norm(y, residual, norm_weight, eps)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, cols={self.col_range}"
