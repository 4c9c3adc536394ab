"""``tpcomm bench overlap``: a GEMM and its collective, timed as parts, unfused and overlapped.

    tpcomm bench overlap                                # cpu: 2 ranks, small shapes, seconds
    tpcomm bench overlap --device cuda -n 1 --chunks 4  # one GPU: the cost of chunking alone
    torchrun --nproc-per-node 4 -m tpcomm bench overlap --json o.json --markdown o.md

For every op (matmul_all_reduce, matmul_reduce_scatter: a [M, K] x [K, N]; all_gather_matmul:
a_shard [M/R, N] x [N, K], the up projection fed by a sequence-parallel input) and every M, in
one run, each overlapped variant next to the same engine unfused:

- torch.distributed (NCCL / gloo): the collective alone, GEMM then collective ("unfused"), and
  torch's async-TP fused op (torch.ops.symm_mem, CUDA and world > 1 only, else "n/a" and why),
  with its speed-up over that unfused;
- tpcomm: its collective alone, GEMM then its collective (one chunk: "unfused"), its overlap op
  with its own chunk count, with --chunks forced, and the fused GEMM kernel (method="fused",
  GPU backend only), each with its speed-up over tpcomm unfused.
  Where no overlap can happen the speed-up cell says so: "no overlap (1 chunk)" (the op ran
  as GEMM then one collective, which is tpcomm unfused itself) or "no overlap (cpu)" (chunks run
  one after the other on the CPU: no streams).

With --fused-gemm on one GPU (-n 1 --device cuda) it adds the fused kernels' GEMM at world 1
(``bench/fused_gemm.py``): each fused op over one emulated rank, the same GEMM core without
its communication, torch.mm and, at the Ms of --inductor-ms, inductor's best Triton GEMM.

Only this table shows whether overlap happened: overlapped is below unfused, and at best near
max(GEMM, collective). Comparing tpcomm overlapped with torch.distributed unfused would mix the
gain of overlap with that of the engine, so no column does.

Every variant's result is checked against the unfused one before it is timed. Times are per
call, the median of --reps repetitions of --iters eager calls (CUDA events on the GPU,
perf_counter after a barrier on the CPU), the slowest rank's. Not under torchrun it starts
its own ranks. Exit code: 0 when every result was right, 1 when one was not (or a rank
failed), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

import torch
import torch.distributed as dist

from .. import reference
from ..cli.command import UsageError
from ..groups.launch import init_rank, no_multicast, spawn, under_torchrun
from ..ops.overlap import (all_gather_matmul, matmul_all_reduce, matmul_reduce_scatter,
                           overlap_chunks)
from . import timing
from .args import (add_outputs, add_ranks, add_sub_benchmark, int_list, positive_int,
                   resolve_ranks)
from .output import columns, markdown_table, write_outputs

OPS = ("matmul_all_reduce", "matmul_reduce_scatter", "all_gather_matmul")
COLLECTIVE = {"matmul_all_reduce": "all_reduce", "matmul_reduce_scatter": "reduce_scatter",
              "all_gather_matmul": "all_gather"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# relative tolerance of max|got - ref| against max|ref| (different chunk GEMMs may round
# differently: a few ulps of bf16's 8-bit mantissa)
TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
# Llama-3-70B at TP 4: down projection [M, 28672/4] x [7168, 8192]
DEFAULTS = {"cpu": {"m": "64,256", "k": 512, "n": 1024, "dtype": "float32"},
            "cuda": {"m": "128,512,2048,4096,8192", "k": 7168, "n": 8192, "dtype": "bfloat16"}}
VARIANTS = ("gemm", "collective", "unfused", "torch_async_tp", "tpcomm_collective",
            "tpcomm_unfused", "tpcomm", "tpcomm_forced", "tpcomm_fused")
# the parts and baselines: timed as they are, not checked against the reference
PARTS = ("gemm", "collective", "unfused", "tpcomm_collective")
# overlapped variant -> the same engine unfused, its baseline
BASELINE = {"torch_async_tp": "unfused", "tpcomm": "tpcomm_unfused",
            "tpcomm_forced": "tpcomm_unfused", "tpcomm_fused": "tpcomm_unfused"}


@dataclasses.dataclass(frozen=True)
class OverlapBenchConfig:
    device: str
    world: int
    dtype: str
    ms: tuple
    k: int
    n: int
    ops: tuple
    chunks: int | None
    iters: int
    reps: int
    warmup: int
    progress: bool
    command: str
    timeout_s: float
    fused_gemm: bool = False
    inductor_ms: tuple = ()


# ---------------------------------------------------------------- arguments


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``overlap`` under ``tpcomm bench``."""
    p = add_sub_benchmark(
        subparsers, "overlap",
        help="GEMM + collective: parts, unfused, torch async-TP, tpcomm overlapped",
        description=__doc__, func=main)
    add_ranks(p)
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default float32 cpu, bfloat16 cuda")
    p.add_argument("--M", type=int_list, dest="ms",
                   help=f"GEMM rows (tokens), comma-separated (default {DEFAULTS['cpu']['m']} on "
                        f"cpu, {DEFAULTS['cuda']['m']} on cuda); rounded up to a multiple of R")
    p.add_argument("--K", type=positive_int, dest="k", help="a's columns per rank (default "
                   f"{DEFAULTS['cpu']['k']} cpu, {DEFAULTS['cuda']['k']} cuda)")
    p.add_argument("--N", type=positive_int, dest="n", help="b's columns (default "
                   f"{DEFAULTS['cpu']['n']} cpu, {DEFAULTS['cuda']['n']} cuda); "
                   "all_gather_matmul uses [M/R, N] x [N, K]")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--chunks", type=positive_int,
                   help="also time tpcomm with this many chunks forced (default 4 at world 1, "
                        "where the automatic choice is 1)")
    p.add_argument("--iters", type=positive_int, default=10, help="calls per repetition")
    p.add_argument("--reps", type=positive_int, default=5,
                   help="repetitions (median reported); with --fused-gemm also its round-robin "
                        "passes (at least 7)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds the whole run may take when it starts its own ranks")
    p.add_argument("--fused-gemm", action="store_true",
                   help="one GPU, world 1: also the fused kernels' GEMM table (fused op, the "
                        "same GEMM core without its communication, torch.mm; "
                        "tpcomm/bench/fused_gemm.py) at every --M")
    p.add_argument("--inductor-ms", type=int_list, default=(),
                   help="with --fused-gemm: the Ms at which inductor's best Triton GEMM is "
                        "autotuned too (minutes each)")
    add_outputs(p)
    return p


def config_from_args(args) -> OverlapBenchConfig:
    device, world = resolve_ranks(args)
    d = DEFAULTS[device]
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise UsageError(f"--ops {args.ops!r}: choose among {', '.join(OPS)}")
    if args.warmup < 0 or not args.timeout > 0:
        raise UsageError("--warmup must be >= 0 and --timeout > 0")
    ms = args.ms or int_list(d["m"])
    ms = tuple(dict.fromkeys(-(-m // world) * world for m in ms))
    chunks = args.chunks if args.chunks is not None else (4 if world == 1 else None)
    return OverlapBenchConfig(
        device=device, world=world, dtype=args.dtype or d["dtype"], ms=ms,
        k=args.k or d["k"], n=args.n or d["n"], ops=ops, chunks=chunks, iters=args.iters,
        reps=args.reps, warmup=args.warmup, progress=not args.no_progress,
        command=shlex.join(["tpcomm", *getattr(args, "argv", ["bench", "overlap"])]),
        timeout_s=args.timeout, fused_gemm=args.fused_gemm, inductor_ms=tuple(args.inductor_ms))


# ---------------------------------------------------------------- one rank
def _symm_mem_reason(device, world) -> str | None:
    """Why torch's async-TP ops cannot run here (None: they can)."""
    if device.type != "cuda":
        return "n/a: torch async-TP (symm_mem) needs CUDA"
    if world == 1:
        return "n/a: torch async-TP needs world > 1"
    if not hasattr(torch.ops, "symm_mem") or not hasattr(torch.ops.symm_mem,
                                                         "fused_matmul_reduce_scatter"):
        return f"n/a: torch {torch.__version__} has no torch.ops.symm_mem fused ops"
    try:
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group
        enable_symm_mem_for_group(dist.group.WORLD.group_name)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"n/a: enable_symm_mem_for_group failed: {type(e).__name__}: {e}"
    return None


def _inputs(op, M, K, N, R, rank, dtype, device):
    g = torch.Generator().manual_seed(1000 * M + rank)
    if op == "all_gather_matmul":   # [M/R, N] x [N, K]
        a = torch.randn(M // R, N, generator=g) / N ** 0.5
        b = torch.randn(N, K, generator=g)
    else:
        a = torch.randn(M, K, generator=g) / K ** 0.5
        b = torch.randn(K, N, generator=g)
    return a.to(device, dtype), b.to(device, dtype)


def _variants(op, a, b, comm, R, chunks_auto, forced, async_tp_why):
    """name -> callable returning the op's result, or a string: why it does not run."""
    coll = COLLECTIVE[op]
    group_name = dist.group.WORLD.group_name
    rows_out = a.shape[0] // R if op == "matmul_reduce_scatter" else a.shape[0]
    if op == "all_gather_matmul":
        gathered = torch.empty(R * a.shape[0], a.shape[1], dtype=a.dtype, device=a.device)
        reference.all_gather(a, gathered)
        gemm_in, coll_in = gathered, a
    else:
        gemm_in, coll_in = a, a @ b
    coll_out = {"all_reduce": lambda: torch.empty_like(coll_in),
                "reduce_scatter": lambda: torch.empty(rows_out, coll_in.shape[1],
                                                      dtype=a.dtype, device=a.device),
                "all_gather": lambda: torch.empty_like(gathered)}[coll]

    if coll == "all_reduce":   # in place on zeros: no copy timed, and the values stay 0
        zeros = torch.zeros_like(coll_in)

        def collective():
            return reference.all_reduce(zeros, zeros)

        def tpcomm_collective():
            return comm.all_reduce_(zeros)
    else:
        def collective():
            return getattr(reference, coll)(coll_in, coll_out())

        def tpcomm_collective():
            return getattr(comm, coll)(coll_in)

    def unfused():
        if op == "all_gather_matmul":
            g = torch.empty_like(gathered)
            reference.all_gather(a, g)
            return g @ b
        y = a @ b
        return getattr(reference, coll)(y, y if coll == "all_reduce" else coll_out())

    fused = {"matmul_all_reduce": matmul_all_reduce, "matmul_reduce_scatter":
             matmul_reduce_scatter, "all_gather_matmul": all_gather_matmul}[op]
    out = {"gemm": lambda: gemm_in @ b, "collective": collective, "unfused": unfused,
           "tpcomm_collective": tpcomm_collective,
           "tpcomm_unfused": lambda: fused(a, b, comm, chunks=1),   # GEMM, then one collective
           "tpcomm": lambda: fused(a, b, comm, chunks=chunks_auto)}
    if forced is not None:
        out["tpcomm_forced"] = lambda: fused(a, b, comm, chunks=forced)
    out["tpcomm_fused"] = (   # the fused GEMM kernels (opt-in)
        (lambda: fused(a, b, comm, method="fused")) if comm.backend_name == "p2p" else
        f"n/a: the fused kernel needs the GPU backend (here {comm.backend_name})")
    if op == "matmul_all_reduce":
        out["torch_async_tp"] = "n/a: torch has no fused matmul + all-reduce"
    elif async_tp_why:
        out["torch_async_tp"] = async_tp_why
    elif op == "matmul_reduce_scatter":
        out["torch_async_tp"] = lambda: torch.ops.symm_mem.fused_matmul_reduce_scatter(
            a, b, "sum", 0, group_name)
    else:
        out["torch_async_tp"] = lambda: torch.ops.symm_mem.fused_all_gather_matmul(
            a, [b], 0, group_name, return_A=False)[1][0]
    return out


def _time_us(fn, config, device) -> float:
    """Median over reps of the time per call, the slowest rank's, in microseconds
    (``bench/timing.py``)."""
    for _ in range(config.warmup):
        fn()
    per_call = timing.per_call_s(timing.rotating([fn], config.iters), config.iters, config.reps,
                                 device)
    return timing.max_over_ranks(per_call * 1e6, device)


def _mismatch(got: torch.Tensor, ref: torch.Tensor, tol: float, device) -> float:
    """max|got - ref| / max|ref|, the worst rank's (inf for a shape mismatch or NaN)."""
    if got.shape != ref.shape:
        err = float("inf")
    else:
        scale = float(ref.float().abs().max()) or 1.0
        err = float((got.float() - ref.float()).abs().max()) / scale
        err = float("inf") if err != err else err
    t = torch.tensor([err], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _row(op, M, config, comm, device, rank, async_tp_why) -> dict:
    R, K, N = config.world, config.k, config.n
    dtype = DTYPES[config.dtype]
    a, b = _inputs(op, M, K, N, R, rank, dtype, device)
    gk, gn = (N, K) if op == "all_gather_matmul" else (K, N)
    auto = overlap_chunks(COLLECTIVE[op], M, gk, gn, R, dtype, device.type)
    fns = _variants(op, a, b, comm, R, auto, config.chunks, async_tp_why)
    ref = fns["unfused"]()
    row = {"op": op, "M": M, "K": gk, "N": gn, "world": R, "chunks_auto": auto,
           "chunks_forced": config.chunks, "times_us": {}, "na": {}, "rel_err": {}, "ok": True,
           "speedup": {}}
    for name in VARIANTS:
        fn = fns.get(name)
        if fn is None:
            continue
        if isinstance(fn, str):
            row["na"][name] = fn
            continue
        if name == "tpcomm" and auto == 1:   # one chunk: the very call of tpcomm_unfused
            if "tpcomm_unfused" in row["times_us"]:
                row["times_us"][name] = row["times_us"]["tpcomm_unfused"]
            continue
        if name not in PARTS:
            try:
                err = _mismatch(fn(), ref, TOL[config.dtype], device)
            except Exception as e:  # noqa: BLE001 - async-TP may fail on a setup; say why
                if name != "torch_async_tp":
                    raise
                row["na"][name] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                continue
            row["rel_err"][name] = err
            if not err <= TOL[config.dtype]:
                row["ok"] = False
                continue
        row["times_us"][name] = _time_us(fn, config, device)
    row["speedup"] = speedups(row, device.type)
    return row


def speedups(row: dict, device_type: str) -> dict:
    """Overlapped variant -> time of the same engine unfused / its time (``BASELINE``), or why
    no overlap happened: "no overlap (1 chunk)" where it ran as GEMM then one collective,
    "no overlap (cpu)" where its chunks ran one after the other (no streams on the CPU)."""
    t, out = row["times_us"], {}
    for name, base in BASELINE.items():
        if name not in t or base not in t:
            continue
        chunks = {"tpcomm": row["chunks_auto"], "tpcomm_forced": row["chunks_forced"]}.get(name)
        if chunks == 1:
            out[name] = "no overlap (1 chunk)"
        elif chunks is not None and device_type != "cuda":
            out[name] = "no overlap (cpu)"
        else:
            out[name] = t[base] / t[name]
    return out


def rank_main(rank: int, world: int, config: OverlapBenchConfig) -> dict:
    no_multicast()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = init_rank(config.device, rank, max(1, (os.cpu_count() or 1) // local))
    from ..communicator import Communicator
    comm = Communicator(device=device)
    rows = []
    try:
        why = _symm_mem_reason(device, world)
        for op in config.ops:
            for M in config.ms:
                rows.append(_row(op, M, config, comm, device, rank, why))
                if rank == 0 and config.progress:
                    r = rows[-1]
                    print(f"[{len(rows)}/{len(config.ops) * len(config.ms)} {op} M={M}] "
                          + ", ".join(f"{k} {v:.1f} us" for k, v in r["times_us"].items()),
                          file=sys.stderr, flush=True)
        fused = _fused_gemm_table(config, device, world) if rank == 0 else None
        meta = None
        if rank == 0:
            from .meta import system_info
            meta = system_info(device, torch.get_num_threads())
            meta.update({"benchmark": "overlap", "command": config.command, "world_size": world,
                         "dtype": config.dtype, "device": config.device,
                         "comm_backend": comm.backend_name,
                         "baseline": f"torch.distributed ({dist.get_backend()})",
                         "base": dist.get_backend(),
                         "config": dataclasses.asdict(config)})
        return {"meta": meta, "rows": rows, "fused_gemm_w1": fused}
    finally:
        comm.close()
        dist.destroy_process_group()


def _fused_gemm_table(config: OverlapBenchConfig, device, world: int):
    """``--fused-gemm``: the world-1 table of ``bench/fused_gemm.py`` (one GPU, world 1), or
    why it did not run."""
    if not config.fused_gemm:
        return None
    if device.type != "cuda" or world != 1:
        return {"skipped": "--fused-gemm needs one GPU at world 1 (-n 1 --device cuda)"}
    from . import fused_gemm
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if config.progress else None
    return fused_gemm.world1_table(config.ms, config.k, config.n, DTYPES[config.dtype],
                                   device=device, inductor_ms=config.inductor_ms, progress=say,
                                   rounds=max(config.reps, 7))


def run(config: OverlapBenchConfig) -> dict:
    if under_torchrun():
        return rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), config)
    return spawn(rank_main, config.world, config, timeout_s=config.timeout_s)[0]


# ---------------------------------------------------------------- report
def _table(rows: list[dict], op: str, forced, base: str) -> tuple[list, list]:
    """Header and cells of one op's table; every "x" column is a speed-up over the same engine
    unfused (torch.distributed's for async-TP, tpcomm's for tpcomm's variants)."""
    head = ["M", "K", "N", "GEMM (us)", f"{base} collective (us)", f"{base} unfused (us)",
            "torch async-TP (us)", f"x {base} unfused", "tpcomm collective (us)",
            "tpcomm unfused (us)", "tpcomm (us)", "chunks", "x tpcomm unfused"]
    if forced is not None:
        head += [f"tpcomm {forced} chunks (us)", "x tpcomm unfused "]
    head += ["tpcomm fused kernel (us)", "x tpcomm unfused  "]
    body = []
    for r in (r for r in rows if r["op"] == op):
        t = r["times_us"]

        def cell(name):
            if name in t:
                return f"{t[name]:.1f}"
            if name in r["na"]:
                return "n/a"
            return "WRONG" if name in r["rel_err"] else "-"

        def ratio(name):
            x = r["speedup"].get(name)
            return x if isinstance(x, str) else f"{x:.2f}" if x else "-"
        cells = [str(r["M"]), str(r["K"]), str(r["N"]), cell("gemm"), cell("collective"),
                 cell("unfused"), cell("torch_async_tp"), ratio("torch_async_tp"),
                 cell("tpcomm_collective"), cell("tpcomm_unfused"), cell("tpcomm"),
                 str(r["chunks_auto"]), ratio("tpcomm")]
        if forced is not None:
            cells += [cell("tpcomm_forced"), ratio("tpcomm_forced")]
        cells += [cell("tpcomm_fused"), ratio("tpcomm_fused")]
        body.append(cells)
    return head, body


def _notes(rows: list[dict], op: str) -> list[str]:
    """Why a variant did not run (once per reason)."""
    return list(dict.fromkeys(f"{name}: {why}" for r in rows if r["op"] == op
                              for name, why in r["na"].items()))


def _header(meta: dict) -> list[str]:
    v = ", ".join(f"{k} {val}" for k, val in meta["versions"].items())
    return [f"date: {meta['date']}", f"hardware: {meta['hardware']}", f"versions: {v}",
            f"world {meta['world_size']}, {meta['dtype']}, tpcomm backend "
            f"{meta['comm_backend']}, baseline {meta['baseline']}",
            f"command: {meta['command']}"]


def _fused_gemm_lines(fused: dict | None, prefix: str) -> list[str]:
    if not fused:
        return []
    head = [f"{prefix}GEMM at world 1: fused kernels (one emulated rank) against the same core "
            f"without communication, torch.mm and inductor (us per call)", ""]
    if "skipped" in fused:
        return ["", f"{prefix}fused GEMM table skipped: {fused['skipped']}"]
    from .fused_gemm import table_lines
    return ["", *head, *table_lines(fused)]


def format_text(meta: dict, rows: list[dict], fused: dict | None = None) -> str:
    forced = meta["config"]["chunks"]
    lines = ["# tpcomm bench overlap"] + [f"# {h}" for h in _header(meta)]
    for op in dict.fromkeys(r["op"] for r in rows):
        head, body = _table(rows, op, forced, meta.get("base", "torch"))
        lines += ["", f"# {op} (times per call, us; x E unfused = time of engine E unfused / "
                      f"time of the overlapped variant)", *columns(head, body)]
        lines += [f"  {note}" for note in _notes(rows, op)]
    return "\n".join(lines + _fused_gemm_lines(fused, "# ")) + "\n"


def format_markdown(meta: dict, rows: list[dict], fused: dict | None = None) -> str:
    forced = meta["config"]["chunks"]
    out = ["# tpcomm bench overlap", ""] + [f"- {h}" for h in _header(meta)] + [""]
    for op in dict.fromkeys(r["op"] for r in rows):
        head, body = _table(rows, op, forced, meta.get("base", "torch"))
        out += [f"## {op}", "", markdown_table([h.strip() for h in head], body, left=len(head)),
                ""]
        out += [f"- {note}" for note in _notes(rows, op)] + [""]
    return "\n".join(out + _fused_gemm_lines(fused, "## "))


def main(args) -> int:
    config = config_from_args(args)
    result = run(config)     # a failed rank: execute says so, exit code 1
    rows = result["rows"]
    if result["meta"] is not None:
        meta = result["meta"]
        fused = result.get("fused_gemm_w1")
        write_outputs(args, format_text(meta, rows, fused),
                      doc={"meta": meta, "rows": rows, "fused_gemm_w1": fused},
                      markdown=lambda _plot: format_markdown(meta, rows, fused))
    wrong = [f"{r['op']} M={r['M']}: {n} (rel. error {e:.3g})" for r in rows
             for n, e in r["rel_err"].items() if not e <= TOL[config.dtype]]
    fused = result.get("fused_gemm_w1") or {}
    wrong += [f"fused {r['op']} M={r['M']}: differs from the core or torch.mm"
              for r in fused.get("rows", []) if not r["ok"]]
    if wrong:
        print(f"tpcomm bench overlap: wrong results: {'; '.join(wrong)}", file=sys.stderr)
        return 1
    return 0
