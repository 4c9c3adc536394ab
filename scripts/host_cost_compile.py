"""Host cost of tpcomm's torch.compile support on the eager path, on the CPU, in one run.

The Communicator's methods check ``torch.compiler.is_dynamo_compiling()`` first (to emit the
registered op while torch.compile traces); eagerly they run their direct path. This measures,
per call:

- the check alone;
- ``comm.all_reduce(x)`` (the eager path, the check included);
- the same call through the dispatcher, ``torch.ops.tpcomm.all_reduce(x, comm.handle, "auto")``
  (what an eager call would cost if it went through the registered op);

at world 1 (the "local" path: one copy, where any overhead shows most) and on 2 ranks (the
shared-memory engine), 1024 float32 elements, median of ``--reps`` repetitions of ``--calls``
calls (max over ranks).

    python scripts/host_cost_compile.py [--reps 7] [--calls 2000] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402


def _per_call_us(fn, calls: int, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def _measure(comm, calls: int, reps: int) -> dict:
    x = torch.ones(1024)
    op = torch.ops.tpcomm.all_reduce
    handle = comm.handle
    return {"comm.all_reduce": _per_call_us(lambda: comm.all_reduce(x), calls, reps),
            "torch.ops.tpcomm.all_reduce": _per_call_us(lambda: op(x, handle, "auto"), calls,
                                                        reps)}


def _rank(rank, world, calls, reps):
    import torch.distributed as dist

    import tpcomm
    from tpcomm.groups.launch import init_rank
    init_rank("cpu", rank, 1)
    with tpcomm.Communicator() as comm:
        dist.barrier()
        res = _measure(comm, calls, reps)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json")
    args = ap.parse_args()
    from tpcomm.groups.launch import spawn
    check = timeit.Timer("f()", globals={"f": torch.compiler.is_dynamo_compiling})
    n = 200_000
    check_ns = min(check.repeat(5, n)) / n * 1e9
    rows = {"is_dynamo_compiling() check": {1: check_ns / 1e3, 2: check_ns / 1e3}}
    for world in (1, 2):
        per_rank = spawn(_rank, world, args.calls, args.reps, timeout_s=300)
        for k in per_rank[0]:
            rows.setdefault(k, {})[world] = max(r[k] for r in per_rank)
    print(f"# host us per call, CPU, 1024 float32, torch {torch.__version__}, "
          f"{os.cpu_count()} cores")
    print(f"{'what':<32} {'world 1':>9} {'2 ranks (shm)':>14}")
    for k, v in rows.items():
        print(f"{k:<32} {v[1]:>9.3f} {v[2]:>14.3f}")
    d1 = rows["torch.ops.tpcomm.all_reduce"][1] - rows["comm.all_reduce"][1]
    print(f"the dispatcher would add {d1:.2f} us per eager call at world 1; the check costs "
          f"{check_ns:.0f} ns")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows_us": rows, "check_ns": check_ns, "torch": torch.__version__}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
