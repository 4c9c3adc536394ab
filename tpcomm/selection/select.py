"""Algorithm selection: a pure function of (op, nbytes, dtype, world size, device/topology).

No tensors, no process groups, no environment: everything it needs is an argument, so it is
tested on a machine without devices. Every threshold names the measurement behind it.

The names (ops, algorithms, what each device supports) are in ``tpcomm.algorithms``.
"""
from __future__ import annotations

import dataclasses

import torch

from ..algorithms import MECHANISMS, OPS, SUPPORTED, Choice, qualified
from ..algorithms import check as _check
from .select_table import select_cuda

FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# dtypes torch.distributed reduces but tpcomm's own paths do not: routed to the fallback
FALLBACK_DTYPES = (torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8)
# dtypes no backend moves: gloo refuses int16 in every collective ("Invalid scalar type") and
# NCCL has no 16-bit integer type; the Communicator raises TypeError before communicating
UNSUPPORTED_DTYPES = {torch.int16: "gloo and NCCL have no int16 collectives; cast to int32"}
ALGORITHMS = SUPPORTED   # device -> op -> algorithms (tpcomm.algorithms.SUPPORTED)


@dataclasses.dataclass(frozen=True)
class Topology:
    """What selection needs to know of where the ranks are."""
    device_type: str = "cpu"     # "cpu" or "cuda"
    p2p: bool = True             # every pair of local ranks can map each other's memory
    nnodes: int = 1              # nodes the group spans


# CPU, all_reduce. World 2: one_shot at every size. Measured on the 2-core CI machine, float32,
# 2026-11-22 (one run, the machine shared with other jobs): 4 KiB 288 vs 804 us, 1 MiB 712 vs
# 1279 us, 16 MiB 12.4 vs 14.6 ms (one_shot vs two_shot): with two ranks two_shot moves as many
# bytes as one_shot and adds a round. World > 2: two_shot from 512 KiB, by byte count (one_shot
# reads R·S bytes per rank, two_shot about 2·S); not measured here, for want of cores.
CPU_TWO_SHOT_MIN_BYTES = 512 << 10
CPU_TWO_SHOT_MIN_WORLD = 3


# Groups that span nodes, all_reduce: tpcomm's two-level algorithm (tpcomm.multinode.hierarchical) from
# TWO_LEVEL_MIN_BYTES up to TWO_LEVEL_MAX_BYTES, flat torch.distributed (NCCL) elsewhere.
# Lower bound, measured: 4 x H200 as 2 emulated nodes x 2 (NCCL over loopback sockets between
# them), bf16, eager, 2026-11-22 (benchmarks/results/gpu-h200x4-2026-11-22-session.md): flat /
# two-level = 0.23, 0.30, 0.48 at 4 KiB, 16 KiB, 64 KiB (three calls and their host time cost
# more than one), 1.20 at 256 KiB, 1.35 at 1 MiB, 1.70 at 4 MiB, 1.87 at 64 MiB.
# Upper bound, predicted: the cost model (`tpcomm plan`, fitted on the H200 tables of
# benchmarks/results/baselines-h200x4-2026-11-22.md; one 400 Gb/s NIC per GPU, 5 us per hop),
# 8 GPUs per node on 2-16 nodes, has NCCL ahead from 4 MiB (4-16 nodes) or 16 MiB (2 nodes);
# the socket emulation cannot say otherwise.
TWO_LEVEL_MIN_BYTES = 256 << 10
TWO_LEVEL_MAX_BYTES = 2 << 20


def select_algorithm(op: str, nbytes: int, dtype: torch.dtype, world_size: int,
                     topology: Topology = Topology(), graph: bool = True) -> str:
    """The algorithm tpcomm uses for one call; ``"torch"`` means torch.distributed.

    ``graph``: the call is being captured into a CUDA graph (GPU only). Eager GPU calls are
    bound by host time, where NCCL's path is cheaper than ours (see cuda/select_table.py).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if world_size == 1:
        return "local"
    if topology.nnodes > 1 and dtype in FAST_DTYPES:
        return ("two_level" if op == "all_reduce"
                and TWO_LEVEL_MIN_BYTES <= nbytes <= TWO_LEVEL_MAX_BYTES else "torch")
    if dtype not in FAST_DTYPES or topology.nnodes > 1 or not topology.p2p:
        return "torch"
    if topology.device_type == "cpu":
        if op != "all_reduce":
            return "direct"
        if world_size < CPU_TWO_SHOT_MIN_WORLD or nbytes < CPU_TWO_SHOT_MIN_BYTES:
            return "one_shot"
        return "two_shot"
    if topology.device_type == "cuda":
        return select_cuda(op, nbytes, dtype, world_size, graph)
    return "torch"


# GPU one_shot, mechanism left to tpcomm: push while the whole call fits one push round (one
# kernel, its flags travel in the data: no barrier round), else pull (rounds staged through a
# 4 MiB slot). Push was the faster kernel at every size measured up to 512 KiB, e.g. world 4,
# CUDA graphs, 4 x H200, 2026-11-22 (selection/cost_data_tpcomm.py): 2 KiB 4.10 vs 6.00 us,
# 128 KiB 6.24 vs 8.96 us, 512 KiB 9.9 vs 11.47 us; at 1 MiB they tie (16.99 vs 16.63). A push
# round holds 2 x min(max_bytes, 8 MiB) / world bytes per rank (cuda/p2p_collectives.Layout),
# above the sizes where the table picks one_shot, so "auto" calls push unless max_bytes is small.
def select_mechanism(op: str, algorithm: str, numel: int, device_type: str,
                     push_round: int) -> str | None:
    """The mechanism of ``algorithm`` for a call of ``numel`` elements, where the device has
    several and the caller did not force one (``"one_shot/push"``); None where it has one.
    ``push_round``: elements of one round of the push mechanism (the engine's
    ``round_limit``)."""
    mechanisms = MECHANISMS.get((device_type, op, algorithm))
    if not mechanisms:
        return None
    return "push" if numel <= push_round else "pull"


def engine_choice(op: str, algorithm: str, mechanism: str | None, numel: int,
                  dtype: torch.dtype, engine) -> Choice:
    """The :class:`~tpcomm.algorithms.Choice` of a call that ``engine`` (a
    :class:`tpcomm.engine.Engine`) runs: the mechanism (forced, else :func:`select_mechanism`)
    and the engine's round size for that name (the step of the one chunk loop). ``numel``:
    the call's elements (reduce_scatter: of the output)."""
    if mechanism is None and MECHANISMS.get((engine.device_type, op, algorithm)):
        push = engine.round_limit(op, qualified(algorithm, "push"), dtype)
        mechanism = select_mechanism(op, algorithm, numel, engine.device_type, push)
    name = qualified(algorithm, mechanism)
    return Choice(name, algorithm, mechanism, engine.round_limit(op, name, dtype), "")


def fallback_reason(op: str, dtype: torch.dtype, world_size: int, topology: Topology,
                    graph: bool = True) -> str:
    """Why :func:`select_algorithm` sent a call to torch.distributed (for the log and stats)."""
    if dtype not in FAST_DTYPES:
        return f"dtype {str(dtype).removeprefix('torch.')} has no tpcomm kernel"
    if topology.nnodes > 1:
        return f"the group spans {topology.nnodes} nodes"
    if not topology.p2p:
        return "no peer-to-peer access between the ranks"
    if topology.device_type == "cuda" and not graph:
        return ("eager GPU calls go to NCCL, whose host path is cheaper; tpcomm's kernels run "
                "in CUDA graphs")
    return f"torch.distributed is faster for this {op} size"


def check_algorithm(op: str, algorithm: str, device_type: str) -> None:
    """Raise a clear ValueError for an algorithm that does not exist for this op and device
    (a qualified name, ``"one_shot/push"``, forces the mechanism where the device has two)."""
    _check(op, algorithm, device_type)
