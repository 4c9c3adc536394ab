"""Argument types and resolution shared by the benchmarks (``tpcomm bench``, ``tpcomm bench
model``, ``tpcomm bench overlap``): every check here runs before any rank starts."""
from __future__ import annotations

import argparse
import os

import torch

from ..cli.command import UsageError
from ..groups.launch import OVERSUBSCRIBE_FLAG, check_cpu_ranks, under_torchrun


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: "1,8,32" -> (1, 8, 32), every value >= 1, at least one."""
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    val = int(text)
    if val < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return val


def resolve_device(device: str | None) -> str:
    """--device, defaulting to cuda where torch sees a GPU; UsageError for cuda without one."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU")
    return device


def add_sub_benchmark(subparsers, name: str, help: str, description: str,
                      func) -> argparse.ArgumentParser:
    """The parser of ``tpcomm bench NAME`` (a sub-benchmark), set up as every ``tpcomm``
    subcommand is (:mod:`tpcomm.cli.main`): ``func`` (args -> exit code) and the parser itself
    as defaults; ``description`` (the module's docstring) printed as written."""
    p = subparsers.add_parser(name, help=help, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func, parser=p)
    return p


def add_ranks(p, what: str = "ranks") -> None:
    """The flags every benchmark shares for where it runs: -n/--nranks, --oversubscribe,
    --device (resolved by :func:`resolve_world` and :func:`resolve_device`)."""
    p.add_argument("-n", "--nranks", type=positive_int,
                   help=f"{what} to start (default 2 on cpu, every GPU on cuda); under torchrun "
                        f"the world size is torchrun's")
    add_oversubscribe(p)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda when a GPU is visible, else cpu")


def add_outputs(p, plot: str | None = None, progress: str = "no progress lines on stderr") -> None:
    """The output flags every benchmark shares: --json, --markdown, (--plot: ``plot`` is its
    help), --no-progress (checked by :func:`check_output_path` before any rank starts)."""
    p.add_argument("--json", metavar="FILE", help="write every figure and the header as JSON")
    if plot is not None:
        p.add_argument("--plot", metavar="FILE.png", help=plot)
    p.add_argument("--markdown", metavar="FILE.md",
                   help="write the header and tables as a results file (benchmarks/results/)")
    p.add_argument("--no-progress", action="store_true", help=progress)


def add_oversubscribe(p: argparse.ArgumentParser) -> None:
    """The flag that lets -n exceed the usable cores (see :func:`tpcomm.groups.launch.check_cpu_ranks`)."""
    p.add_argument(OVERSUBSCRIBE_FLAG, action="store_true",
                   help="cpu: start -n ranks even where they outnumber the usable cores (slow, "
                        "and about 150 MB per rank)")


def resolve_world(nranks: int | None, device: str, oversubscribe: bool = False) -> int:
    """Ranks of the run: torchrun's world, else -n (default 2 on cpu, every GPU on cuda).

    Ranks this command would start on the CPU may not outnumber the usable cores unless
    ``oversubscribe`` (UsageError saying how to override)."""
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if nranks is not None and nranks != world:
            raise UsageError(f"-n {nranks}, but torchrun started {world} ranks")
        return world
    if device == "cpu":
        world = nranks or 2
        if not oversubscribe:
            try:
                check_cpu_ranks(world)
            except ValueError as e:
                raise UsageError(str(e)) from None
        return world
    gpus = torch.cuda.device_count()
    world = nranks or gpus
    if world > gpus:
        raise UsageError(f"-n {world} ranks need {world} GPUs; {gpus} visible")
    return world


def resolve_ranks(args) -> tuple[str, int]:
    """(device, world) from the flags of :func:`add_ranks`, with the output files of
    :func:`add_outputs` checked (:func:`check_outputs`): everything shared, before any rank
    starts."""
    device = resolve_device(args.device)
    world = resolve_world(args.nranks, device, args.oversubscribe)
    check_outputs(args)
    return device, world


def check_outputs(args) -> None:
    """Each of --json, --markdown, --plot that ``args`` has and names can be written
    (:func:`check_output_path`)."""
    for flag in ("json", "markdown", "plot"):
        check_output_path(f"--{flag}", getattr(args, flag, None))


def check_output_path(flag: str, path: str | None) -> None:
    """An output file (--json, --markdown, --plot) that can be written, checked before the run:
    its directory exists and is writable, and the path is not a directory (UsageError)."""
    if path is None:
        return
    if path == "" or os.path.isdir(path):
        raise UsageError(f"{flag} {path!r}: expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                    and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")
