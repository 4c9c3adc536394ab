"""``tpcomm bench host``: host microseconds per call of tpcomm's ops next to bare launches.

    tpcomm bench host                         # cpu: 2 ranks (CI smoke test, seconds)
    tpcomm bench host --device cuda           # one GPU: launches, NCCL, symm_mem, tpcomm
    tpcomm bench host --device cuda --json host.json --markdown host.md

An eager collective on a GPU is bound by host time: the GPU finishes a small all-reduce in a few
microseconds, Python takes longer to ask for it (issue 16). Every row is timed the same way:
``--iters`` calls queued back to back, one synchronization at the end, host seconds per call
(perf_counter around the queueing, and around queueing + sync), the median of ``--reps``
repetitions, every row in the same run. Ratios are against rows of the same run: the bare
one-argument Triton launch through its dispatcher (``x 1-arg dispatcher``) and the 16-argument
kernel through its compiled launcher (``x 16-arg launcher``).

Rows on a GPU (world 1, one process; a group of one over NCCL):

- ``torch.add`` of 1024 elements (out= given): a torch op's host cost;
- an empty one-argument Triton kernel: through ``kernel[grid](...)`` (dispatcher), through its
  ``CompiledKernel.run`` with the tensor, and through tpcomm's lean path (``kernels/launch.py``,
  a raw pointer); the same for a 16-argument kernel (4 pointers, 8 int64 addresses, 4 ints);
- torch ``symm_mem.one_shot_all_reduce`` and NCCL ``all_reduce`` at world 1;
- tpcomm ``Communicator.all_reduce`` at world 1: the default (``local``: a copy), and the kernel
  path: a world-1 Communicator whose engine is the GPU engine over one emulated rank
  (``cuda/emulated.py``), ``algorithm="one_shot"`` (the push kernel at these sizes: the
  Communicator's choice is ``one_shot/push``), next to that engine called directly with that
  choice: the difference is the Communicator's own cost;
- tpcomm's GPU engine over 2 emulated ranks on one GPU (each rank its own stream), per rank
  call: one_shot/push, one_shot/pull, two_shot, ring; and the loop's stream switch alone.

Rows on a CPU (2 ranks, each also in a group of one): ``torch.add``, tpcomm
``Communicator.all_reduce`` at world 1 (local) and world 2 (shared memory), gloo at world 1 and
2; the slowest rank's figure.

Results are not checked here (the launches are the point); the GPU script
``scripts/gpu_host_path.py`` checks the lean path bitwise against the dispatcher first.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from typing import Callable

import torch

from .args import add_sub_benchmark, check_outputs, positive_int, resolve_device
from .output import markdown_table, text_table, write_outputs
from .report import human_size

ALGOS = ("one_shot/push", "one_shot/pull", "two_shot", "ring")   # tpcomm.algorithms' names
BASE_1 = "triton 1-arg, dispatcher"
BASE_16 = "triton 16-arg, CompiledKernel.run"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``host`` under ``tpcomm bench``."""
    p = add_sub_benchmark(
        subparsers, "host", help="host us per call: tpcomm's ops next to a bare Triton launch, a "
                                 "torch op, NCCL / gloo and symm_mem",
        description=__doc__, func=main)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--sizes", default="4K,64K,256K",
                   help="all-reduce sizes in bytes, comma-separated (default 4K,64K,256K)")
    p.add_argument("--iters", type=positive_int, help="calls queued per repetition (default "
                   "200 cuda, 100 cpu)")
    p.add_argument("--reps", type=positive_int, default=7, help="repetitions (median reported)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds the run may take")
    p.add_argument("--json", metavar="FILE", help="every figure and the header as JSON")
    p.add_argument("--markdown", metavar="FILE.md", help="header and table as a results file")
    return p


# ---------------------------------------------------------------- timing
def time_calls(fn: Callable[[], object], iters: int, reps: int, sync: Callable[[], None],
               before: Callable[[], None] | None = None) -> dict:
    """Median over ``reps`` of host us per call: queueing only, and queueing + one sync."""
    for _ in range(3):
        fn()
    sync()
    queued, total = [], []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        queued.append((t1 - t0) / iters * 1e6)
        total.append((t2 - t0) / iters * 1e6)
    return {"host_us": statistics.median(queued), "with_sync_us": statistics.median(total),
            "spread_us": max(queued) - min(queued)}


def _row(rows: list, what: str, nbytes: int | None, fn, iters, reps, sync, calls: int = 1,
         before=None) -> None:
    """Time ``fn`` (``calls`` calls per invocation) into ``rows``; a failure is a row too."""
    try:
        t = time_calls(fn, iters, reps, sync, before)
        rows.append({"what": what, "nbytes": nbytes, "host_us": t["host_us"] / calls,
                     "with_sync_us": t["with_sync_us"] / calls})
    except Exception as e:  # noqa: BLE001 - one row that cannot run does not stop the table
        rows.append({"what": what, "nbytes": nbytes, "na": f"{type(e).__name__}: {e}"[:200]})


# ---------------------------------------------------------------- GPU rows
def gpu_rows(sizes: list[int], iters: int, reps: int) -> list[dict]:
    """Every GPU row, in this process (a group of one: call after init_process_group)."""
    import torch.distributed as dist

    from ..communicator import Communicator
    from ..kernels import launch_probe
    from ..kernels.launch import LeanKernel
    from ..cuda.emulated import make_emulated_group

    dev = torch.device("cuda", torch.cuda.current_device())
    sync = torch.cuda.synchronize
    rows: list[dict] = []
    a, b, c = (torch.ones(1024, device=dev) for _ in range(3))
    _row(rows, "torch.add, 1024 elements", None, lambda: torch.add(a, b, out=c), iters, reps,
         sync)

    # bare launches
    x = torch.zeros(16, device=dev)
    ck1 = launch_probe.empty1(x)
    stream = torch.cuda.current_stream().cuda_stream
    _row(rows, BASE_1, None, lambda: launch_probe.empty1(x), iters, reps, sync)
    run1, f1, md1 = ck1.run, ck1.function, ck1.packed_metadata
    _row(rows, "triton 1-arg, CompiledKernel.run", None,
         lambda: run1(1, 1, 1, stream, f1, md1, None, None, None, x), iters, reps, sync)
    lk1 = LeanKernel(launch_probe._empty1_kernel, 1, call=("x_ptr",), fixed={}, constexprs={},
                     num_warps=1, device=dev.index)
    _row(rows, "triton 1-arg, tpcomm lean", None, lambda: lk1.launch(x), iters, reps, sync)
    ps = tuple(torch.zeros(16, device=dev) for _ in range(4))
    addrs = tuple(p.data_ptr() + 4096 * i for i, p in enumerate(ps * 2))
    ck16 = launch_probe.args16(ps, addrs, 4096, 64, 0)
    _row(rows, "triton 16-arg, dispatcher", None,
         lambda: launch_probe.args16(ps, addrs, 4096, 64, 0), iters, reps, sync)
    run16, f16, md16 = ck16.run, ck16.function, ck16.packed_metadata
    _row(rows, BASE_16, None,
         lambda: run16(1, 1, 1, stream, f16, md16, None, None, None, *ps, *addrs, 4096, 64, 0, 0),
         iters, reps, sync)
    names = ("p0", "p1", "p2", "p3", "a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7")
    lk16 = LeanKernel(launch_probe._args16_kernel, 1, call=("p0", "p1", "n"),
                      fixed=dict(zip(names[2:], ps[2:] + addrs), stride=64, rank=0, flag=0),
                      constexprs={}, num_warps=1, device=dev.index)
    _row(rows, "triton 16-arg, tpcomm lean (3 bound per call)", None,
         lambda: lk16.launch(ps[0], ps[1], 4096), iters, reps, sync)

    # torch.distributed at world 1
    for nbytes in sizes:
        t = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=dev)
        _row(rows, "NCCL all_reduce, world 1", nbytes, lambda: dist.all_reduce(t), iters, reps,
             sync)
        _symm_row(rows, nbytes, dev, iters, reps)

    # tpcomm at world 1: local, and the kernel path through one emulated rank
    comm = Communicator(device=dev)
    (eng,), _ = make_emulated_group(1, comm.max_bytes, _grid(dev), device=dev)
    try:
        for nbytes in sizes:
            xs = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=dev)
            out = torch.empty_like(xs)
            _row(rows, "tpcomm Communicator.all_reduce, world 1 (local copy)", nbytes,
                 lambda: comm.all_reduce(xs, out=out), iters, reps, sync)
            comm._backend = eng      # the kernel path at world 1 (benchmark only)
            _row(rows, "tpcomm Communicator.all_reduce, world 1, one_shot kernel", nbytes,
                 lambda: comm.all_reduce(xs, out=out, algorithm="one_shot"), iters, reps, sync)
            comm._backend = None
            _row(rows, "tpcomm GPU engine alone, world 1, one_shot/push", nbytes,
                 lambda: eng.all_reduce(xs, out, "one_shot/push"), iters, reps, sync)
    finally:
        comm._backend = None
        comm.close()
        eng.close()
    rows += emulated_rows(2, sizes, iters, reps, dev)
    return rows


def _grid(dev) -> int:
    return min(16, torch.cuda.get_device_properties(dev).multi_processor_count // 4)


def _symm_row(rows: list, nbytes: int, dev, iters: int, reps: int) -> None:
    what = "torch symm_mem one_shot_all_reduce, world 1"
    try:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem
        group = dist.group.WORLD
        t = symm_mem.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
        symm_mem.rendezvous(t, group.group_name)
        t.fill_(1)
        op = torch.ops.symm_mem.one_shot_all_reduce
        _row(rows, what, nbytes, lambda: op(t, "sum", group.group_name), iters, reps,
             torch.cuda.synchronize)
    except Exception as e:  # noqa: BLE001 - not in every torch build
        rows.append({"what": what, "nbytes": nbytes, "na": f"{type(e).__name__}: {e}"[:200]})


def emulated_rows(world: int, sizes: list[int], iters: int, reps: int, dev) -> list[dict]:
    """The GPU engine over ``world`` emulated ranks of one GPU, host us per rank call."""
    from ..cuda.emulated import make_emulated_group
    backs, _ = make_emulated_group(world, 32 << 20, _grid(dev), device=dev)
    streams = [torch.cuda.Stream(dev) for _ in range(world)]
    main = torch.cuda.current_stream(dev)
    rows: list[dict] = []

    def sync():
        for s in streams:
            s.synchronize()

    try:
        def switch_only():
            for s in streams:
                torch.cuda.set_stream(s)
            torch.cuda.set_stream(main)
        _row(rows, f"stream switch alone ({world} emulated ranks)", None, switch_only, iters,
             reps, sync, calls=world)
        for nbytes in sizes:
            ins = [torch.ones(nbytes // 2, dtype=torch.bfloat16, device=dev) for _ in backs]
            outs = [torch.empty_like(t) for t in ins]
            for algo in ALGOS:
                def one(algo=algo):
                    for r, s in enumerate(streams):
                        torch.cuda.set_stream(s)
                        backs[r].all_reduce(ins[r], outs[r], algo)
                    torch.cuda.set_stream(main)
                _row(rows, f"tpcomm GPU engine, {world} emulated ranks, {algo}", nbytes, one,
                     iters, reps, sync, calls=world)
        for b in backs:
            b.check(sync=True)
    finally:
        torch.cuda.set_stream(main)
        for b in backs:
            b.close()
    return rows


# ---------------------------------------------------------------- CPU rows
def cpu_rows(rank: int, world: int, sizes: list[int], iters: int, reps: int) -> list[dict]:
    """The CPU rows of one rank: world-1 rows in a group of one, world-``world`` rows."""
    import torch.distributed as dist

    from ..communicator import Communicator
    rows: list[dict] = []
    a, b, c = (torch.ones(1024) for _ in range(3))
    _row(rows, "torch.add, 1024 elements", None, lambda: torch.add(a, b, out=c), iters, reps,
         lambda: None)
    singles = [dist.new_group([r]) for r in range(world)]   # collective: every rank makes all
    mine = singles[rank]
    barrier = dist.barrier
    for nbytes in sizes:
        x = torch.ones(nbytes // 4)
        out = torch.empty_like(x)
        _row(rows, "gloo all_reduce, world 1", nbytes,
             lambda: dist.all_reduce(x, group=mine), iters, reps, lambda: None)
        _row(rows, f"gloo all_reduce, world {world}", nbytes, lambda: dist.all_reduce(x), iters,
             reps, lambda: None, before=barrier)
    with Communicator(group=mine) as one, Communicator() as comm:
        for nbytes in sizes:
            x = torch.ones(nbytes // 4)
            out = torch.empty_like(x)
            _row(rows, "tpcomm Communicator.all_reduce, world 1 (local copy)", nbytes,
                 lambda: one.all_reduce(x, out=out), iters, reps, lambda: None)
            _row(rows, f"tpcomm Communicator.all_reduce, world {world} ({comm.backend_name})",
                 nbytes, lambda: comm.all_reduce(x, out=out), iters, reps, lambda: None,
                 before=barrier)
    return rows


# ---------------------------------------------------------------- ranks and report
def rank_main(rank: int, world: int, device: str, sizes: list[int], iters: int,
              reps: int) -> list[dict]:
    from ..groups.launch import init_rank
    import torch.distributed as dist
    init_rank(device, rank)
    try:
        if device == "cuda":
            return gpu_rows(sizes, iters, reps)
        return cpu_rows(rank, world, sizes, iters, reps)
    finally:
        dist.destroy_process_group()


def merge_ranks(per_rank: list[list[dict]]) -> list[dict]:
    """One row per (what, size): the slowest rank's figures."""
    out = []
    for rows in zip(*per_rank):
        worst = max(rows, key=lambda r: r.get("host_us", -1.0))
        na = next((r["na"] for r in rows if "na" in r), None)
        out.append(dict(worst, **({"na": na} if na else {})))
    return out


def add_ratios(rows: list[dict]) -> None:
    """Each row's host time over the bare launches' of the same run (the issue's targets)."""
    base = {r["what"]: r.get("host_us") for r in rows if r["nbytes"] is None}
    for r in rows:
        for col, name in (("x_dispatcher_1arg", BASE_1), ("x_launcher_16arg", BASE_16)):
            if r.get("host_us") and base.get(name):
                r[col] = r["host_us"] / base[name]


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["what", "size", "host us/call", "with sync", "x 1-arg dispatcher",
            "x 16-arg launcher"]
    cells = []
    for r in rows:
        size = human_size(r["nbytes"]) if r["nbytes"] else "-"
        if "na" in r and "host_us" not in r:
            cells.append([r["what"], size, "n/a", r["na"][:60], "-", "-"])
            continue
        cells.append([r["what"], size, f"{r['host_us']:.1f}", f"{r['with_sync_us']:.1f}",
                      f"{r['x_dispatcher_1arg']:.2f}" if "x_dispatcher_1arg" in r else "-",
                      f"{r['x_launcher_16arg']:.2f}" if "x_launcher_16arg" in r else "-"])
    return head, cells


def _meta(device: str, world: int, iters: int, reps: int) -> dict:
    from .meta import system_info
    meta = system_info(torch.device(device), 1)
    meta.update(world_size=world, device=device, iters=iters, reps=reps,
                command="tpcomm bench host " + shlex.join(sys.argv[3:] if sys.argv[1:3] ==
                                                          ["bench", "host"] else sys.argv[1:]),
                timing=f"{iters} calls queued, one sync at the end, host us per call "
                       f"(perf_counter), median of {reps} repetitions")
    return meta


def main(args) -> int:
    from ..cli import UsageError
    from ..groups.launch import spawn
    from ..settings import parse_size
    device = resolve_device(args.device)
    check_outputs(args)
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as e:
        raise UsageError(f"--sizes: {e}") from None
    if not sizes or any(s < 64 or s % 64 for s in sizes):
        raise UsageError(f"--sizes: sizes must be multiples of 64 bytes, got {args.sizes!r}")
    iters = args.iters or (200 if device == "cuda" else 100)
    world = 1 if device == "cuda" else 2
    # CUDA_MODULE_LOADING=EAGER: a lazy module load waits for the running kernels, and an
    # emulated rank's kernel spins until the next rank's kernel runs (gpu_emulated_ranks.py)
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "CUDA_MODULE_LOADING": "EAGER"}
    # a failed rank: execute says so, exit code 1
    per_rank = spawn(rank_main, world, device, sizes, iters, args.reps, env=env,
                     timeout_s=args.timeout)
    rows = merge_ranks(per_rank)
    add_ratios(rows)
    meta = _meta(device, world, iters, args.reps)
    head, cells = table(rows)
    lines = ["# tpcomm bench host: host us per call", f"# date {meta['date']}",
             f"# hardware: {meta['hardware']}",
             "# versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"# timing: {meta['timing']}"]
    write_outputs(args, "\n".join(lines) + "\n" + text_table(head, None, cells) + "\n",
                  doc={"meta": meta, "rows": rows},
                  markdown=lambda _plot: ("# tpcomm bench host\n\n"
                                          + "\n".join(f"- {ln[2:]}" for ln in lines[1:])
                                          + "\n\n" + markdown_table(head, cells, left=1) + "\n"))
    return 0
