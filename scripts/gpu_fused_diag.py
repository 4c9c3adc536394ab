"""Diagnose the fused add + RMSNorm kernel on emulated ranks (one GPU): which (H, warps) pass."""
import os
import sys
import time

os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tpcomm.cuda.emulated import make_emulated_group  # noqa: E402

DEV = torch.device("cuda", 0)


def trial(world, rows, hidden, warps, first_all_reduce):
    backs, _ = make_emulated_group(world, 8 << 20, 16, device=DEV, timeout_s=1.0)
    streams = [torch.cuda.Stream(DEV) for _ in range(world)]
    if first_all_reduce:
        xs = [torch.ones(rows * hidden, dtype=torch.bfloat16, device=DEV) for _ in range(world)]
        for r in range(world):
            with torch.cuda.stream(streams[r]):
                backs[r].all_reduce(xs[r], xs[r], "one_shot_push")
        torch.cuda.synchronize()
    xs = [torch.ones(rows, hidden, dtype=torch.bfloat16, device=DEV) for _ in range(world)]
    res = [torch.ones_like(xs[0]) for _ in range(world)]
    nrm = [torch.zeros_like(xs[0]) for _ in range(world)]
    w = torch.ones(hidden, dtype=torch.bfloat16, device=DEV)
    t = []
    t0 = time.perf_counter()
    for r in range(world):
        backs[r].fused_norm_warps = warps
        with torch.cuda.stream(streams[r]):
            backs[r].all_reduce_add_rms_norm(xs[r], res[r], w, 1e-6, nrm[r])
        t.append(round(time.perf_counter() - t0, 3))
    torch.cuda.synchronize()
    errs = [b._read_error(sync=True) for b in backs]
    ok = all(bool((x == world).all()) for x in xs) and all(bool((r_ == world + 1).all())
                                                           for r_ in res)
    print(f"world {world} rows {rows} H {hidden} warps {warps} first_ar {first_all_reduce}: "
          f"timeout {any(errs)} values ok {ok} launches returned at {t} "
          f"total {time.perf_counter() - t0:.2f}s", flush=True)


for case in [(2, 1, 99, 1, False), (2, 1, 99, 8, False), (2, 1, 2048, 8, False),
             (2, 1, 8192, 8, False), (2, 1, 8192, 16, False), (2, 4, 8192, 16, True),
             (2, 1, 4096, 8, True)]:
    trial(*case)
