"""`tpcomm check`: the first thing to run on a new machine.

Reports the environment (versions, CPU, shared memory; GPUs, peer-access matrix, NVLink) and
runs a short self-test of every algorithm of every op on this machine's ranks, each result
checked exactly. Exits non-zero on any failure.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import torch

from ..groups.launch import OVERSUBSCRIBE_FLAG, check_cpu_ranks
SIZES = [1, 7, 4096, 65537]   # elements: odd, tiny, a round size, more than one 64 KiB round


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("check", help="report the environment and self-test every algorithm",
                              description=__doc__)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when GPUs are present, else cpu")
    p.add_argument("-n", "--nranks", type=int, default=None,
                   help="ranks for the self-test (default: 2 on cpu, every GPU on cuda)")
    p.add_argument(OVERSUBSCRIBE_FLAG, action="store_true",
                   help="cpu: start -n ranks even where they outnumber the usable cores")
    p.add_argument("--no-selftest", action="store_true", help="only report the environment")
    p.set_defaults(func=run_check, parser=p)


def _run(cmd: list[str]) -> str:
    if not shutil.which(cmd[0]):
        return ""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def environment() -> list[tuple[str, str]]:
    import tpcomm
    rows = [("tpcomm", tpcomm.__version__), ("python", platform.python_version()),
            ("torch", torch.__version__), ("machine", f"{platform.machine()}, {os.cpu_count()} cores")]
    try:
        import triton  # noqa: F401 - only reported
        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed (needed on GPUs only)"))
    st = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    rows.append(("/dev/shm", f"{st.f_bavail * st.f_frsize / 2**30:.1f} GiB free" if st else "missing"))
    from ..cpu.shm_collectives import should_use_shm
    rows.append(("CPU shm collectives", should_use_shm() or "usable"))
    if not torch.cuda.is_available():
        rows.append(("CUDA", "not available"))
        return rows
    n = torch.cuda.device_count()
    rows.append(("CUDA", f"{torch.version.cuda}, {n} GPU(s)"))
    rows.append(("NCCL", ".".join(map(str, torch.cuda.nccl.version()))))
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    rows.append(("driver", driver.splitlines()[0] if driver else "unknown"))
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        rows.append((f"GPU {i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"))
    matrix = [[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(n)] for i in range(n)]
    rows.append(("peer access", " ".join("".join("1" if v else "0" for v in row) for row in matrix)))
    rows.append(("P2P verdict", "all pairs" if all(map(all, matrix)) else "INCOMPLETE: tpcomm falls back to NCCL"))
    rows.append(("P2P data check (cached)", _cached_p2p()))
    for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NCCL_P2P_DISABLE"):
        rows.append((k, os.environ.get(k, "(unset)")))
    topo = _run(["nvidia-smi", "topo", "-m"])
    if topo:
        rows.append(("topology", "\n" + topo))
    return rows


def _cached_p2p() -> str:
    """The verdicts of the data-moving P2P check kept for this machine (TPCOMM_CACHE_DIR)."""
    import socket

    from ..cuda.p2p_check import cached_verdicts
    from ..settings import get_settings
    found = cached_verdicts(get_settings().cache_dir, socket.gethostname())
    if not found:
        return "none yet (the check runs when a GPU Communicator starts)"
    return "; ".join(f"{len(e['key']['gpus'])} GPUs " + (
        "ok" if e["ok"] else f"FAILED: {e['reason']} (delete {path} to check again)")
        for path, e in found)


def _p2p_line() -> str:
    from ..cuda.p2p_check import last_verdict
    v = last_verdict()
    if v is None:
        return "did not run (the fast path was vetoed before it)"
    if v.ok and v.source == "probe":
        return f"ok, moved data through every peer mapping in {v.seconds * 1e3:.1f} ms"
    return f"{'ok' if v.ok else 'FAILED'} ({v.source}): {v.reason}"


def _selftest(rank: int, world: int, device_type: str) -> list[tuple[str, str, int, bool, str]]:
    import torch.distributed as dist

    import tpcomm
    from ..groups.launch import init_rank
    from ..selection.select import ALGORITHMS
    from ..testing import expected, op_input
    device = init_rank(device_type, rank)
    results = []
    with tpcomm.Communicator(device=device, max_bytes=64 << 10, timeout_s=30) as comm:
        for op, algos in ALGORITHMS[device_type].items():
            for algo in ("auto", "torch") + tuple(a for a in algos if a != "two_level"):
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    for n in SIZES:
                        try:
                            x = op_input(op, n, rank, world, dtype, n, device)
                            out = getattr(comm, op)(x, algorithm=algo)
                            ok = torch.equal(out.reshape(-1), expected(op, n, rank, world, dtype, n, device))
                            why = "" if ok else "wrong result"
                        except Exception as e:  # reported, never raised: the table says what failed
                            ok, why = False, f"{type(e).__name__}: {e}"
                        results.append((op, algo, n, ok, why))
        backend = comm.backend_name
    dist.destroy_process_group()
    p2p = _p2p_line() if device_type == "cuda" else ""
    return [("backend", backend, 0, True, p2p)] + results


def _world(args, device_type: str) -> int:
    """Ranks of the self-test; UsageError for more than the GPUs, or than the cores on cpu."""
    from .command import UsageError
    if args.nranks is not None and args.nranks < 1:
        raise UsageError(f"-n must be at least 1, got {args.nranks}")
    if device_type == "cuda":
        gpus = torch.cuda.device_count()
        if (args.nranks or 0) > gpus:
            raise UsageError(f"-n {args.nranks} ranks need {args.nranks} GPUs; {gpus} visible")
        return args.nranks or gpus
    world = args.nranks or 2
    if not args.oversubscribe:
        try:
            check_cpu_ranks(world)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return world


def run_check(args) -> int:
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    world = _world(args, device_type)
    print("== tpcomm check: environment")
    for k, v in environment():
        print(f"  {k:<34} {v}")
    if args.no_selftest:
        return 0
    if world < 2:
        print("== self-test skipped: it needs at least 2 ranks")
        return 0
    from ..groups.launch import RankFailed, spawn
    print(f"== self-test: {world} ranks on {device_type}, every op x algorithm x dtype x "
          f"{len(SIZES)} sizes, exact sums")
    try:
        per_rank = spawn(_selftest, world, device_type, timeout_s=600)  # no multicast
    except RankFailed as e:
        print(f"FAIL: {e}")
        return 1
    print(f"  backend: {per_rank[0][0][1]}")
    if per_rank[0][0][4]:
        print(f"  P2P data check: {per_rank[0][0][4]}")
    summary: dict = {}
    for rank_results in per_rank:
        for op, algo, n, ok, why in rank_results[1:]:
            entry = summary.setdefault((op, algo), [0, 0, ""])
            entry[0] += 1
            entry[1] += not ok
            entry[2] = entry[2] or why
    failed = 0
    for (op, algo), (count, bad, why) in summary.items():
        failed += bad
        status = "ok" if not bad else f"FAIL ({bad}/{count}: {why})"
        print(f"  {op:<15} {algo:<9} {count:>4} checks  {status}")
    print("== PASS" if not failed else f"== FAIL: {failed} wrong or failed calls")
    return 1 if failed else 0
