"""The one timer of every benchmark (``tpcomm bench`` and its subcommands, scripts/gpu_timing.py).

Protocol of one figure, nccl-tests style:

    reps x { [cuda: synchronize] barrier; start; one repetition (iters calls); stop }
    per rank:   median over reps of (stop - start) / iters
    reported:   the maximum over ranks (max_over_ranks), the slowest rank's

Clocks: CUDA events on the GPU (a repetition may be eager calls or one CUDA-graph replay of
``iters`` captured calls, :func:`capture`), ``time.perf_counter`` on the CPU.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch
import torch.distributed as dist


def rotating(calls: Sequence[Callable[[], object]], iters: int) -> Callable[[], None]:
    """One repetition: ``iters`` calls, cycling through ``calls`` (inputs that rotate, so that
    no call reads what the previous one left in a cache)."""
    def one_rep():
        for i in range(iters):
            calls[i % len(calls)]()
    return one_rep


def capture(calls: Sequence[Callable[[], object]], iters: int,
            device: torch.device) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``iters`` rotating calls, the calls warmed on a side stream first (they
    must have run eagerly once already: a first call may compile). The caller replays it as
    one repetition and ``reset()``s it when done."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rotating(calls, iters)()
    graph.replay()
    return graph


def per_call_s(one_rep: Callable[[], object], iters: int, reps: int,
               device: torch.device, settle: Callable[[], object] | None = None) -> float:
    """Seconds per call on this rank: the median over ``reps`` repetitions (see the module
    docstring); every rank of the default group must call it alike (it holds barriers).
    ``settle`` (CPU only): one untimed call after each barrier, before the clock starts (the
    ranks leave a barrier at different times; the first call absorbs that)."""
    samples = []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            torch.cuda.synchronize(device)
            dist.barrier(device_ids=[device.index])
            start.record()
            one_rep()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e-3 / iters)
    else:
        for _ in range(reps):
            dist.barrier()
            if settle is not None:
                settle()
            t0 = time.perf_counter()
            one_rep()
            samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def max_over_ranks(value: float, device: torch.device | None = None) -> float:
    """The largest ``value`` over the ranks of the default group (collective)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
