"""The CPU Communicator's all_reduce hot path of git revision REV against this tree's, in ONE
process, blocks alternating (issue 16): the steady before / after figure on a shared machine.

``host_time_cpu.py --overhead`` starts a fresh process per tree and round; on the 2-core machine a
process lands in a fast or a 2x slower state (the same code, round to round), so its figures
need many rounds. Here one process (a world-1 gloo group) holds one Communicator and swaps
REV's ``_all_reduce_hot`` and ``_fast_entry`` (compiled from ``git show REV:tpcomm/communicator.py``
in this tree's module namespace; the instance is given the lock attributes the old methods use)
with this tree's, block by block, clearing the hot-path caches at each swap; blocks are timed by
the thread's CPU time (``time.thread_time_ns``: the time other jobs hold the core does not count).
A third column times the engine's call alone: ``y.copy_(x)`` at world 1 (nothing in place), the
stand-in engine's per-shape call with ``--stub`` (``host_time_cpu._stub``: world 2's decision,
no peer). Per call, us: min / p10 / median over the blocks, and p10 minus the engine's p10. A
process may land in a state ~1.5-2x slower throughout (seen on the 2-core machine): run it a few
times; the ratio holds in either state.

    python scripts/host_hot_path_ab.py [--rev main] [--stub] [--inplace] [--size 4096]
"""
from __future__ import annotations

import argparse
import ast
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _old_methods(rev: str, module) -> dict:
    """REV's ``_all_reduce_hot`` and ``_fast_entry``, compiled in ``module``'s namespace."""
    src = subprocess.run(["git", "-C", HERE, "show", f"{rev}:tpcomm/communicator.py"],
                         capture_output=True, text=True, check=True).stdout
    cls = next(n for n in ast.parse(src).body
               if isinstance(n, ast.ClassDef) and n.name == "Communicator")
    out = {}
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef) and fn.name in ("_all_reduce_hot", "_fast_entry"):
            ns: dict = {}
            exec(compile(textwrap.dedent(ast.get_source_segment(src, fn)), f"<{rev}>", "exec"),
                 module.__dict__, ns)
            out[fn.name] = ns[fn.name]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="main", help="the 'before' revision")
    ap.add_argument("--stub", action="store_true", help="a stand-in engine, world 2's decision")
    ap.add_argument("--inplace", action="store_true", help="all_reduce_(x), not all_reduce(x, out=y)")
    ap.add_argument("--size", type=int, default=4096, help="bytes, float32")
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--calls", type=int, default=2000, help="calls per block")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist
    sys.path.insert(0, os.path.dirname(HERE))
    import tpcomm
    import tpcomm.communicator as C
    from tpcomm.groups.launch import free_port
    sys.path.insert(0, HERE)
    from host_time_cpu import _stub

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{free_port()}")
    variants = {"before": _old_methods(args.rev, C),
                "after": {k: getattr(C.Communicator, k) for k in ("_all_reduce_hot", "_fast_entry")}}
    comm = tpcomm.Communicator()
    lock = threading.Lock()    # what REV's hot path takes (this tree's uses comm._free)
    comm._lock, comm._try_lock, comm._unlock = lock, lock.acquire, lock.release
    x = torch.ones(args.size // 4)
    y = x if args.inplace else torch.empty_like(x)
    if args.stub:
        _stub(comm, x)
        go = comm._backend.hot_all_reduce("one_shot", x.dtype, x.numel())
    ar, ar_, clock, n = comm.all_reduce, comm.all_reduce_, time.thread_time_ns, args.calls

    def comm_block() -> float:
        t0 = clock()
        if args.inplace:
            for _ in range(n):
                ar_(x)
        else:
            for _ in range(n):
                ar(x, out=y)
        return (clock() - t0) / n / 1e3

    def engine_block() -> float:
        t0 = clock()
        if args.stub:
            for _ in range(n):
                go(x, y)
        elif args.inplace:
            for _ in range(n):
                pass
        else:
            cp = y.copy_
            for _ in range(n):
                cp(x)
        return (clock() - t0) / n / 1e3

    res: dict = {"before": [], "after": [], "engine": []}
    for _ in range(args.blocks):
        for name, methods in variants.items():
            for k, f in methods.items():
                setattr(C.Communicator, k, f)
            comm._fast.clear()
            comm._fast_any.clear()
            for _ in range(50):    # the first call after a swap makes the entry again
                if args.inplace:
                    ar_(x)
                else:
                    ar(x, out=y)
            res[name].append(comm_block())
        res["engine"].append(engine_block())
    assert comm._all_reduce_hot(x, y, "auto") is y, "the calls did not take the hot path"
    form = "all_reduce_(x)" if args.inplace else "all_reduce(x, out=y)"
    print(f"{'stub engine, world 2 decision' if args.stub else 'world 1'}, {form}, "
          f"{args.size} B float32, {args.blocks} blocks x {n} calls, thread CPU us per call:")
    for name, v in res.items():
        v.sort()
        print(f"  {name:6s} min {v[0]:.2f}  p10 {v[len(v) // 10]:.2f}  "
              f"median {statistics.median(v):.2f}")
    e = res["engine"][len(res["engine"]) // 10]
    print(f"  above the engine (p10 - engine p10): before "
          f"{res['before'][len(res['before']) // 10] - e:.2f}, after "
          f"{res['after'][len(res['after']) // 10] - e:.2f}")
    comm.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
