"""Soak: many collectives of random sizes, ops, dtypes and algorithms, each checked exactly.

    python scripts/soak.py --device cpu -n 2 --ops 2000
    python scripts/soak.py --device cuda -n 4 --ops 100000 --algorithm one_shot [--graph]

Inputs are small integers (every sum exact), so each result is compared bitwise with the sum
computed locally; a wrong element anywhere counts the op as wrong. With --graph (CUDA) a batch of
calls is captured once and replayed with new inputs written between replays. Prints one JSON line
per rank-0 run: ops, wrong, per-op counts, seconds. Exit 1 on any wrong result.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch
import torch.distributed as dist

from tpcomm.testing import exact, expected, expected_all_reduce, op_input

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def plan(seed: int, count: int, max_numel: int, ops: list[str], algorithms: list[str]):
    rng = random.Random(seed)  # the same plan on every rank
    for i in range(count):
        op = rng.choice(ops)
        # sizes spread over orders of magnitude, odd ones included
        numel = min(max_numel, int(10 ** rng.uniform(0, 6.2)))
        yield i, op, numel, rng.choice(DTYPES), rng.choice(algorithms)


def check(op, out, numel, rank, world, dtype, salt, device) -> bool:
    return torch.equal(out, expected(op, numel, rank, world, dtype, salt, device))


def out_of_time(args, t_start, device) -> bool:
    """Collective: every rank stops at the same call once any rank is past --seconds."""
    if not args.seconds:
        return False
    late = torch.tensor([time.time() - t_start > args.seconds], dtype=torch.int32, device=device)
    dist.all_reduce(late, op=dist.ReduceOp.MAX)
    return bool(late.item())


def run_eager(comm, args, rank, world, device):
    algos = args.algorithm.split(",")
    ops = args.op.split(",")
    counts, wrong = {}, 0
    t_start = time.time()
    for i, op, numel, dtype, algo in plan(args.seed, args.ops, args.max_numel, ops, algos):
        if i % 1000 == 999 and out_of_time(args, t_start, device):
            break
        if op != "all_reduce":
            algo = "auto"
        x = op_input(op, numel, rank, world, dtype, i, device)
        out = getattr(comm, op)(x, algorithm=algo)
        ok = check(op, out, numel, rank, world, dtype, i, device)
        wrong += not ok
        key = f"{op}/{algo}"
        counts[key] = counts.get(key, 0) + 1
        if args.progress and rank == 0 and i % max(1, args.ops // 20) == 0:
            print(f"  {i}/{args.ops} ops, {wrong} wrong", file=sys.stderr, flush=True)
    return counts, wrong


def run_graph(comm, args, rank, world, device):
    """Capture BATCH all-reduces of fixed sizes once; replay with new inputs each time."""
    batch = 16
    rng = random.Random(args.seed)
    sizes = [min(args.max_numel, int(10 ** rng.uniform(0, 6.2))) for _ in range(batch)]
    dtypes = [rng.choice(DTYPES) for _ in range(batch)]
    xs = [torch.empty(n, dtype=d, device=device) for n, d in zip(sizes, dtypes)]
    outs = [torch.empty_like(x) for x in xs]
    algo = args.algorithm.split(",")[0]

    def step():
        for x, o in zip(xs, outs):
            comm.all_reduce(x, out=o, algorithm=algo)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside capture (compiles kernels)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):  # one stream for the Communicator's calls
        step()
    if args.progress and rank == 0:
        print(f"  captured {batch} all-reduces ({algo}), sizes {sizes}", file=sys.stderr, flush=True)
    wrong, replays = 0, max(1, args.ops // batch)
    t_start = time.time()
    for rep in range(replays):
        if rep % 50 == 49 and out_of_time(args, t_start, device):
            replays = rep
            break
        for k, x in enumerate(xs):
            x.copy_(exact(x.numel(), rank, x.dtype, rep * batch + k, device))
            outs[k].fill_(float("nan"))
        g.replay()
        for k, o in enumerate(outs):
            wrong += not torch.equal(o, expected_all_reduce(o.numel(), world, o.dtype, rep * batch + k, device))
        if args.progress and rank == 0 and rep % max(1, replays // 20) == 0:
            print(f"  replay {rep}/{replays}, {wrong} wrong", file=sys.stderr, flush=True)
    return {f"all_reduce/{algo}/graph": replays * batch}, wrong


def worker(rank, world, args):
    import tpcomm
    from tpcomm.groups.launch import init_rank
    device = init_rank(args.device, rank)
    t0 = time.time()
    with tpcomm.Communicator(device=device, timeout_s=args.timeout_s) as comm:
        runner = run_graph if args.graph else run_eager
        counts, wrong = runner(comm, args, rank, world, device)
        fallbacks = comm.stats()["fallbacks"]
    total = torch.tensor([wrong], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    dist.destroy_process_group()
    return {"rank": rank, "ops": sum(counts.values()), "wrong_all_ranks": int(total.item()),
            "counts": counts, "fallbacks": fallbacks, "seconds": round(time.time() - t0, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("-n", "--nranks", type=int, default=2)
    p.add_argument("--ops", type=int, default=2000, help="collectives per rank")
    p.add_argument("--op", default="all_reduce,reduce_scatter,all_gather")
    p.add_argument("--algorithm", default="auto", help="comma list, drawn at random per call")
    p.add_argument("--graph", action="store_true", help="CUDA graph replays (cuda only)")
    p.add_argument("--max-numel", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--seconds", type=float, default=0,
                   help="stop early, on every rank at the same call, after this many seconds")
    args = p.parse_args(argv)
    if args.graph and args.device != "cuda":
        p.error("--graph needs --device cuda")
    from tpcomm.groups.launch import spawn, under_torchrun
    if under_torchrun():
        results = [worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)]
    else:
        results = spawn(worker, args.nranks, args, env=ENV, timeout_s=24 * 3600)
    print(json.dumps(results[0]))
    return 1 if results[0]["wrong_all_ranks"] else 0


if __name__ == "__main__":
    sys.exit(main())
