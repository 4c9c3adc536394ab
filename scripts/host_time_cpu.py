"""Per-call host time of ``Communicator.all_reduce`` on the CPU engine (shared memory), for one
or several source trees of tpcomm, alternately, in one run (so that a shared, noisy machine
weighs on each tree alike).

Each round starts, for each tree in turn, ``--world`` fresh rank processes (gloo + tpcomm's
shared-memory engine) with that tree first on ``sys.path``; every rank times each of ``--calls``
calls with ``time.perf_counter_ns`` after ``--warmup`` calls, per size (float32); the figure of
a (tree, size, round) is the median per call, max over ranks. The summary is the median and the
minimum over rounds: on a machine shared with other jobs a round whose ranks lose their cores
is ten times slower (spinning waits), so the minimum is the steadier figure of the code itself.
``p10``: the 10th percentile of the calls (max over ranks, median over rounds), the calls that no
other job interrupted.

    python scripts/host_time_cpu.py                                  # this tree
    python scripts/host_time_cpu.py --trees BASE_TREE,. --rounds 3   # before/after, alternately
    python scripts/host_time_cpu.py --trees BASE_TREE,. --overhead --world 1   # see below

``--overhead``: the Communicator's cost above its engine. Every rank alternates blocks of
``--block`` calls of ``Communicator.all_reduce(x, out=y)`` (``--inplace``:
``Communicator.all_reduce_(x)``) with blocks of the call that the Communicator's hot path makes
of its engine, made directly: the engine's per-shape callable
``comm._backend.hot_all_reduce(algorithm, dtype, numel)(x, y)`` (an engine without one:
``comm._backend.all_reduce(x, y, algorithm)``); world 1, which has no engine: ``y.copy_(x)``
(in place: nothing, an empty loop). Each loop makes exactly one call per iteration, as the
Communicator's does; a block's time / ``--block`` is one sample, and the figure is the median
over the blocks of (Communicator - engine), max over ranks; ``lo``: the 10th percentile of the
Communicator's blocks minus that of the engine's (max over ranks, median over rounds), the
steadier figure where the engine's own time varies (world 2, 64 KiB). ``--clock thread``
times the blocks by the rank's thread CPU time instead of the wall clock. ``--stub`` (with
``--world 1``): one process whose Communicator is given a stand-in engine, a world size of 2 and
world 2's decision ("auto": one_shot in one round), the engine's per-shape call doing nothing:
the world-2 hot path without a peer to wait for, which a shared machine's scheduling cannot
blur. (Until 2026-12-03 the world-2 baseline was ``eng.all_reduce(x, y, name)`` through a
closure: a slower call than the hot path's ``hot_all_reduce`` one, plus a Python frame, 0.4-0.6 us
more per call at 4 KiB (p10 2.26-2.54 us against 1.68-1.92, blocks alternating, 2 ranks, load
0.9): the figure understated the Communicator's cost by that much. World 1's baseline went
through a closure too: ~0.05 us.)
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RANK_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(args: argparse.Namespace) -> None:
    """One rank: time the calls, print one JSON line {size_bytes: median ns per call}."""
    import torch
    import torch.distributed as dist

    import tpcomm
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world,
                            init_method=f"tcp://127.0.0.1:{args.port}")
    out = {"tpcomm": os.path.dirname(tpcomm.__file__)}
    with tpcomm.Communicator() as comm:
        out["engine"] = "stub" if args.stub else comm.backend_name
        if args.overhead:
            out.update(_overhead(comm, args))
            dist.destroy_process_group()
            print("RESULT " + json.dumps(out), flush=True)
            return
        for size in args.sizes:
            x = torch.ones(size // 4, dtype=torch.float32)
            y = torch.empty_like(x)
            for _ in range(args.warmup):
                comm.all_reduce(x, out=y)
            dist.barrier()
            ns = []
            clock = time.perf_counter_ns
            for _ in range(args.calls):
                t0 = clock()
                comm.all_reduce(x, out=y)
                ns.append(clock() - t0)
            assert float(y[0]) == args.world, "wrong sum"
            ns.sort()
            out[str(size)] = statistics.median(ns)
            out[f"{size}_p10"] = ns[len(ns) // 10]
    dist.destroy_process_group()
    print("RESULT " + json.dumps(out), flush=True)


class _StubEngine:
    """``--stub``: an engine whose per-shape call does nothing."""
    name, device_type, broken, p2p_check = "stub", "cpu", None, None

    @staticmethod
    def supports(op):
        return op == "all_reduce"

    def round_limit(self, op, name, dtype):
        return 1 << 30

    def hot_all_reduce(self, algorithm, dtype, numel):
        def go(x, out):
            pass
        return go

    def all_reduce(self, x, out, algorithm, *, total=-1, offset=0):
        pass

    def close(self):
        pass


def _stub(comm, x) -> None:
    """Give ``comm`` (a world of one) the stand-in engine, a world size of 2 and the decision
    the native engine's world 2 makes for ``x`` ("auto": one_shot, one round)."""
    from tpcomm.algorithms import choice
    comm._backend = _StubEngine()
    comm.world_size = 2
    comm._decisions[("all_reduce", x.nbytes, x.dtype, "auto", False)] = (
        choice("one_shot", chunk=1 << 30), comm._stats[("all_reduce", "one_shot")], True, True)


def _overhead(comm, args: argparse.Namespace) -> dict:
    """{size: median over blocks of Communicator - engine ns per call, size_comm, size_engine}:
    blocks of the two calls alternate (see the module docstring)."""
    import torch
    import torch.distributed as dist
    clock = time.thread_time_ns if args.clock == "thread" else time.perf_counter_ns
    out = {}
    for size in args.sizes:
        x = torch.ones(size // 4, dtype=torch.float32)
        y = x if args.inplace else torch.empty_like(x)
        if args.stub:
            _stub(comm, x)
        eng = comm._backend
        if eng is None:
            go = None if args.inplace else y.copy_
        else:
            comm.all_reduce(x, out=y)
            choice = next(iter(comm._decisions.values()))[0]
            name = getattr(choice, "name", choice)    # a Choice, or the name before it existed
            hot = getattr(eng, "hot_all_reduce", None)
            go = hot(name, x.dtype, x.numel()) if hot is not None else None
            if go is None:
                go = lambda x, y, _ar=eng.all_reduce: _ar(x, y, name)  # noqa: E731
        ar = comm.all_reduce_ if args.inplace else comm.all_reduce
        for _ in range(args.warmup):
            if args.inplace:
                ar(x)
            else:
                ar(x, out=y)
            if go is not None:
                go(x) if eng is None else go(x, y)
        dist.barrier()
        k, diffs, cs, es = args.block, [], [], []
        for _ in range(max(1, args.calls // k)):
            t0 = clock()
            if args.inplace:
                for _ in range(k):
                    ar(x)
            else:
                for _ in range(k):
                    ar(x, out=y)
            t1 = clock()
            if go is None:          # world 1 in place: the Communicator has nothing to do
                for _ in range(k):
                    pass
            elif eng is None:       # world 1: y.copy_(x)
                for _ in range(k):
                    go(x)
            else:
                for _ in range(k):
                    go(x, y)
            t2 = clock()
            cs.append((t1 - t0) / k)
            es.append((t2 - t1) / k)
            diffs.append(cs[-1] - es[-1])
        if args.inplace and not args.stub:   # x doubled at every call (world 2): one sum
            comm.all_reduce(torch.ones_like(x), out=y)
        assert args.stub or float(y[0]) == comm.world_size, "wrong sum"
        out[str(size)] = statistics.median(diffs)
        out[f"{size}_p10"] = sorted(diffs)[len(diffs) // 10]
        # the blocks that no other job interrupted, on each side: p10 of each minus p10 of the
        # other (a difference of single blocks goes negative where an engine block was hit)
        out[f"{size}_lo"] = sorted(cs)[len(cs) // 10] - sorted(es)[len(es) // 10]
        out[f"{size}_comm"] = statistics.median(cs)
        out[f"{size}_engine"] = statistics.median(es)
    return out


def _run_tree(tree: str, args: argparse.Namespace) -> dict:
    """Start the ranks for one tree; {size: median us per call, max over ranks}."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="1")
    port = _free_port()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--world", str(args.world),
           "--port", str(port), "--calls", str(args.calls), "--warmup", str(args.warmup),
           "--sizes", ",".join(map(str, args.sizes)), "--block", str(args.block)]
    if args.overhead:
        cmd.append("--overhead")
    if args.inplace:
        cmd.append("--inplace")
    cmd += ["--clock", args.clock]
    if args.stub:
        cmd.append("--stub")
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], env=env, cwd=os.path.abspath(tree),
                              stdout=subprocess.PIPE, text=True) for r in range(args.world)]
    results = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=RANK_TIMEOUT_S)
            if p.returncode != 0:
                raise RuntimeError(f"rank exited with {p.returncode} for tree {tree}")
            line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
            results.append(json.loads(line[len("RESULT "):]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    engine = {r["engine"] for r in results}
    extra = {}
    if args.overhead:
        extra = {f"{s}_{k}": max(r[f"{s}_{k}"] for r in results) / 1e3
                 for s in args.sizes for k in ("comm", "engine", "lo")}
    return {"engine": ",".join(sorted(engine)), "tpcomm": results[0]["tpcomm"], **extra,
            **{s: max(r[str(s)] for r in results) / 1e3 for s in args.sizes},
            **{f"{s}_p10": max(r[f"{s}_p10"] for r in results) / 1e3 for s in args.sizes}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", default=os.path.dirname(HERE),
                    help="comma-separated source trees of tpcomm (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--sizes", default="4096,65536", help="bytes, comma-separated")
    ap.add_argument("--overhead", action="store_true",
                    help="time the Communicator against its engine (see above)")
    ap.add_argument("--inplace", action="store_true",
                    help="--overhead of all_reduce_(x) instead of all_reduce(x, out=y)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="--overhead: time blocks by the wall clock (perf_counter) or by the "
                         "rank's thread CPU time (not counting the time other jobs hold its "
                         "core: the steadier figure at world 1 on a shared machine; at world 2 "
                         "a wait for a descheduled peer spins, and counts, either way)")
    ap.add_argument("--stub", action="store_true",
                    help="--overhead at --world 1 with a stand-in engine as world 2's (see above)")
    ap.add_argument("--block", type=int, default=50, help="calls per block (--overhead)")
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.stub and (args.world != 1 or not args.overhead):
        ap.error("--stub is an --overhead mode of one process: --world 1")
    if args.worker:
        _worker(args)
        return 0
    trees = args.trees.split(",")
    runs = {t: [] for t in trees}
    for rnd in range(args.rounds):
        for t in trees:
            r = _run_tree(t, args)
            runs[t].append(r)
            print(f"round {rnd} {t} ({r['engine']}): " + "  ".join(
                f"{s} B {r[s]:.2f} us (p10 {r[f'{s}_p10']:.2f})" + (
                    f" [comm {r[f'{s}_comm']:.2f}, engine {r[f'{s}_engine']:.2f}, "
                    f"lo {r[f'{s}_lo']:.2f}]"
                    if args.overhead else "") for s in args.sizes), flush=True)
    what = ("median of blocks of (Communicator - engine) per call" if args.overhead
            else f"median of {args.calls} calls")
    form = "all_reduce_(x)" if args.inplace else "all_reduce(x, out=y)"
    print(f"summary: median over {args.rounds} rounds of ({what}, max over {args.world} "
          f"ranks), us per {form} call, float32")
    summary = {}
    for t in trees:
        summary[t] = {s: {"median": statistics.median(r[s] for r in runs[t]),
                          "min": min(r[s] for r in runs[t]),
                          "p10": statistics.median(r[f"{s}_p10"] for r in runs[t]),
                          **({"lo": statistics.median(r[f"{s}_lo"] for r in runs[t])}
                             if args.overhead else {})}
                      for s in args.sizes}
        print(f"  {t}: " + "  ".join(f"{s} B median {v['median']:.2f} us, min {v['min']:.2f} "
                                     f"us, p10 {v['p10']:.2f} us" + (
                                         f", lo {v['lo']:.2f} us" if "lo" in v else "")
                                     for s, v in summary[t].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "summary": summary, "calls": args.calls,
                       "world": args.world}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
