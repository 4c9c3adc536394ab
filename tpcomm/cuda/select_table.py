"""Measured algorithm table for the GPU backend (pure: no CUDA, no Triton).

PROVISIONAL: to be replaced by the measured table.
"""
from __future__ import annotations

import torch

# world -> [(upper bound in bytes, exclusive, algorithm), ...], the last bound None (no limit)
ALL_REDUCE = {
    2: [(512 << 10, "one_shot"), (64 << 20, "two_shot"), (None, "torch")],
    4: [(256 << 10, "one_shot"), (64 << 20, "two_shot"), (None, "torch")],
}
REDUCE_SCATTER = {2: 16 << 20, 4: 16 << 20}   # "direct" below, torch from it on
ALL_GATHER = {2: 16 << 20, 4: 16 << 20}


def select_cuda(op: str, nbytes: int, dtype: torch.dtype, world_size: int) -> str:
    """The GPU algorithm for one call; ``"torch"`` (NCCL) where ours is not measured faster."""
    if op == "all_reduce":
        table = ALL_REDUCE.get(world_size)
        if table is None:
            return "torch"
        for bound, algorithm in table:
            if bound is None or nbytes < bound:
                return algorithm
        return "torch"
    limits = REDUCE_SCATTER if op == "reduce_scatter" else ALL_GATHER
    limit = limits.get(world_size)
    return "direct" if limit is not None and nbytes < limit else "torch"
