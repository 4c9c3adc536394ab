import sys, time, numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD; rank = comm.Get_rank()
sizes = [int(s) for s in sys.argv[1].split(",")]
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 15
iters = int(sys.argv[3]) if len(sys.argv) > 3 else 20
res = {}
for nb in sizes:
    n = nb // 4
    nbuf = max(1, min(4, (64 << 20) // nb))
    bufs = [((np.arange(n) + rank) % 17).astype(np.float32) for _ in range(nbuf)]
    for b in bufs: comm.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM)
    exp = 2 * ((np.arange(n) % 17) + (np.arange(n) + 1) % 17).astype(np.float32) / 2
    ts = []
    for r in range(reps):
        comm.Barrier()
        t0 = time.perf_counter_ns()
        for i in range(iters):
            comm.Allreduce(MPI.IN_PLACE, bufs[i % nbuf], op=MPI.SUM)
        ts.append((time.perf_counter_ns() - t0) / iters / 1000)
    a = np.array(ts); m = np.empty_like(a); comm.Allreduce(a, m, op=MPI.MAX)
    ts = sorted(m.tolist())
    res[nb] = (ts[0], ts[len(ts)//2])
if rank == 0:
    print(" ".join(f"{nb>>10}K:{a:.0f}/{m:.0f}" for nb,(a,m) in res.items()))
