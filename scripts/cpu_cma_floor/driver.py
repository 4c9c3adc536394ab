"""Bare-C floors of CPU all-reduce variants, 2 ranks, float32, interleaved rep by rep with
tpcomm's Communicator and Open MPI's Allreduce in the same two processes (issue 16 item 3, the
CMA study: benchmarks/results/cpu-2rank-cma-2026-12-03.md).

    gcc -O3 -march=native -shared -fPIC -o scripts/cpu_cma_floor/libvar.so scripts/cpu_cma_floor/variants.c
    OMPI_MCA_rmaps_base_oversubscribe=1 MPI4PY_MPIABI=openmpi PYTHONPATH=$PWD \
      mpiexec.openmpi --allow-run-as-root -np 2 --bind-to none -x PYTHONPATH \
      python3 scripts/cpu_cma_floor/driver.py SIZES VARIANTS REPS CALLS

SIZES: bytes, comma-separated. VARIANTS: copyin (tpcomm's core scheme), rsag:BLK, oneshot:BLK,
pipe:BLK (CMA variants, BLK bytes per process_vm_readv), cmaonly:BLK, memcpyonly:BLK (the copy
alone), tpcomm (Communicator.all_reduce_), engine (its ShmCollectives.all_reduce per 1 MiB round, as
run_rounds), coredirect (its native core's run() per round from a Python loop), copyinpy (copyin, one C
call per round from Python), mpi; a ``_free`` suffix runs that variant unpinned. Every rank pins itself to
core ``rank``; each variant is checked (exact sums, in place, every rotating buffer, ranks
equal) before it is timed. A one-off experiment, not part of the package.
"""
import sys, os, time, mmap, ctypes, numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD; rank = comm.Get_rank()
os.sched_setaffinity(0, {rank})
sizes = [int(s) for s in sys.argv[1].split(",")]
variants = sys.argv[2].split(",")
rounds = int(sys.argv[3]); iters = int(sys.argv[4])
lib = ctypes.CDLL(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libvar.so"))
lib.run.restype = ctypes.c_int64
CH = 1 << 20
path = "/dev/shm/h16big_ctl"
if rank == 0:
    with open(path, "wb") as f: f.truncate(8192 + 4 * CH)
comm.Barrier()
fd = os.open(path, os.O_RDWR); mm = mmap.mmap(fd, 8192 + 4 * CH); os.close(fd)
comm.Barrier()
if rank == 0: os.unlink(path)
base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
scr = np.zeros(2 * (1 << 20) // 4 * 2, np.float32)
pids = comm.allgather(os.getpid()); ppid = os.getppid()
pp = comm.allgather(ppid)
lib.init(rank, ctypes.c_int64(base), ctypes.c_int64(base + 8192), ctypes.c_int64(scr.ctypes.data), pids[1 - rank])
if rank == 0: print("pids", pids, "parents", pp, "(siblings: rank is not the other's parent)", flush=True)
err = ctypes.c_int(0)
tcomm = None
if "tpcomm" in variants or "engine" in variants:
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=rank, world_size=2)
    from tpcomm import Communicator
    tcomm = Communicator(device="cpu")
    if rank == 0: print("tpcomm engine", tcomm.backend_name, tcomm.disabled_reason, flush=True)
def pattern(n, r): return ((np.arange(n) + r) % 17).astype(np.float32)
res = {}
for nb in sizes:
    n = nb // 4
    nbuf = max(1, min(4, (64 << 20) // nb))
    bufs = [pattern(n, rank) for _ in range(nbuf)]
    addrs = [b.ctypes.data for b in bufs]
    peers = comm.allgather(addrs)[1 - rank]
    A = (ctypes.c_int64 * nbuf)(*addrs); P = (ctypes.c_int64 * nbuf)(*peers)
    exp = pattern(n, 0) + pattern(n, 1)
    def call(v, it):
        if v.endswith("_free"):
            os.sched_setaffinity(0, {0, 1})
            try: return call(v[:-5], it)
            finally: os.sched_setaffinity(0, {rank})
        if v == "mpi":
            t0 = time.perf_counter_ns()
            for i in range(it): comm.Allreduce(MPI.IN_PLACE, bufs[i % nbuf], op=MPI.SUM)
            return time.perf_counter_ns() - t0
        if v == "copyinpy":   # the bare copy-in, but one C call per 1 MiB round from Python
            CHb = 1 << 20
            one = (ctypes.c_int64 * 1)(); onep = (ctypes.c_int64 * 1)()
            t0 = time.perf_counter_ns()
            for i in range(it):
                a, p = addrs[i % nbuf], peers[i % nbuf]
                for lo in range(0, nb, CHb):
                    one[0] = a + lo; onep[0] = p + lo
                    lib.run(0, one, onep, 1, ctypes.c_int64(min(CHb, nb - lo)), 1, ctypes.c_int64(262144), ctypes.byref(err))
            return time.perf_counter_ns() - t0
        if v == "coredirect":   # tpcomm's core.run per 1 MiB round, no engine Python
            eng = tcomm._backend
            run, ctx = eng._core_run, eng._ctx
            CHn = (1 << 20) // 4
            t0 = time.perf_counter_ns()
            for i in range(it):
                base = addrs[i % nbuf]
                for lo in range(0, n, CHn):
                    eng.seq += 1
                    src = base + lo * 4
                    rc = run(ctx, 0, eng.seq, src, src, 10**9, 1, 1, 1, min(CHn, n - lo), n, lo)
                    assert rc == 0, rc
            return time.perf_counter_ns() - t0
        if v == "engine":
            eng = tcomm._backend
            ts_ = [torch.from_numpy(b) for b in bufs]
            CHn = (1 << 20) // 4
            t0 = time.perf_counter_ns()
            for i in range(it):
                x = ts_[i % nbuf]
                for lo in range(0, n, CHn):
                    s = x[lo:lo + CHn]
                    eng.all_reduce(s, s, "one_shot", total=n, offset=lo)
            return time.perf_counter_ns() - t0
        if v == "tpcomm":
            ts_ = [torch.from_numpy(b) for b in bufs]
            t0 = time.perf_counter_ns()
            for i in range(it): tcomm.all_reduce_(ts_[i % nbuf])
            return time.perf_counter_ns() - t0
        name, _, blk = v.partition(":")
        vid = {"copyin": 0, "rsag": 1, "oneshot": 2, "pipe": 3, "cmaonly": 4, "memcpyonly": 5}[name]
        t = lib.run(vid, A, P, nbuf, ctypes.c_int64(nb), it, ctypes.c_int64(int(blk or 262144)), ctypes.byref(err))
        if t < 0: raise SystemExit(f"{v}: error {err.value}")
        return t
    for v in [v for v in variants if 'only' not in v]:   # correctness: exact sums, equal across ranks, in place, every rotating buffer
        for b in bufs: b[:] = pattern(n, rank)
        comm.Barrier(); call(v, nbuf)
        for b in bufs:
            assert np.array_equal(b, exp), (v, nb, np.nonzero(b != exp)[0][:5])
        other = comm.sendrecv(bufs[0].tobytes()[:4096], dest=1 - rank, source=1 - rank)
        assert other == bufs[0].tobytes()[:4096]
    for b in bufs: b[:] = pattern(n, rank)
    for v in variants: call(v, 2)
    ts = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            comm.Barrier()
            ts[v].append(call(v, iters) / iters / 1000)
            for b in bufs: b *= 0.5   # keep the values finite
    for v in variants:
        a = np.array(ts[v]); m = np.empty_like(a); comm.Allreduce(a, m, op=MPI.MAX)
        res[(nb, v)] = m
if rank == 0:
    import statistics
    print(f"load {os.getloadavg()[0]:.2f}; us per call, min / p10 / p25 / median over {rounds} interleaved reps of {iters} calls, max over ranks")
    for nb in sizes:
        row = []
        for v in variants:
            m = np.sort(res[(nb, v)])
            row.append(f"{v} {m[0]:.0f}/{m[len(m)//10]:.0f}/{m[len(m)//4]:.0f}/{m[len(m)//2]:.0f}")
        # pairwise ratio vs copyin per round
        c = res[(nb, variants[0])]
        rat = [f"{v}/{variants[0]} med-of-ratios {np.median(res[(nb, v)] / c):.2f}" for v in variants[1:]]
        print(f"{nb >> 10}K: " + " | ".join(row)); print("    " + "; ".join(rat))
