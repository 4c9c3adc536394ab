"""Development timing of every GPU all-reduce variant against NCCL and torch symm_mem.

    python scripts/gpu_timing.py --world 4 --json OUT.json [--dtype bfloat16]

Not the project's benchmark (that is ``tpcomm bench``): this times each of tpcomm's mechanisms
(one_shot_push, one_shot_pull, two_shot, ring), which the benchmark cannot force individually,
so that the selection table can be filled in. Per size: graph replays (a graph of ITERS
out-of-place calls, median of REPS replays) up to 32 MiB, eager calls above; every variant's
result is checked against NCCL before it is timed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import tpcomm  # noqa: E402
from tpcomm.bench import timing  # noqa: E402
from tpcomm.groups.launch import spawn  # noqa: E402
from tpcomm.testing import exact  # noqa: E402

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
       "NVSHMEM_DISABLE_NVLS": "1", "PYTHONUNBUFFERED": "1"}
SIZES = [2 << 10, 8 << 10, 32 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20,
         4 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20, 128 << 20]
RS_AG_SIZES = [8 << 10, 64 << 10, 512 << 10, 4 << 20, 32 << 20]
GRAPH_MAX = 32 << 20
ITERS, REPS = 20, 15


def _time_graph(fn):
    """us per call: replays of a CUDA graph of ITERS calls, median of REPS (tpcomm.bench.timing)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    for _ in range(3):
        fn()
    g = timing.capture([fn], ITERS, dev)
    try:
        return timing.per_call_s(g.replay, ITERS, REPS, dev) * 1e6
    finally:
        torch.cuda.synchronize(dev)
        g.reset()


def _time_eager(fn, iters=10):
    """us per call: ``iters`` eager calls, median of 5 repetitions (tpcomm.bench.timing)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    for _ in range(3):
        fn()
    return timing.per_call_s(timing.rotating([fn], iters), iters, 5, dev) * 1e6


def _worker(rank, world, dtype_name, sizes):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    dev = torch.device("cuda", rank)
    dtype = getattr(torch, dtype_name)
    comm = tpcomm.Communicator(max_bytes=32 << 20)
    back = comm._backend
    import torch.distributed._symmetric_memory as symm_mem
    group_name = dist.group.WORLD.group_name
    rows = []
    for nbytes in sizes:
        n = nbytes // dtype.itemsize
        x = exact(n, rank, dtype, 1, device=dev)
        ref = x.clone()
        dist.all_reduce(ref)
        out = torch.empty_like(x)
        row = {"bytes": nbytes}
        timer = _time_graph if nbytes <= GRAPH_MAX else _time_eager
        row["mode"] = "graph" if nbytes <= GRAPH_MAX else "eager"
        variants = {
            "one_shot_push": nbytes <= (back.layout.one_shot_push_max(dtype.itemsize)
                                        * dtype.itemsize),
            "one_shot_pull": nbytes <= (8 << 20),
            "two_shot": True,
            "ring": True,
        }
        for algo, use in variants.items():
            if not use:
                continue
            out.fill_(float("nan"))
            back.all_reduce(x, out, algo)
            torch.cuda.synchronize()
            if not torch.equal(out, ref):
                row[algo + "_wrong"] = int((out != ref).sum())
                continue
            row[algo] = timer(lambda: back.all_reduce(x, out, algo))
        if nbytes >= (1 << 20):   # larger tiles (more bytes in flight per block)?
            for v in (2, 4):
                back.vecs["two_shot"] = v
                out.fill_(float("nan"))
                back.all_reduce(x, out, "two_shot")
                torch.cuda.synchronize()
                if torch.equal(out, ref):
                    row[f"two_shot_v{v}"] = timer(lambda: back.all_reduce(x, out, "two_shot"))
                else:
                    row[f"two_shot_v{v}_wrong"] = int((out != ref).sum())
            back.vecs["two_shot"] = 1
        y = x.clone()
        row["nccl"] = timer(lambda: dist.all_reduce(y))
        if nbytes <= (32 << 20):
            try:
                buf = symm_mem.empty(n, dtype=dtype, device=dev)
                symm_mem.rendezvous(buf, group_name)
                buf.copy_(x)
                o2 = torch.empty_like(buf)
                row["symm_one_shot"] = timer(
                    lambda: torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", group_name, o2))
                row["symm_two_shot"] = timer(
                    lambda: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group_name))
                del buf
            except Exception as e:  # noqa: BLE001
                row["symm_error"] = f"{type(e).__name__}: {str(e)[:100]}"
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    for op in ("reduce_scatter", "all_gather"):
        for nbytes in RS_AG_SIZES:
            c = nbytes // dtype.itemsize // world        # elements per rank
            big = exact(world * c, rank, dtype, 2, device=dev)
            small = exact(c, rank, dtype, 3, device=dev)
            o_small, o_big = torch.empty_like(small), torch.empty_like(big)
            if op == "reduce_scatter":
                ours = lambda: back.reduce_scatter(big.view(world, c), o_small)  # noqa: E731
                nccl = lambda: dist.reduce_scatter_tensor(o_small, big)  # noqa: E731
                res = o_small
            else:
                ours = lambda: back.all_gather(small, o_big.view(world, c))  # noqa: E731
                nccl = lambda: dist.all_gather_into_tensor(o_big, small)  # noqa: E731
                res = o_big
            nccl()
            want = res.clone()
            res.fill_(float("nan"))
            ours()
            torch.cuda.synchronize()
            row = {"op": op, "bytes": nbytes}
            timer = _time_graph if nbytes <= GRAPH_MAX else _time_eager
            if torch.equal(res, want):
                row["direct"] = timer(ours)
            else:
                row["direct_wrong"] = int((res != want).sum())
            row["nccl"] = timer(nccl)
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    back.check(sync=True)
    comm.close()
    dist.destroy_process_group()
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=torch.cuda.device_count())
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json")
    p.add_argument("--max", type=int, default=128 << 20)
    args = p.parse_args()
    sizes = [s for s in SIZES if s <= args.max]
    rows = spawn(_worker, args.world, args.dtype, sizes, env=ENV, timeout_s=540)[0]
    algos = ["one_shot_push", "one_shot_pull", "two_shot", "ring", "nccl", "symm_one_shot",
             "symm_two_shot", "two_shot_v2", "two_shot_v4"]
    print(f"world {args.world} {args.dtype}, us per call (graph replays <= 32 MiB, eager above)")
    print(f"{'bytes':>10} " + " ".join(f"{a:>13}" for a in algos) + "  best")
    for r in rows:
        if "op" in r:
            d, c = r.get("direct"), r.get("nccl")
            print(f"{r['op']:>15} {r['bytes']:>10}  direct {d if d is None else round(d, 2)}  "
                  f"nccl {c if c is None else round(c, 2)}")
            continue
        vals = {a: r.get(a) for a in algos}
        ours = {a: v for a, v in vals.items() if v is not None and a in algos[:4]}
        best = min(ours, key=ours.get) if ours else "-"
        print(f"{r['bytes']:>10} " + " ".join(f"{v:13.2f}" if v is not None else f"{'-':>13}"
                                             for v in vals.values()) + f"  {best}"
              + (f" ({vals['nccl'] / ours[best]:.2f}x nccl)" if ours and vals['nccl'] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"world": args.world, "dtype": args.dtype, "rows": rows,
                       "date": datetime.date.today().isoformat(),
                       "device": torch.cuda.get_device_name(0)}, f, indent=1)


if __name__ == "__main__":
    main()
