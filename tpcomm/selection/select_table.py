"""Measured algorithm table for the GPU backend (pure: no CUDA, no Triton).

Written by scripts/make_select_table.py from scripts/gpu_timing.py runs (bf16, us per
call: CUDA-graph replays up to 32 MiB, eager above; tpcomm and NCCL in the same run):
    world 2: NVIDIA H200, 2026-11-22 (timing-h200x4-w2-2026-11-22.json)
    world 4: NVIDIA H200, 2026-11-22 (timing-h200x4-w4-2026-11-22.json)
A size uses the decision of the smallest measured size at or above it; tpcomm's
algorithm wins only where it was under 0.97 x NCCL's time, else "torch" (NCCL);
above 8 MiB always NCCL: the graph timings there ran from an
L2-resident input and the benchmark's eager 16 MiB run (world 2) lost to NCCL.
Thresholds are in bytes and apply to every dtype (measured in bf16; the kernels move
bytes, so float32/float16 behave alike). World sizes not measured go to NCCL.
"""
from __future__ import annotations

import torch

# world -> [(upper bound in bytes, exclusive; None = no limit, graph algorithm, eager algorithm)]
ALL_REDUCE = {
    2: [
        # 2 KiB (graph): one_shot 3.0, ring 4.6, two_shot 4.8, nccl 9.1 us
        # 8 KiB (graph): one_shot 3.6, ring 4.9, two_shot 5.2, nccl 9.7 us
        # 32 KiB (graph): one_shot 3.8, two_shot 5.2, ring 5.4, nccl 10.1 us
        # 128 KiB (graph): one_shot 4.1, two_shot 5.4, ring 5.9, nccl 10.3 us
        # 256 KiB (graph): one_shot 4.5, two_shot 5.5, ring 5.9, nccl 11.7 us
        # 512 KiB (graph): one_shot 5.0, two_shot 6.3, ring 7.0, nccl 13.3 us
        (524289, 'one_shot', None),
        # 1 MiB (graph): two_shot 7.2, one_shot 8.0, ring 8.6, nccl 17.2 us
        # 2 MiB (graph): two_shot 10.4, one_shot 11.8, ring 13.3, nccl 30.2 us
        # 4 MiB (graph): two_shot 17.5, one_shot 19.6, ring 23.6, nccl 35.0 us
        # 8 MiB (graph): two_shot 32.8, one_shot 36.7, ring 50.1, nccl 48.6 us
        (8388609, 'two_shot', None),
        # 16 MiB (graph): two_shot 70.2, ring 102.2, nccl 79.7 us (above 8 MiB: NCCL, see top)
        # 32 MiB (graph): two_shot 141.5, ring 205.1, nccl 144.5 us
        # 64 MiB (eager): two_shot 432.9, ring 691.6, nccl 266.1 us
        # 128 MiB (eager): two_shot 898.5, ring 1276.5, nccl 475.5 us
        (None, 'torch', None),
    ],
    4: [
        # 2 KiB (graph): one_shot 4.1, two_shot 6.3, ring 9.2, nccl 12.9 us
        # 8 KiB (graph): one_shot 5.1, two_shot 7.3, ring 10.5, nccl 14.0 us
        # 32 KiB (graph): one_shot 5.6, two_shot 7.7, ring 11.3, nccl 14.7 us
        # 128 KiB (graph): one_shot 6.2, two_shot 8.4, ring 12.9, nccl 15.7 us
        # 256 KiB (graph): one_shot 8.0, two_shot 8.7, ring 12.6, nccl 15.2 us
        (262145, 'one_shot', None),
        # 512 KiB (graph): two_shot 8.9, one_shot 9.9, ring 12.7, nccl 19.0 us
        # 1 MiB (graph): two_shot 11.4, ring 14.1, one_shot 17.0, nccl 22.3 us
        # 2 MiB (graph): two_shot 15.8, ring 18.6, one_shot 25.2, nccl 30.2 us
        # 4 MiB (graph): two_shot 30.6, ring 30.9, one_shot 45.3, nccl 42.1 us
        (4194305, 'two_shot', None),
        # 8 MiB (graph): two_shot 60.8, ring 63.7, nccl 60.2 us
        # 16 MiB (graph): two_shot 123.5, ring 135.9, nccl 99.0 us
        # 32 MiB (graph): two_shot 248.7, ring 262.6, nccl 176.6 us
        # 64 MiB (eager): two_shot 520.8, ring 740.6, nccl 335.1 us
        # 128 MiB (eager): two_shot 1033.6, ring 1339.8, nccl 631.9 us
        (None, 'torch', None),
    ],
}

# world -> [(upper bound in bytes, exclusive; None = no limit, graph algorithm, eager algorithm)]
REDUCE_SCATTER = {
    2: [
        # 8 KiB: direct 3.9, nccl 8.8 us
        # 64 KiB: direct 4.3, nccl 9.2 us
        # 512 KiB: direct 4.3, nccl 10.7 us
        # 4 MiB: direct 10.7, nccl 25.6 us
        (4194305, 'direct', None),
        # 32 MiB: direct 84.8, nccl 95.9 us (above 8 MiB: NCCL, see top)
        (None, 'torch', None),
    ],
    4: [
        # 8 KiB: direct 4.2, nccl 10.0 us
        # 64 KiB: direct 4.7, nccl 10.7 us
        # 512 KiB: direct 5.5, nccl 12.2 us
        # 4 MiB: direct 15.6, nccl 35.1 us
        (4194305, 'direct', None),
        # 32 MiB: direct 111.1, nccl 107.2 us
        (None, 'torch', None),
    ],
}

# world -> [(upper bound in bytes, exclusive; None = no limit, graph algorithm, eager algorithm)]
ALL_GATHER = {
    2: [
        # 4 KiB in (8 KiB out): direct 3.1, nccl 8.9 us
        # 32 KiB in (64 KiB out): direct 3.4, nccl 9.2 us
        # 256 KiB in (512 KiB out): direct 4.1, nccl 11.2 us
        # 2 MiB in (4 MiB out): direct 10.0, nccl 28.3 us
        (2097153, 'direct', None),
        # 16 MiB in (32 MiB out): direct 74.7, nccl 93.9 us (above 8 MiB: NCCL, see top)
        (None, 'torch', None),
    ],
    4: [
        # 2 KiB in (8 KiB out): direct 4.4, nccl 10.5 us
        # 16 KiB in (64 KiB out): direct 4.9, nccl 11.7 us
        # 128 KiB in (512 KiB out): direct 7.0, nccl 13.6 us
        # 1 MiB in (4 MiB out): direct 15.2, nccl 38.3 us
        (1048577, 'direct', None),
        # 8 MiB in (32 MiB out): direct 109.3, nccl 109.7 us
        (None, 'torch', None),
    ],
}


def _lookup(table, nbytes: int, graph: bool) -> str:
    for bound, in_graph, eager in table:
        if bound is None or nbytes < bound:
            if graph:
                return in_graph
            if eager is None:   # not measured eagerly
                return in_graph if EAGER_UNMEASURED == "graph" else EAGER_UNMEASURED
            return eager
    return "torch"


# The eager column (calls outside CUDA-graph capture). Eager calls are host-bound: before
# issue 16 the Communicator, the backend and the Triton launch cost more host time per call
# than NCCL's eager path. tpcomm bench, world 2, eager, 2026-11-22
# (benchmarks/results/gpu-h200x2-2026-11-22.md): tpcomm 53.8 / 56.5 / 52.9 / 54.6 / 60.6 /
# 78.2 / 80.0 us against NCCL 33.8 / 27.9 / 25.4 / 35.1 / 29.5 / 42.1 / 50.1 us at 2K / 8K /
# 32K / 128K / 512K / 2M / 8M. The lean launch path (kernels/launch.py) and the Communicator's
# GPU hot path cut that host time; until eager timings on several GPUs exist (the multi-GPU
# issue), every eager entry is None (not measured) and goes where EAGER_UNMEASURED says.
# THE SWITCH, one line: EAGER_UNMEASURED = "graph" runs eager calls on the graph column's
# algorithm (tpcomm's kernels wherever they won in graphs); "torch" keeps them on NCCL.
# Measured eager entries (a third element other than None) are used as they are.
EAGER_UNMEASURED = "torch"


def select_cuda(op: str, nbytes: int, dtype: torch.dtype, world_size: int,
                graph: bool = True) -> str:
    """The GPU algorithm for one call; ``"torch"`` (NCCL) wherever ours was not measured
    faster. ``graph``: whether the call is being captured into a CUDA graph (the graph
    column; False: the eager column)."""
    tables = {"all_reduce": ALL_REDUCE, "reduce_scatter": REDUCE_SCATTER,
              "all_gather": ALL_GATHER}[op]
    table = tables.get(world_size)
    return "torch" if table is None else _lookup(table, nbytes, graph)
