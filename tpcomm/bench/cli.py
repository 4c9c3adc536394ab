"""tpcomm bench: sweep message sizes like nccl-tests and compare contenders.

  tpcomm bench                                  # cpu: tpcomm vs gloo, 2 ranks, 8 B .. 16 MiB
  tpcomm bench --contenders tpcomm,gloo -n 2 -b 4K -e 16M -f 2 --json run.json --plot run.png
  tpcomm bench --device cuda --graph            # GPU: tpcomm vs nccl and torch symm_mem
  torchrun --nproc-per-node 4 -m tpcomm bench   # under torchrun: its ranks, its world size

Without torchrun it starts its own ranks on this machine. Every size of every contender is checked
before it is timed. Exit code: 0 when every result was right, 1 when any was wrong (or a rank
failed), 2 for bad arguments.
"""
# Sub-benchmarks (`bench model`, `bench overlap`, `bench two-level`, `bench host`) hang off this parser with
# parser.add_subparsers(dest="kind", required=False): the collective sweep stays the default.
from __future__ import annotations

import argparse
import shlex
import sys

from ..cli.command import UsageError
from ..selection.select import OPS, check_algorithm
from ..settings import parse_size
from . import plot, report, runner
from .args import add_outputs, add_ranks, positive_int, resolve_ranks
from .contenders import DEFAULTS, NORM_OP, PUBLIC, resolve_contenders
from .output import write_outputs

DEFAULT_MAX_BYTES = {"cpu": "16M", "cuda": "128M"}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


def _count(text: str) -> int:
    val = int(text)
    if val < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return val


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="time all_reduce / reduce_scatter / all_gather against other contenders",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sizes take K, M, G suffixes (powers of 1024) and round down to whole elements "
               "(per rank for\nreduce_scatter and all_gather); the size of a reduce_scatter is "
               "its input, of an all_gather its\noutput, as in nccl-tests.")
    add_ranks(p)
    p.add_argument("--contenders", "--backends", dest="contenders", metavar="NAMES",
                   help=f"comma-separated, the first is the one under test and the others its "
                   f"baselines; known: {', '.join(PUBLIC)} (default: {DEFAULTS['cpu']} on cpu, "
                   f"{DEFAULTS['cuda']} on cuda). --backends: the same flag, its former name")
    p.add_argument("--op", choices=OPS + (NORM_OP,), default="all_reduce",
                   help=f"{NORM_OP}: all-reduce + residual add + RMSNorm on [size / H, H] rows")
    p.add_argument("--hidden", type=positive_int, default=8192,
                   help=f"H of {NORM_OP} (default 8192, Llama-3-70B); sizes round to whole rows")
    p.add_argument("--dtype", choices=tuple(runner.DTYPES),
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--algorithm", default="auto",
                   help="force tpcomm's algorithm (one_shot, one_shot/push, two_shot, ...: "
                        "tpcomm.algorithms.choices); default auto")
    sizes = p.add_argument_group("sizes (nccl-tests style)")
    sizes.add_argument("-b", "--minbytes", default="8", help="smallest size (default 8)")
    sizes.add_argument("-e", "--maxbytes",
                       help="largest size (default 16M on cpu, 128M on cuda)")
    step = sizes.add_mutually_exclusive_group()
    step.add_argument("-f", "--stepfactor", type=int, help="multiply the size by this (default 2)")
    step.add_argument("-i", "--stepbytes", help="add this many bytes instead")
    timing = p.add_argument_group("timing")
    timing.add_argument("--iters", type=positive_int, default=20, help="calls per repetition (default 20)")
    timing.add_argument("--reps", type=positive_int, default=5,
                        help="repetitions; their median is reported (default 5)")
    timing.add_argument("--warmup", type=_count, default=5, help="untimed calls first (default 5)")
    timing.add_argument("--graph", action="store_true",
                        help=f"cuda: time sizes up to {report.human_size(runner.GRAPH_MAX_BYTES)} "
                             f"as replays of a CUDA graph of --iters calls")
    timing.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds the whole run may take when it starts its own ranks "
                             "(default 3600)")
    add_outputs(p.add_argument_group("output"),
                plot="draw latency and bus bandwidth against size (needs matplotlib)",
                progress="no progress bar on stderr")
    p.set_defaults(func=main, parser=p)
    # sub-benchmarks: `tpcomm bench model ...`, `tpcomm bench overlap ...` (their own options
    # come after their name)
    from .model_cli import add_parser as add_model_parser
    from .host import add_parser as add_host_parser
    from .overlap import add_parser as add_overlap_parser
    from .two_level import add_parser as add_two_level_parser
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=False)
    add_model_parser(kinds)
    add_overlap_parser(kinds)
    add_two_level_parser(kinds)
    add_host_parser(kinds)
    return p


# ---------------------------------------------------------------- sizes
def sweep_sizes(begin: int, end: int, factor: int | None = None,
                step: int | None = None) -> list[int]:
    """nccl-tests' sweep: begin, begin*factor, ... (or begin, begin+step, ...) up to end."""
    if begin < 1:
        raise UsageError(f"-b must be at least 1 byte, got {begin}")
    if begin > end:
        raise UsageError(f"-b {begin} is larger than -e {end}")
    if step is not None and step < 1:
        raise UsageError(f"-i must be at least 1 byte, got {step}")
    if step is None and factor is not None and factor < 2:
        raise UsageError(f"-f must be at least 2, got {factor}")
    sizes, size = [], begin
    while size <= end:
        sizes.append(size)
        size = size + step if step is not None else size * (factor or 2)
    return sizes


def align_sizes(sizes: list[int], unit: int) -> list[int]:
    """Round each size down to a multiple of ``unit`` (the bytes of one element, times the
    world size for reduce_scatter and all_gather), but not below one unit; drop duplicates."""
    if sizes[-1] < unit:
        raise UsageError(f"-e {sizes[-1]} is below the smallest size of this op, {unit} bytes "
                         f"(one element per rank)")
    return list(dict.fromkeys(max(unit, s - s % unit) for s in sizes))


def _parse(flag: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


# ---------------------------------------------------------------- arguments -> config
def config_from_args(args) -> runner.BenchConfig:
    """Check the arguments and resolve every default; UsageError says what is wrong."""
    device, world = resolve_ranks(args)
    if args.graph and device != "cuda":
        raise UsageError("--graph captures CUDA graphs: it needs --device cuda")
    try:
        contenders = resolve_contenders(
            DEFAULTS[device] if args.contenders is None else args.contenders, device, args.op)
        if args.algorithm != "auto":
            if "tpcomm" not in contenders:
                raise ValueError("--algorithm applies to the tpcomm contender, which is not in "
                                 "--contenders")
            check_algorithm("all_reduce" if args.op == NORM_OP else args.op, args.algorithm,
                            device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.plot:
        plot.require_matplotlib()
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    dtype = args.dtype or DEFAULT_DTYPE[device]
    step = _parse("-i", args.stepbytes) if args.stepbytes is not None else None
    sizes = sweep_sizes(_parse("-b", args.minbytes),
                        _parse("-e", args.maxbytes or DEFAULT_MAX_BYTES[device]),
                        args.stepfactor, step)
    unit = runner.DTYPES[dtype].itemsize * {"all_reduce": 1, NORM_OP: args.hidden}.get(args.op,
                                                                                    world)
    return runner.BenchConfig(
        op=args.op, dtype=dtype, device=device, world=world, contenders=tuple(contenders),
        sizes=tuple(align_sizes(sizes, unit)), iters=args.iters, warmup=args.warmup,
        reps=args.reps, algorithm=args.algorithm, graph=args.graph,
        progress=not args.no_progress, command=shlex.join(["tpcomm", *args.argv]),
        timeout_s=args.timeout, hidden=args.hidden)


# ---------------------------------------------------------------- run
def main(args) -> int:
    config = config_from_args(args)
    result = runner.run(config)     # a failed rank: execute says so, exit code 1
    rows = result["rows"]
    if result["meta"] is not None:   # rank 0 reports
        meta, names = result["meta"], list(config.contenders)
        write_outputs(args, report.format_text(meta, rows, names),
                      doc=report.to_json(meta, rows, names),
                      plot=lambda path: plot.plot(meta, rows, names, path),
                      markdown=lambda name: report.format_markdown(meta, rows, names, name))
    wrong = sum(r.wrong for r in rows)
    if wrong:
        bad = sorted({f"{r.backend} at {report.human_size(r.nbytes)}" for r in rows if r.wrong})
        print(f"tpcomm bench: {wrong} wrong element(s): {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0

