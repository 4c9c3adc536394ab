"""What every rank of ``tpcomm bench`` does: set up, then for each size and contender check one
call and time many.

Per (size, contender), on every rank:

1. Buffers: inputs rotate over up to ``MAX_ROTATE`` buffers (``ROTATE_BYTES`` in all) so that
   sizes that fit in a cache are not timed from data a previous call left there; every buffer is
   filled with the exact-sum pattern, so no garbage (NaN, denormals) slows the arithmetic.
2. Check: poison the output with NaN (all_reduce runs in place, so its input is its output),
   run one call, compare with the result computed locally; the wrong elements are counted.
   Inputs are ``(i + rank) % 17``: every sum of up to 16 ranks is an integer <= 256, exact in
   float32, float16 and bfloat16 whatever the order, and every rank's data differs from every
   other's, so all_gather's placement is checked too.
3. Time: ``warmup`` calls, then ``reps`` repetitions of ``iters`` calls, each started right
   after a barrier; CPU: time.perf_counter; GPU: CUDA events, and with ``--graph`` sizes up to
   ``GRAPH_MAX_BYTES`` are captured as ``iters`` calls in a CUDA graph that is replayed.
   The time of a size is the median repetition on each rank, then the maximum over ranks.

CPU ranks use ``max(1, cores // local ranks)`` torch threads each, so that ranks spawned on one
machine do not fight over its cores; this applies to every contender alike.
"""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..groups.launch import no_multicast, spawn, under_torchrun, usable_cores
from . import meta as meta_mod
from . import contenders_cpu, timing
from .contenders import IN_PLACE, MPI_CONTENDERS, NORM_OP, Contender, Context, make_contender
from ..cli.progress import Progress
from .report import Row, human_size

GRAPH_MAX_BYTES = 8 << 20   # --graph: CUDA-graph replays up to this size, eager above
ROTATE_BYTES = 64 << 20     # twice a 32 MiB L3: 4 rotating 16 MiB inputs do not fit in it
MAX_ROTATE = 4
PATTERN_MOD = 17            # inputs (i + rank) % 17: see the module docstring
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    op: str
    dtype: str
    device: str                 # "cpu" or "cuda"
    world: int
    contenders: tuple[str, ...]
    sizes: tuple[int, ...]      # bytes, already multiples of what the op needs
    iters: int
    warmup: int
    reps: int
    algorithm: str              # tpcomm's algorithm, "auto" unless forced
    graph: bool
    progress: bool
    command: str
    timeout_s: float
    hidden: int = 8192          # H of all_reduce_add_rms_norm's rows


class Measured(NamedTuple):
    """One (size, contender) on one rank."""
    mode: str
    algo: str
    seconds: float
    wrong: int


def run(config: BenchConfig) -> dict:
    """Run the sweep: in this process under torchrun, else in ``config.world`` spawned ranks.

    Returns ``{"meta": dict | None, "rows": [Row]}`` (meta on rank 0 only).
    """
    mpi = [b for b in config.contenders if b in MPI_CONTENDERS]
    if mpi and under_torchrun():
        raise ValueError(f"{', '.join(mpi)} start their own MPI job: run tpcomm bench without "
                         f"torchrun to compare with them")
    in_ranks = dataclasses.replace(config, contenders=tuple(b for b in config.contenders
                                                          if b not in mpi))
    if under_torchrun():
        return rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), in_ranks)
    result = spawn(rank_main, config.world, in_ranks, timeout_s=config.timeout_s)[0]
    for name in mpi:   # after the ranks are gone, so the two never share the cores
        describe, rows = contenders_cpu.run_mpi(name, config.world, config,
                                                (ROTATE_BYTES, MAX_ROTATE, PATTERN_MOD))
        result["meta"]["backends"][name] = describe
        result["rows"] += [Row(backend=name, op=config.op, dtype=config.dtype, mode="eager",
                               algo="-", **r) for r in rows]
    return result


def rank_main(rank: int, world: int, config: BenchConfig) -> dict:
    """One rank of the benchmark (the function :func:`run` spawns)."""
    no_multicast()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if config.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, usable_cores() // local_world))
        dist.init_process_group("gloo")
    try:
        return _sweep(rank, world, device, config)
    finally:
        dist.destroy_process_group()


def _sweep(rank: int, world: int, device: torch.device, config: BenchConfig) -> dict:
    ctx = Context(rank, world, device, config.algorithm, config.hidden)
    progress = Progress(len(config.sizes) * len(config.contenders), config.progress and rank == 0)
    contenders: list[Contender] = []
    measured: dict[tuple[str, int], Measured] = {}
    try:
        for name in config.contenders:
            contenders.append(make_contender(name, ctx))
        for nbytes in config.sizes:
            for b in contenders:
                progress.show(f"{config.op} {human_size(nbytes)} {b.name}")
                measured[(b.name, nbytes)] = _measure(b, nbytes, ctx, config)
                progress.advance()
        descriptions = {b.name: b.describe() for b in contenders}
    finally:
        progress.close()
        for b in contenders:
            b.close()
    times = torch.tensor([m.seconds for m in measured.values()], dtype=torch.float64)
    wrong = torch.tensor([m.wrong for m in measured.values()], dtype=torch.int64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    dist.all_reduce(wrong, op=dist.ReduceOp.SUM)
    itemsize = DTYPES[config.dtype].itemsize
    rows = [Row(backend=name, op=config.op, dtype=config.dtype, nbytes=nbytes,
                count=nbytes // itemsize, mode=m.mode, algo=m.algo, time_us=t * 1e6, wrong=w)
            for ((name, nbytes), m), t, w in zip(measured.items(), times.tolist(), wrong.tolist())]
    meta = _meta(device, world, config, descriptions) if rank == 0 else None
    return {"meta": meta, "rows": rows}


def _meta(device, world, config, descriptions) -> dict:
    info = meta_mod.system_info(device, torch.get_num_threads())
    if config.op == NORM_OP:
        info.update(hidden=config.hidden)
    info.update(op=config.op, dtype=config.dtype, world_size=world, device=config.device,
                command=config.command, backends=descriptions,
                timing={"iters": config.iters, "warmup": config.warmup, "reps": config.reps,
                        "method": _timing_method(config)})
    return info


def _timing_method(config: BenchConfig) -> str:
    if config.device == "cpu":
        clock = "time.perf_counter"
    elif config.graph:
        clock = (f"CUDA events; up to {human_size(GRAPH_MAX_BYTES)} a CUDA graph of the "
                 f"{config.iters} calls is replayed, eager above")
    else:
        clock = "CUDA events, eager"
    after = "a barrier and one untimed call" if config.device == "cpu" else "a barrier"
    return (f"{config.warmup} warm-up calls, then {config.reps} x {config.iters} calls after "
            f"{after} ({clock}); median repetition, max over ranks; inputs rotate over up to "
            f"{MAX_ROTATE} buffers ({human_size(ROTATE_BYTES)} in all)")


# ---------------------------------------------------------------- one size, one contender
def counts(op: str, nbytes: int, itemsize: int, world: int) -> tuple[int, int]:
    """(input numel, output numel) of one call whose whole buffer is ``nbytes``."""
    total = nbytes // itemsize
    if op in IN_PLACE:
        return total, total
    if op == "reduce_scatter":
        return total, total // world
    return total // world, total


def _measure(contender: Contender, nbytes: int, ctx: Context, config: BenchConfig) -> Measured:
    """Check one call, then time many, on this rank."""
    dtype = DTYPES[config.dtype]
    numel_in, numel_out = counts(config.op, nbytes, dtype.itemsize, ctx.world)
    nbuf = max(1, min(MAX_ROTATE, ROTATE_BYTES // max(nbytes, 1)))
    pairs = [contender.buffers(config.op, numel_in, numel_out, dtype) for _ in range(nbuf)]
    src = _pattern(0, numel_in, ctx.rank, ctx.device).to(dtype)
    for inp, _ in pairs:
        inp.copy_(src)
    calls = [contender.make_call(config.op, inp, out) for inp, out in pairs]

    inp, out = pairs[0]
    if out is not inp:
        out.fill_(float("nan"))
    algo = contender.run_once(calls[0])
    expected = _expected(config.op, ctx, numel_in).to(dtype)
    wrong = int((out.view(-1) != expected).sum().item())

    for i in range(config.warmup):
        calls[i % nbuf]()
    graph = config.graph and nbytes <= GRAPH_MAX_BYTES
    if graph and ctx.device.type == "cuda":
        g = timing.capture(calls, config.iters, ctx.device)
        try:
            seconds = timing.per_call_s(g.replay, config.iters, config.reps, ctx.device)
        finally:
            torch.cuda.synchronize(ctx.device)
            g.reset()
    else:
        # CPU: one untimed call after each barrier (the ranks leave it at different times)
        seconds = timing.per_call_s(timing.rotating(calls, config.iters), config.iters,
                                    config.reps, ctx.device, settle=calls[0])
    return Measured("graph" if graph else "eager", algo, seconds, wrong)


def _pattern(start: int, stop: int, rank: int, device) -> torch.Tensor:
    """Elements [start, stop) of rank ``rank``'s input, as int64."""
    return (torch.arange(start, stop, device=device) + rank) % PATTERN_MOD


def _expected(op: str, ctx: Context, numel_in: int) -> torch.Tensor:
    """This rank's correct output (int64), computed locally."""
    ranks = range(ctx.world)
    if op in IN_PLACE:   # all_reduce_add_rms_norm: x itself is reduced in place
        return sum(_pattern(0, numel_in, r, ctx.device) for r in ranks)
    if op == "reduce_scatter":
        c = numel_in // ctx.world
        lo = ctx.rank * c
        return sum(_pattern(lo, lo + c, r, ctx.device) for r in ranks)
    return torch.cat([_pattern(0, numel_in, r, ctx.device) for r in ranks])
