"""Time the two-level all-reduce against a flat torch.distributed all-reduce on the same nodes.

    # 4 GPUs of one host as 2 emulated nodes x 2 (NCCL over loopback sockets between them)
    tpcomm bench two-level --nproc 4 --ranks-per-node 2 -b 4K -e 256M \\
        --markdown benchmarks/results/gpu-h200x4-hierarchical-2x2.md
    # a real cluster: one process per GPU from torchrun, nodes from LOCAL_WORLD_SIZE
    torchrun --nnodes 2 --nproc-per-node 8 ... -m tpcomm bench two-level -b 4K -e 256M
    # CPU: 2 ranks as 2 nodes x 1, 4K .. 16M (about 20 s)
    tpcomm bench two-level --device cpu

(``python -m tpcomm.bench.two_level ARGS`` is the same as ``tpcomm bench two-level ARGS``.)

Each size is checked first (exact-sum inputs, two-level against flat, bitwise), then timed:
``--iters`` calls per repetition, the median of ``--reps`` repetitions per rank, the maximum over
ranks; CUDA events on the GPU (eagerly, or replaying a CUDA graph of the calls with ``--graph``),
the host clock on the CPU. Columns as in nccl-tests: busbw = algbw * 2(R-1)/R.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch
import torch.distributed as dist

from . import timing
from .output import columns, markdown_table, write_outputs

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _sizes(lo: int, hi: int, factor: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= factor
    return out


def run_rank(rank: int, world: int, args) -> list[dict] | None:
    from ..communicator import HierarchicalAllReduce
    from ..cli.progress import Progress
    from ..groups.launch import init_rank, no_multicast
    no_multicast()
    if args.emulate and args.ranks_per_node:
        # one NCCL "host" per emulated node, so NCCL crosses them over its network transport
        os.environ.setdefault("NCCL_HOSTID", f"tpcomm-fakenode{rank // args.ranks_per_node}")
    device = init_rank(args.device, rank)
    dtype = DTYPES[args.dtype]
    ar = HierarchicalAllReduce(device=device, local_world_size=args.ranks_per_node,
                               chunk_bytes=args.chunk_bytes)
    rows = []
    sizes = _sizes(args.minbytes, args.maxbytes, args.stepfactor)
    progress = Progress(2 * len(sizes), rank == 0 and not args.no_progress)
    try:
        for nbytes in sizes:
            rows.append(_measure_size(nbytes, ar, args, dtype, device, rank, progress))
    finally:
        progress.close()
    info = repr(ar)
    ar.close()
    dist.destroy_process_group()
    return (rows, info) if rank == 0 else None


def _measure_size(nbytes, ar, args, dtype, device, rank, progress) -> dict:
    """One row: check the size (two-level against flat, bitwise), then time both."""
    from .report import human_size
    from ..testing import exact
    n = max(1, nbytes // dtype.itemsize)
    x = exact(n, rank, dtype, 0, device=device)
    ref = x.clone()
    dist.all_reduce(ref)
    got = ar.all_reduce(x)
    wrong = torch.tensor([int((got != ref).sum())], device=device)
    dist.all_reduce(wrong)
    out = torch.empty_like(x)
    calls = {"two_level": lambda: ar.all_reduce(x, out=out),
             "flat": lambda: (out.copy_(x), dist.all_reduce(out))}
    times = {}
    for name, call in calls.items():
        progress.show(f"{human_size(nbytes)} {name}")
        for _ in range(args.warmup):
            call()
        graph = None
        if args.graph and device.type == "cuda":
            try:
                graph = timing.capture([call], args.iters, device)
            except Exception as e:  # a capture that fails is reported, the run goes on eagerly
                if rank == 0:
                    print(f"# {name} {nbytes} B: CUDA graph capture failed ({e}); eager",
                          file=sys.stderr)
        one_rep = graph.replay if graph is not None else timing.rotating([call], args.iters)
        try:
            us = timing.per_call_s(one_rep, args.iters, args.reps, device) * 1e6
        finally:
            if graph is not None:
                torch.cuda.synchronize(device)
                graph.reset()
        times[name] = timing.max_over_ranks(us, device)
        progress.advance()
    return {"nbytes": n * dtype.itemsize, "count": n, "wrong": int(wrong), **times}


def _bw(nbytes, us, world):
    alg = nbytes / (us * 1e3) if us > 0 else 0.0
    return alg, alg * 2 * (world - 1) / world


def format_table(rows, world, dtype, markdown=False) -> str:
    head = ["size (B)", "count", "type", "two-level (us)", "algbw (GB/s)", "busbw (GB/s)",
            "flat (us)", "busbw (GB/s)", "flat / two-level", "#wrong"]
    lines = []
    for r in rows:
        a1, b1 = _bw(r["nbytes"], r["two_level"], world)
        _, b2 = _bw(r["nbytes"], r["flat"], world)
        lines.append([str(r["nbytes"]), str(r["count"]), dtype, f"{r['two_level']:.1f}",
                      f"{a1:.2f}", f"{b1:.2f}", f"{r['flat']:.1f}", f"{b2:.2f}",
                      f"{r['flat'] / r['two_level']:.2f}", str(r["wrong"])])
    if markdown:
        return markdown_table(head, lines)
    return "\n".join(columns(head, lines, lead=("# ", "  ")))


def header(args, world, info) -> list[str]:
    dev = (torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available()
           else platform.processor() or platform.machine())
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else "-"
    return [f"two-level all-reduce vs flat torch.distributed, {world} ranks, {info}",
            f"device: {dev}; torch {torch.__version__}; NCCL {nccl}; "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}",
            ("emulated nodes on one host: NCCL_HOSTID per node, "
             + ", ".join(f"{k}={v}" for k, v in args.env.items()) if args.emulate
             else "nodes from the launch (torchrun)"),
            f"{'CUDA graph replays' if args.graph else 'eager'}, {args.iters} calls x "
            f"{args.reps} reps, median per rank, max over ranks",
            "command: " + " ".join(["tpcomm", *args.argv])]


# Default sweep per device: the GPU one is the recorded table's; on a CPU, 4K-256M over 4
# ranks took five minutes, 4K-16M over 2 ranks takes about 20 s.
DEFAULTS = {"cuda": {"nproc": 4, "maxbytes": "256M", "dtype": "bfloat16"},
            "cpu": {"nproc": 2, "maxbytes": "16M", "dtype": "float32"}}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``two-level`` under ``tpcomm bench``."""
    p = subparsers.add_parser(
        "two-level", help="the two-level all-reduce vs flat torch.distributed (emulated nodes)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return _add_args(p)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m tpcomm.bench.two_level`` (``tpcomm bench two-level``'s)."""
    p = argparse.ArgumentParser(prog="tpcomm bench two-level", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return _add_args(p)


def _add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .args import add_outputs, add_oversubscribe, positive_int
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="ranks to spawn when not under torchrun (default 4 on cuda, 2 on cpu)")
    add_oversubscribe(p)
    p.add_argument("--ranks-per-node", type=positive_int, default=None,
                   help="emulated ranks per node (default: TPCOMM_LOCAL_WORLD_SIZE / torchrun; "
                        "spawned ranks: half of them, i.e. 2 emulated nodes)")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("-b", "--minbytes", default="4K")
    p.add_argument("-e", "--maxbytes", default=None, help="default 256M on cuda, 16M on cpu")
    p.add_argument("-f", "--stepfactor", type=int, default=4)
    p.add_argument("--chunk-bytes", default=None, help="pipeline chunk (default: the model's)")
    p.add_argument("--iters", type=positive_int, default=20)
    p.add_argument("--reps", type=positive_int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--graph", action="store_true", help="replay CUDA graphs of the calls")
    add_outputs(p, progress="no progress bar on stderr")
    p.set_defaults(func=run, parser=p)
    return p


def _resolve(args) -> None:
    """Defaults and checks, before any rank starts (UsageError says what is wrong)."""
    from .args import check_outputs
    from ..cli.command import UsageError
    from ..groups.launch import check_cpu_ranks, under_torchrun
    from ..settings import parse_size
    d = DEFAULTS[args.device]
    try:
        args.minbytes = parse_size(args.minbytes)
        args.maxbytes = parse_size(args.maxbytes or d["maxbytes"])
        args.chunk_bytes = parse_size(args.chunk_bytes) if args.chunk_bytes else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not 1 <= args.minbytes <= args.maxbytes:
        raise UsageError(f"-b {args.minbytes} must be at least 1 and at most -e {args.maxbytes}")
    if args.stepfactor < 2:
        raise UsageError(f"-f must be at least 2, got {args.stepfactor}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    check_outputs(args)
    args.dtype = args.dtype or d["dtype"]
    args.torchrun = under_torchrun()
    if args.torchrun:
        return
    args.nproc = args.nproc or d["nproc"]
    if args.device == "cuda" and args.nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {args.nproc} ranks need {args.nproc} GPUs; "
                         f"{torch.cuda.device_count()} visible")
    if args.device == "cpu" and not args.oversubscribe:
        try:
            check_cpu_ranks(args.nproc, "--nproc")
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.ranks_per_node is None and args.nproc % 2 == 0:
        args.ranks_per_node = args.nproc // 2   # spawned ranks share a host: emulate 2 nodes


def run(args) -> int:
    _resolve(args)
    from ..groups.launch import NO_MULTICAST_ENV, spawn
    # what the ranks get: the arguments, without the parser and this function (not picklable)
    args = argparse.Namespace(**{k: v for k, v in vars(args).items()
                                 if k not in ("parser", "func")})
    if args.torchrun:
        args.emulate, args.env = False, {}
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        res = run_rank(rank, world, args)
    else:
        args.emulate = args.ranks_per_node is not None
        world = args.nproc
        env = {"NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1", **NO_MULTICAST_ENV,
               "TPCOMM_QUIET": "1"} if args.emulate else {}
        args.env = env
        res = spawn(run_rank, world, args, env=env, timeout_s=3600)[0]
    if res is None:
        return 0
    rows, info = res
    head = header(args, world, info)
    write_outputs(args, "\n".join("# " + h for h in head) + "\n"
                  + format_table(rows, world, args.dtype) + "\n",
                  doc={"header": head, "rows": rows},
                  markdown=lambda _plot: (f"# {head[0]}\n\n" + "\n".join(f"- {h}" for h in head[1:])
                                          + "\n\n" + format_table(rows, world, args.dtype,
                                                                  markdown=True) + "\n"))
    return 1 if any(r["wrong"] for r in rows) else 0


def main(argv=None) -> int:
    """``python -m tpcomm.bench.two_level``: the same as ``tpcomm bench two-level``."""
    from ..cli.command import execute
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = ["bench", "two-level", *argv]
    return execute(args, prog="tpcomm bench two-level")


if __name__ == "__main__":
    sys.exit(main())
