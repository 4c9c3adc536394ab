"""CPU contenders of ``tpcomm bench``: Open MPI and MPICH (through mpi4py) and DeepSpeed's
shared-memory all-reduce, where they are installed (optional extras, never dependencies:
``pip install tpcomm[contenders]`` brings mpi4py and deepspeed; the MPI libraries and launchers
come from the system, e.g. Debian's ``openmpi-bin`` and ``mpich``).

- ``deepspeed_shm``: ``torch.ops.deepspeed.inference_all_reduce_`` from DeepSpeed's
  ``ShareMemCommBuilder`` (a C++ extension that torch builds on first use, minutes on a small
  machine, then cached in ~/.cache/torch_extensions). It runs inside the benchmark's ranks like
  every other contender.
- ``mpi_openmpi``, ``mpi_mpich``: MPI needs its own launcher, so these do not run in the
  benchmark's ranks. After the ranks' sweep, the process that started them runs
  ``<mpiexec> -np R python -m tpcomm.bench.contenders_cpu ...`` once per implementation; rank 0 of
  that job prints one JSON document (the same sizes, the same buffers rotation, the same check
  and the same timer as :mod:`tpcomm.bench.runner`), which becomes rows of the same table.
  ``comm.Allreduce(MPI.IN_PLACE, x)`` on numpy views of the tensors.

mpi4py's binary wheel carries one module per MPI ABI and picks it from the library it finds;
Debian's MPICH names its library ``libmpich.so.12`` where the wheel looks for ``libmpi.so.12``,
so for MPICH the job gets ``MPI4PY_MPIABI=mpich`` and, when needed, a directory with that
link on ``LD_LIBRARY_PATH`` (made once under ``<TPCOMM_CACHE_DIR>/mpich-abi``).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

# This module imports nothing from the rest of the benchmark (contenders.py and runner.py import
# it): the DeepSpeed contender has Contender's methods without inheriting them, and the MPI job
# receives the runner's buffer rotation and input pattern as arguments.
MPI_TIMEOUT_S = 600.0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class MpiImpl:
    name: str          # contender name in the table
    launchers: tuple   # mpiexec names to look for, first found wins
    abi: str           # MPI4PY_MPIABI
    extra_args: tuple  # launcher flags


MPI_IMPLS = {
    "mpi_openmpi": MpiImpl("mpi_openmpi", ("mpiexec.openmpi", "mpirun.openmpi"), "openmpi",
                           ("--allow-run-as-root", "--oversubscribe")),
    "mpi_mpich": MpiImpl("mpi_mpich", ("mpiexec.mpich", "mpirun.mpich"), "mpich", ()),
}


def _launcher(impl: MpiImpl) -> str | None:
    for name in impl.launchers:
        path = shutil.which(name)
        if path:
            return path
    return None


def why_unavailable(name: str) -> str | None:
    """None when contender ``name`` can run here, else what to install."""
    if name == "deepspeed_shm":
        if importlib.util.find_spec("deepspeed") is None:
            return "deepspeed_shm needs DeepSpeed: pip install deepspeed (or tpcomm[contenders])"
        return None
    impl = MPI_IMPLS[name]
    if importlib.util.find_spec("mpi4py") is None:
        return f"{name} needs mpi4py: pip install mpi4py (or tpcomm[contenders])"
    if _launcher(impl) is None:
        pkg = "openmpi-bin libopenmpi-dev" if impl.abi == "openmpi" else "mpich"
        return f"{name} needs {impl.launchers[0]}: e.g. apt-get install {pkg}"
    return None


# ---------------------------------------------------------------- DeepSpeed, in the ranks
class DeepSpeedShmContender:
    """DeepSpeed's shared-memory all-reduce op (all ranks on one machine), in place; the
    interface of tpcomm.bench.contenders.Contender."""

    name = "deepspeed_shm"

    def __init__(self, ctx):
        self.ctx = ctx
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
        self.module = ShareMemCommBuilder().load(verbose=False)
        os.environ["LOCAL_SIZE"] = str(ctx.world)   # its test for "every rank is local"
        self.module.initialize(ctx.world, ctx.rank)
        import deepspeed
        self.version = deepspeed.__version__

    def describe(self) -> str:
        return (f"DeepSpeed {self.version} torch.ops.deepspeed.inference_all_reduce_ "
                f"(ShareMemCommBuilder, C++)")

    def buffers(self, op, numel_in, numel_out, dtype):
        inp = torch.empty(numel_in, dtype=dtype, device=self.ctx.device)
        return inp, inp

    def make_call(self, op, inp, out):
        fn = torch.ops.deepspeed.inference_all_reduce_
        return lambda: fn(inp)

    def run_once(self, call) -> str:
        call()
        return "-"

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- MPI, in its own job
def _mpich_env(cache_dir: str) -> dict:
    env = {"MPI4PY_MPIABI": "mpich"}
    libdirs = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"]
    if any(glob.glob(f"{d}/libmpi.so.12") for d in libdirs):
        return env
    found = [p for d in libdirs for p in glob.glob(f"{d}/libmpich.so.12")]
    if found:
        shim = os.path.join(os.path.expanduser(cache_dir), "mpich-abi")
        os.makedirs(shim, exist_ok=True)
        link = os.path.join(shim, "libmpi.so.12")
        if not os.path.lexists(link):
            os.symlink(found[0], link)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [shim] + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    return env


def run_mpi(name: str, world: int, config, rotate: tuple[int, int, int]) -> tuple[str, list[dict]]:
    """Run the sweep of MPI contender ``name`` as an MPI job; (description, rows as dicts).
    ``rotate`` = (ROTATE_BYTES, MAX_ROTATE, PATTERN_MOD) of the runner."""
    from ..settings import get_settings
    impl = MPI_IMPLS[name]
    launcher = _launcher(impl)
    env = dict(os.environ)
    env.update({"OMPI_MCA_rmaps_base_oversubscribe": "1", "TPCOMM_QUIET": "1"})
    if impl.abi == "mpich":
        env.update(_mpich_env(get_settings().cache_dir))
    else:
        env["MPI4PY_MPIABI"] = "openmpi"
    cmd = [launcher, "-np", str(world), *impl.extra_args, sys.executable, "-m",
           "tpcomm.bench.contenders_cpu", "--name", name, "--op", config.op,
           "--dtype", config.dtype, "--sizes", ",".join(map(str, config.sizes)),
           "--iters", str(config.iters), "--warmup", str(config.warmup),
           "--reps", str(config.reps), "--rotate", ",".join(map(str, rotate))]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         timeout=min(MPI_TIMEOUT_S, config.timeout_s * max(1, len(config.sizes))))
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr or res.stdout).strip()[-1500:]
        raise RuntimeError(f"{name}: {' '.join(cmd[:3])} ... exited {res.returncode}: {tail}")
    doc = json.loads(lines[-1])
    return doc["describe"], doc["rows"]


def _mpi_main(argv=None) -> int:
    """One rank of an MPI contender job (started by :func:`run_mpi` through mpiexec)."""
    p = argparse.ArgumentParser(prog="python -m tpcomm.bench.contenders_cpu")
    p.add_argument("--name", required=True)
    p.add_argument("--op", default="all_reduce")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sizes", required=True)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rotate", default=f"{64 << 20},4,17",
                   help="ROTATE_BYTES,MAX_ROTATE,PATTERN_MOD of tpcomm.bench.runner")
    a = p.parse_args(argv)
    if a.op != "all_reduce":
        raise SystemExit(f"{a.name} times all_reduce only, not {a.op}")
    from mpi4py import MPI
    rotate_bytes, max_rotate, mod = map(int, a.rotate.split(","))

    def pattern(n, r):
        return (torch.arange(n) + r) % mod
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    dtype = DTYPES[a.dtype]
    if dtype == torch.bfloat16:
        raise SystemExit(f"{a.name}: MPI has no bfloat16; use float32 or float16")
    rows = []
    for nbytes in map(int, a.sizes.split(",")):
        n = nbytes // dtype.itemsize
        nbuf = max(1, min(max_rotate, rotate_bytes // max(nbytes, 1)))
        src = pattern(n, rank).to(dtype)
        bufs = [src.clone() for _ in range(nbuf)]
        arrays = [b.numpy() for b in bufs]
        calls = [(lambda arr=arr: comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)) for arr in arrays]
        calls[0]()
        expected = sum(pattern(n, r) for r in range(world)).to(dtype)
        wrong = int((bufs[0] != expected).sum())
        for i in range(a.warmup):
            calls[i % nbuf]()
        samples = []
        for _ in range(a.reps):
            comm.Barrier()
            calls[0]()   # untimed: the ranks leave the barrier at different times
            t0 = time.perf_counter()
            for i in range(a.iters):
                calls[i % nbuf]()
            samples.append((time.perf_counter() - t0) / a.iters)
        t = comm.reduce(statistics.median(samples), op=MPI.MAX, root=0)
        wrong = comm.reduce(wrong, op=MPI.SUM, root=0)
        if rank == 0:
            rows.append({"nbytes": nbytes, "count": n, "time_us": t * 1e6, "wrong": wrong})
    if rank == 0:
        # the library's string may carry a NUL and tabs
        text = MPI.Get_library_version().replace("\x00", "").replace("\t", " ")
        version = text.strip().splitlines()[0].strip().rstrip(",")
        import mpi4py
        print(json.dumps({"describe": f"{version}, mpi4py {mpi4py.__version__}, "
                                      f"Allreduce(MPI.IN_PLACE) on numpy views", "rows": rows}))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_mpi_main())
