"""The lean launch path (issue 16) on ONE GPU: bitwise against Triton's dispatcher, in CUDA
graphs, no allocation per call; then ``tpcomm bench host`` (JSON and markdown under $OUT).

For worlds 1, 2 and 4 (emulated ranks: each a GPU engine over its own buffer on this GPU, its
own stream; ``tpcomm.cuda.emulated``), two groups run the same calls on the same inputs:

- ``lean``: the engine as shipped (``kernels/launch.py``: the first call of a key through the
  dispatcher, later ones through the compiled kernel's launcher), with TPCOMM_DEBUG's check on
  (every lean call also runs Triton's binder and fails if its specialization differs);
- ``dispatch``: every bound kernel forced through ``kernel[grid](...)`` (the old path).

Every op the engine launches (all_reduce one_shot_push, one_shot_pull staged / zero-copy /
in place, two_shot, ring, chunked; reduce_scatter; all_gather; the fused all-reduce + add +
RMSNorm; barrier) in bf16 (all_reduce also fp32) at sizes of different specializations (a
multiple of 16 elements and not, offset pointers): outputs of the two groups bitwise equal,
all-reduce sums exact, and the lean kernels really launched directly. Then each op captured in
a CUDA graph per group, inputs changed after capture, replayed twice: bitwise again. Then no
allocation (torch's allocator counters) over 50 eager calls of the engine and of a world-1
Communicator on the kernel path. Last, ``tpcomm bench host --device cuda``.

    OUT=/tmp/out python scripts/gpu_host_path.py [--budget-s 240]

Prints PASS/FAIL lines and ends with ALL PASS or FAILED; exit status 1 on a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
# every kernel loaded at start: a lazy module load waits for the running kernels, and an
# emulated rank's kernel spins until the next rank's kernel runs (gpu_emulated_ranks.py)
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tpcomm.cuda.emulated import StreamRanks, make_emulated_group  # noqa: E402
from tpcomm.testing import exact  # noqa: E402

DEV = torch.device("cuda", 0)
GRID = 8
MAX_BYTES = 64 << 10     # small buffers: the chunked paths run at small sizes
RESULTS: list[tuple[str, bool | None, str]] = []
# sizes (elements) of the all-reduce cases per world; float32 too at the first size of world 2
SIZES = {1: (1024, 4099), 2: (1024, 4099, 40000), 4: (1024, 4099)}


def report(name: str, ok: bool | None, detail: str = "") -> None:
    """A PASS / FAIL line (``ok`` None: SKIP, the time budget ran out first)."""
    RESULTS.append((name, ok, detail))
    word = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    print(f"{word} {name}{': ' + detail if detail else ''}", flush=True)


class Group(StreamRanks):
    """``world`` emulated ranks, one stream each (tpcomm.cuda.emulated); ``dispatch``: every
    kernel through Triton's dispatcher."""

    def __init__(self, world: int, dispatch: bool):
        super().__init__(world, MAX_BYTES, GRID, device=DEV, timeout_s=10.0)
        for b in self.backs:
            if dispatch:
                _force_dispatch(b)
            else:
                b._verify = True

    def sites(self) -> list:
        return [s for b in self.backs for s in b._sites.values()]

    def close(self) -> None:
        torch.cuda.synchronize(DEV)
        for b in self.backs:
            b.check(sync=True)
            b.close()


def _force_dispatch(back) -> None:
    make = back._site

    def site(*a, **kw):
        s = make(*a, **kw)
        s.launch = s.dispatch
        return s
    back._site = site


# ---------------------------------------------------------------- the ops
def cases(world: int) -> list[tuple[str, object]]:
    """(name, make(group, salt) -> (run(r), outputs(r) -> tensors, refill(salt)))."""
    out = []
    for algo in ("one_shot_push", "one_shot_pull", "two_shot", "ring"):
        for n in SIZES[world]:
            dtypes = ((torch.bfloat16, torch.float32) if n == 1024 and world == 2
                      else (torch.bfloat16,))
            for dt in dtypes:
                out.append((f"all_reduce {algo} n={n} {str(dt)[6:]}",
                            lambda g, salt, a=algo, n=n, dt=dt: _all_reduce(g, a, n, dt, salt)))
    out.append(("all_reduce one_shot n=4099 offset 1",
                lambda g, salt: _all_reduce(g, "one_shot", 4099, torch.bfloat16, salt, off=1)))
    if world > 1:
        for mode in ("zero-copy", "in place"):
            out.append((f"all_reduce one_shot_pull {mode} n=3000",
                        lambda g, salt, m=mode: _pull_user(g, m, salt)))
        for c in (33, 4096, 20000):
            out.append((f"reduce_scatter c={c}", lambda g, salt, c=c: _rs(g, c, salt)))
            out.append((f"all_gather c={c}", lambda g, salt, c=c: _ag(g, c, salt)))
        out.append(("all_reduce_add_rms_norm 3x4097",
                    lambda g, salt: _fused(g, 3, 4097, salt)))
    out.append(("barrier", _barrier))
    return out


def _want(n, world, dtype, salt):
    return sum(exact(n, r, torch.float64, salt, device=DEV) for r in range(world)).to(dtype)


def _all_reduce(g, algo, n, dtype, salt, off=0):
    ins = [torch.empty(n + off, dtype=dtype, device=DEV)[off:] for _ in range(g.world)]
    outs = [torch.full((n,), 7.0, dtype=dtype, device=DEV) for _ in range(g.world)]

    def refill(s):
        for r, t in enumerate(ins):
            t.copy_(exact(n, r, dtype, s, device=DEV))
            outs[r].fill_(7.0)
    refill(salt)
    return (lambda r: g.backs[r].all_reduce(ins[r], outs[r], algo), lambda r: [outs[r]],
            refill, lambda s: _want(n, g.world, dtype, s))


def _pull_user(g, mode, salt):
    n = 3000
    xs = [b.empty((n,), torch.bfloat16) for b in g.backs]
    outs = [torch.empty(n, dtype=torch.bfloat16, device=DEV) for _ in g.backs]

    def refill(s):
        for r, t in enumerate(xs):
            t.copy_(exact(n, r, torch.bfloat16, s, device=DEV))
            outs[r].fill_(7.0)
    refill(salt)
    if mode == "in place":
        return (lambda r: g.backs[r].all_reduce(xs[r], xs[r], "one_shot_pull"),
                lambda r: [xs[r]], refill, lambda s: _want(n, g.world, torch.bfloat16, s))
    return (lambda r: g.backs[r].all_reduce(xs[r], outs[r], "one_shot_pull"),
            lambda r: [outs[r]], refill, lambda s: _want(n, g.world, torch.bfloat16, s))


def _rs(g, c, salt):
    W = g.world
    ins = [torch.empty(W * c, dtype=torch.bfloat16, device=DEV).view(W, c) for _ in range(W)]
    outs = [torch.empty(c, dtype=torch.bfloat16, device=DEV) for _ in range(W)]

    def refill(s):
        for r in range(W):
            ins[r].copy_(exact(W * c, r, torch.bfloat16, s, device=DEV).view(W, c))
            outs[r].fill_(5.0)
    refill(salt)
    return (lambda r: g.backs[r].reduce_scatter(ins[r], outs[r]), lambda r: [outs[r]], refill,
            None)


def _ag(g, c, salt):
    W = g.world
    ins = [torch.empty(c, dtype=torch.bfloat16, device=DEV) for _ in range(W)]
    outs = [torch.empty(W, c, dtype=torch.bfloat16, device=DEV) for _ in range(W)]

    def refill(s):
        for r in range(W):
            ins[r].copy_(exact(c, r, torch.bfloat16, s, device=DEV))
            outs[r].fill_(5.0)
    refill(salt)
    return (lambda r: g.backs[r].all_gather(ins[r], outs[r]), lambda r: [outs[r]], refill, None)


def _fused(g, rows, hidden, salt):
    W, dt = g.world, torch.bfloat16
    xs = [torch.empty(rows, hidden, dtype=dt, device=DEV) for _ in range(W)]
    ress = [torch.empty(rows, hidden, dtype=dt, device=DEV) for _ in range(W)]
    normed = [torch.empty(rows, hidden, dtype=dt, device=DEV) for _ in range(W)]
    w = (exact(hidden, 3, torch.float32, salt, device=DEV) / 8).to(dt)

    def refill(s):
        for r in range(W):
            xs[r].copy_(exact(rows * hidden, r, dt, s, device=DEV).view(rows, hidden))
            ress[r].copy_(exact(rows * hidden, 7, dt, s + 1, device=DEV).view(rows, hidden))
            normed[r].fill_(9.0)
    refill(salt)
    return (lambda r: g.backs[r].all_reduce_add_rms_norm(xs[r], ress[r], w, 1e-6, normed[r]),
            lambda r: [xs[r], ress[r], normed[r]], refill, None)


def _barrier(g, salt):
    return (lambda r: g.backs[r].barrier(), lambda r: [], lambda s: None, None)


# ---------------------------------------------------------------- checks
def _outputs(g, outputs) -> list:
    torch.cuda.synchronize(DEV)
    return [[t.clone() for t in outputs(r)] for r in range(g.world)]


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _exact(got: list, want) -> bool:
    return want is None or all(torch.equal(rg[0], want) for rg in got)


def _agree(lean: Group, disp: Group, L: tuple, D: tuple, salt: int, what: str) -> bool:
    """The two groups' outputs of a case bitwise equal, and exact sums where the case has them
    (``L``, ``D``: the case made on each group); else a FAIL line ``what``."""
    got_l, got_d = _outputs(lean, L[1]), _outputs(disp, D[1])
    want = L[3](salt) if L[3] else None
    if _same(got_l, got_d) and _exact(got_l, want):
        return True
    report(what, False, "lean and dispatcher differ" if not _same(got_l, got_d) else "wrong sum")
    return False


def check_world(world: int, deadline: float) -> None:
    lean, disp = Group(world, dispatch=False), Group(world, dispatch=True)
    eager_ok, graph_ok, n_cases = True, True, 0
    try:
        for i, (name, make) in enumerate(cases(world)):
            if time.monotonic() > deadline:
                report(f"world {world}: the rest of the cases", None,
                       f"time budget spent before {name} ({n_cases} cases checked)")
                break
            salt = 100 * world + i
            L, D = make(lean, salt), make(disp, salt)
            # eager: three calls (the first compiles and goes through the dispatcher)
            for k in range(3):
                for g, c in ((lean, L), (disp, D)):
                    c[2](salt + k)
                    g.run(c[0])
                if not _agree(lean, disp, L, D, salt + k, f"world {world} eager {name} call {k}"):
                    eager_ok = False
                    break
            # graph: capture one call per rank per group, change inputs, replay twice
            graphs = []
            for g, c in ((lean, L), (disp, D)):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    g.run(c[0])
                graphs.append(graph)
            for k in range(2):
                s = salt + 50 + k
                for (g, c), graph in zip(((lean, L), (disp, D)), graphs):
                    c[2](s)
                    graph.replay()
                if not _agree(lean, disp, L, D, s, f"world {world} graph {name} replay {k}"):
                    graph_ok = False
                    break
            n_cases += 1
        if not n_cases:
            return
        report(f"world {world}: lean == dispatcher, eager ({n_cases} cases)", eager_ok)
        report(f"world {world}: lean == dispatcher, CUDA graph, inputs changed after capture",
               graph_ok)
        sites = lean.sites()
        direct = [s for s in sites if s.reason is None and s._entries and s.lean_calls]
        bad = [s.kernel.__name__ + (f" ({s.reason})" if s.reason else "") for s in sites
               if s not in direct]
        report(f"world {world}: every bound kernel launched directly (TPCOMM_DEBUG key check "
               f"on, {sum(s.lean_calls for s in direct)} lean calls)", not bad and bool(direct),
               ", ".join(bad))
    except Exception as e:  # noqa: BLE001 - a failure is a line, the next world still runs
        report(f"world {world}", False, f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        for g in (lean, disp):
            try:
                g.close()
            except Exception as e:  # noqa: BLE001
                report(f"world {world}: close", False, str(e)[:200])


def check_no_allocation() -> None:
    """50 eager calls of the engine (2 ranks) and of a world-1 Communicator on the kernel path
    after warm-up: torch's allocator counts no new allocation."""
    import torch.distributed as dist

    from tpcomm.communicator import Communicator
    from tpcomm.groups.launch import free_port
    g = Group(2, dispatch=False)
    for b in g.backs:
        b._verify = False
    n = 8192
    ins = [torch.ones(n, dtype=torch.bfloat16, device=DEV) for _ in range(2)]
    outs = [torch.empty_like(t) for t in ins]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=DEV)
    comm = Communicator(device=DEV)
    (eng,), _ = make_emulated_group(1, comm.max_bytes, GRID, device=DEV)
    comm._backend = eng
    try:
        def calls():
            for algo in ("one_shot_push", "one_shot_pull", "two_shot", "ring"):
                g.run(lambda r: g.backs[r].all_reduce(ins[r], outs[r], algo))
            comm.all_reduce(ins[0], out=outs[0], algorithm="one_shot")
        calls()
        torch.cuda.synchronize(DEV)
        before = torch.cuda.memory_stats(DEV).get("allocation.all.allocated", 0)
        for _ in range(50):
            calls()
        torch.cuda.synchronize(DEV)
        after = torch.cuda.memory_stats(DEV).get("allocation.all.allocated", 0)
        report("no allocation per call after warm-up (engine x4 algorithms, 2 ranks; "
               "Communicator world 1, kernel path)", after == before,
               f"{after - before} allocations over 50 rounds")
    finally:
        comm._backend = None
        comm.close()
        eng.close()
        g.close()
        dist.destroy_process_group()


def run_bench(out_dir: str, limit_s: float) -> None:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "tpcomm", "bench", "host", "--device", "cuda",
           "--json", os.path.join(out_dir, "host.json"),
           "--markdown", os.path.join(out_dir, "host.md"), "--timeout", str(int(limit_s))]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s + 10, env=env)
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr[-3000:])
        report("tpcomm bench host --device cuda", p.returncode == 0, f"rc {p.returncode}")
    except subprocess.TimeoutExpired:
        report("tpcomm bench host --device cuda", False, f"over {limit_s:.0f} s")
        return
    try:
        with open(os.path.join(out_dir, "host.json")) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError) as e:
        report("bench host JSON", False, str(e))
        return
    by = {(r["what"], r["nbytes"]): r for r in rows}
    for r in rows:
        if r["what"].startswith("tpcomm Communicator.all_reduce, world 1, one_shot"):
            eng = by.get(("tpcomm GPU engine alone, world 1, one_shot/push", r["nbytes"]), {})
            over = r.get("host_us", 0) - eng.get("host_us", 0)
            print(f"TARGET {r['nbytes']} B: Communicator (kernel path) "
                  f"{r.get('host_us', float('nan')):.1f} us = "
                  f"{r.get('x_dispatcher_1arg', float('nan')):.2f} x 1-arg dispatcher "
                  f"(target <= 1.0), {r.get('x_launcher_16arg', float('nan')):.2f} x 16-arg "
                  f"launcher (goal 1.3); Communicator above the engine {over:.1f} us "
                  f"(target <= 2)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--worlds", default="2,4,1", help="emulated worlds, in this order")
    args = ap.parse_args()
    t0 = time.monotonic()
    out_dir = os.environ.get("OUT") or "/tmp/tpcomm-host-path"
    os.makedirs(out_dir, exist_ok=True)
    bench_s = 75.0
    deadline = t0 + args.budget_s - bench_s
    for world in (int(w) for w in args.worlds.split(",")):
        check_world(world, deadline)
    try:
        check_no_allocation()
    except Exception as e:  # noqa: BLE001
        report("no allocation per call", False, f"{type(e).__name__}: {str(e)[:300]}")
    left = t0 + args.budget_s - time.monotonic()
    run_bench(out_dir, max(30.0, left - 5))
    with open(os.path.join(out_dir, "host_path_checks.json"), "w") as f:
        json.dump([{"check": n, "ok": ok, "detail": d} for n, ok, d in RESULTS], f, indent=1)
    bad = [n for n, ok, _ in RESULTS if ok is False]
    print(f"{'ALL PASS' if not bad else 'FAILED: ' + '; '.join(bad)} "
          f"({time.monotonic() - t0:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
