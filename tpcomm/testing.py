"""Exact-sum inputs and their expected results, shared by `tpcomm check`, the soak script and
the tests: small integers, so every sum is exact in every dtype and every reduction order, and a
result can be compared bitwise with a locally computed expectation."""
from __future__ import annotations

import torch


def exact(numel: int, rank: int, dtype: torch.dtype, salt: int = 0, device="cpu") -> torch.Tensor:
    """Rank ``rank``'s input: integers in [-8, 8], different for every rank below 17 (so an
    all_gather can tell the ranks apart); sums over up to 32 ranks stay exact even in bfloat16
    (whose integers are exact up to 256)."""
    i = torch.arange(numel, device=device, dtype=torch.int64)
    return ((i * 3 + rank * 5 + salt) % 17 - 8).to(dtype)


def expected_all_reduce(numel: int, world: int, dtype: torch.dtype, salt: int = 0,
                        device="cpu") -> torch.Tensor:
    return sum(exact(numel, r, torch.float64, salt, device) for r in range(world)).to(dtype)


def expected(op: str, numel: int, rank: int, world: int, dtype: torch.dtype, salt: int = 0,
             device="cpu") -> torch.Tensor:
    """What rank ``rank`` must get from ``op`` when every rank p passed ``exact(..., p, ...)``
    (numel is per-rank output elements for reduce_scatter, input elements otherwise)."""
    if op == "all_reduce":
        return expected_all_reduce(numel, world, dtype, salt, device)
    if op == "all_gather":
        return torch.cat([exact(numel, r, dtype, salt, device) for r in range(world)])
    if op == "reduce_scatter":
        full = expected_all_reduce(numel * world, world, dtype, salt, device)
        return full[rank * numel:(rank + 1) * numel]
    raise ValueError(f"unknown op {op!r}")


def op_input(op: str, numel: int, rank: int, world: int, dtype: torch.dtype, salt: int = 0,
             device="cpu") -> torch.Tensor:
    """The input matching :func:`expected` (reduce_scatter takes world * numel elements)."""
    return exact(numel * (world if op == "reduce_scatter" else 1), rank, dtype, salt, device)
