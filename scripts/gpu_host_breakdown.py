"""Where the host microseconds of an eager GPU all_reduce go (issue 16), on ONE GPU.

Every row is one piece of the hot path timed in isolation the same way ``tpcomm bench host``
times a call (``tpcomm/bench/host.py``'s ``time_calls``): ``--iters`` calls queued back to back,
one synchronization at the end, host us per call, median of ``--reps`` repetitions, all in one
run. The pieces, in the order a call meets them:

- bare torch / Python pieces: ``torch.cuda.current_stream()``,
  ``torch.cuda.is_current_stream_capturing()`` and the C function the hot path calls,
  ``torch.cuda.current_device()`` and its C function, the raw-stream query, ``data_ptr()``,
  ``view(-1)``, ``numel()``, ``dtype``, ``get_device()``, ``is_contiguous()``,
  ``torch.empty_like``, dynamo's compile check, the error-word read, the call hash, the flight
  record, the lock and the busy flag (list pop + append) that replaced it, a dict lookup;
- the engine's own pieces: ``_begin`` (error word + stream check), the device guard
  (``_dev()``), the call hash, the bound kernel's lean launch (``LeanKernel.launch``);
- the engine call (``P2PCollectives.all_reduce``, one_shot/push, in place and out of place);
- the Communicator call: in place (``all_reduce_``), out of place with ``out`` given, out of
  place allocating its output (``all_reduce(x)``);
- the same engine and Communicator calls over 2 emulated ranks (each rank its own stream; per
  rank call, the stream switch measured alone and listed).

Ratios in the summary (same run): Communicator over engine (us and x), engine over its lean
launch, Communicator over the 16-argument kernel through ``CompiledKernel.run`` (the goal: 1.3 x)
and over the one-argument kernel through Triton's dispatcher.

    OUT=/tmp/out python scripts/gpu_host_breakdown.py [--budget-s 60] [--iters 400] [--reps 11]

``--iters`` stays below the GPU's launch queue (about 1024 kernels): with more calls queued than
it holds, a kernel slower on the GPU than its launch on the host throttles the host to the GPU's
pace, and the figure is the GPU's time, not the host's (a first run with 2000 calls read 9.4 us
for the engine's out-of-place call, 6.1 with 200: ``host_breakdown.md`` of 2026-12-03 16:03).
A row whose queueing + sync took over 1.1 x the queueing alone is marked ``gpu behind``: its
GPU work per call is longer than its host work (the host figure is still the host's).

``--baseline REV`` first runs the same rows over git revision REV's tree (``git archive`` into a
temporary directory; this script file, that tree's ``tpcomm``), in a subprocess with a third of
the budget, then over this tree, and adds a before / after table (``host_breakdown_compare.md``)
with the ratio after / before per row.

Writes ``host_breakdown.json`` and ``host_breakdown.md`` under $OUT (or ``--out``). The budget
is hard: rows not reached in time are listed as skipped, and a watchdog ends the process 20 s
after it. Exit status 0 with a SKIP line where no GPU is visible.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
# every kernel loaded at start: emulated ranks' kernels spin on each other (gpu_emulated_ranks.py)
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

import torch  # noqa: E402

# --baseline runs this script a second time over an older tree: that tree's tpcomm is imported
ROOT = os.environ.get("TPCOMM_BREAKDOWN_ROOT") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

ROWS: list[dict] = []


class Budget:
    """The run's hard time limit: ``left()`` seconds; rows past it are recorded as skipped."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def time_calls(fn, iters: int, reps: int, sync) -> dict:
    """Median over ``reps`` of host us per call, queueing only and queueing + one sync
    (``tpcomm.bench.host.time_calls``, the harness's timer; an older tree's has no spread)."""
    from tpcomm.bench.host import time_calls as timer
    t = timer(fn, iters, reps, sync)
    t.setdefault("spread_us", float("nan"))
    return t


def row(group: str, what: str, fn, args, budget: Budget, sync, calls: int = 1) -> dict:
    """Time ``fn`` (``calls`` per-rank calls per invocation) into ROWS; errors are rows too."""
    r = {"group": group, "what": what}
    if budget.left() <= 0:
        r["skipped"] = "time budget spent"
    else:
        try:
            t = time_calls(fn, args.iters, args.reps, sync)
            r.update({k: v / calls for k, v in t.items()})
        except Exception as e:  # noqa: BLE001 - one row that cannot run does not stop the table
            r["error"] = f"{type(e).__name__}: {e}"[:300]
    ROWS.append(r)
    shown = (f"{r['host_us']:8.2f} us" if "host_us" in r
             else r.get("skipped") or "ERROR " + r.get("error", ""))
    print(f"{group:<10} {what:<62} {shown}", flush=True)
    return r


# ---------------------------------------------------------------- world 1
def bare_rows(dev, x, args, budget, sync) -> None:
    """The torch and Python pieces a call may meet, alone."""
    import tpcomm.communicator as cm
    from tpcomm.flight_recorder import FlightRecorder
    from tpcomm.kernels import barrier as k_barrier
    idx = dev.index
    g = "bare"
    row(g, "torch.cuda.current_stream()", torch.cuda.current_stream, args, budget, sync)
    row(g, "torch.cuda.current_stream(dev)", lambda: torch.cuda.current_stream(dev), args,
        budget, sync)
    row(g, "torch.cuda.is_current_stream_capturing()", torch.cuda.is_current_stream_capturing,
        args, budget, sync)
    row(g, "torch._C._cuda_isCurrentStreamCapturing()",
        torch._C._cuda_isCurrentStreamCapturing, args, budget, sync)
    row(g, "torch.cuda.current_device()", torch.cuda.current_device, args, budget, sync)
    row(g, "torch._C._cuda_getDevice()", torch._C._cuda_getDevice, args, budget, sync)
    raw = torch._C._cuda_getCurrentRawStream
    row(g, "torch._C._cuda_getCurrentRawStream(idx)", lambda: raw(idx), args, budget, sync)

    def guard():
        with torch.cuda.device(dev):
            pass
    row(g, "with torch.cuda.device(dev): pass (already current)", guard, args, budget, sync)
    row(g, "tensor.data_ptr()", x.data_ptr, args, budget, sync)
    x2 = x.view(2, -1)
    row(g, "tensor.view(-1) (of a 2-D tensor)", lambda: x2.view(-1), args, budget, sync)
    row(g, "tensor.numel()", x.numel, args, budget, sync)
    row(g, "tensor.dtype", lambda: x.dtype, args, budget, sync)
    row(g, "tensor.dim()", x.dim, args, budget, sync)
    row(g, "tensor.get_device()", x.get_device, args, budget, sync)
    row(g, "tensor.is_contiguous()", x.is_contiguous, args, budget, sync)
    row(g, "out.is_same_size(x)", lambda: x.is_same_size(x), args, budget, sync)
    row(g, "out.shape != x.shape (the hot path's)", lambda: x.shape != x.shape, args, budget,
        sync)
    row(g, "torch.empty_like(x)", lambda: torch.empty_like(x), args, budget, sync)
    row(g, "torch.compiler.is_dynamo_compiling()", cm._is_compiling, args, budget, sync)
    word = ctypes.c_int64(0)
    row(g, "error word read (ctypes .value)", lambda: word.value, args, budget, sync)
    row(g, "call_hash('all_reduce', 'bfloat16', n)",
        lambda: k_barrier.call_hash("all_reduce", "bfloat16", 2048), args, budget, sync)
    rec = FlightRecorder()
    row(g, "flight record start + finish", lambda: rec.finish(rec.start("all_reduce", "a", 1, 1)),
        args, budget, sync)
    lock = threading.Lock()
    acq, rel = lock.acquire, lock.release
    row(g, "lock acquire(False) + release", lambda: (acq(False), rel()), args, budget, sync)
    free = [None]
    pop, put = free.pop, free.append
    row(g, "busy flag list.pop + append (the hot path's)", lambda: put(pop()), args, budget,
        sync)
    d = {(torch.bfloat16, 2048, "one_shot", False): 1}
    row(g, "dict.get of a 4-tuple key", lambda: d.get((torch.bfloat16, 2048, "one_shot", False)),
        args, budget, sync)
    row(g, "time.perf_counter()", time.perf_counter, args, budget, sync)


def launch_rows(dev, args, budget, sync) -> dict:
    """The reference launches: 1-arg through Triton's dispatcher, 16-arg through its launcher."""
    from tpcomm.kernels import launch_probe
    g = "launch"
    x = torch.zeros(16, device=dev)
    launch_probe.empty1(x)
    r1 = row(g, "triton 1-arg, dispatcher", lambda: launch_probe.empty1(x), args, budget, sync)
    ps = tuple(torch.zeros(16, device=dev) for _ in range(4))
    addrs = tuple(p.data_ptr() + 4096 * i for i, p in enumerate(ps * 2))
    ck16 = launch_probe.args16(ps, addrs, 4096, 64, 0)
    run16, f16, md16 = ck16.run, ck16.function, ck16.packed_metadata
    stream = torch.cuda.current_stream().cuda_stream
    r16 = row(g, "triton 16-arg, CompiledKernel.run",
              lambda: run16(1, 1, 1, stream, f16, md16, None, None, None, *ps, *addrs, 4096, 64,
                            0, 0), args, budget, sync)
    return {"d1": r1.get("host_us"), "l16": r16.get("host_us")}


def engine_rows(group: str, eng, x, out, args, budget, sync) -> dict:
    """The engine's pieces and its one_shot/push call, at world 1."""
    from tpcomm.kernels import barrier as k_barrier
    algo = "one_shot/push"
    eng.all_reduce(x, out, algo)       # binds and compiles
    sync()
    site = next(s for k, s in eng._sites.items() if k[0] == "one_shot/push")
    n = x.numel()
    h = k_barrier.call_hash("all_reduce", "bfloat16", n)
    res = {}
    res["lean"] = row(group, "engine's bound kernel: site.launch(x, out, n, h)",
                      lambda: site.launch(x, out, n, h), args, budget, sync).get("host_us")
    row(group, "engine _begin() (error word, stream check)", eng._begin, args, budget, sync)

    def dev_guard():
        with eng._dev():
            pass
    row(group, "engine: with self._dev(): pass (device guard)", dev_guard, args, budget, sync)
    res["engine_oop"] = row(group, "engine all_reduce(x, out) one_shot/push",
                            lambda: eng.all_reduce(x, out, algo), args, budget,
                            sync).get("host_us")
    res["engine_ip"] = row(group, "engine all_reduce(x, x) one_shot/push (in place)",
                           lambda: eng.all_reduce(x, x, algo), args, budget, sync).get("host_us")
    if hasattr(eng, "hot_all_reduce"):    # the per-shape call the Communicator caches
        go = eng.hot_all_reduce(algo, x.dtype, n)
        res["engine_hot_ip"] = row(group, "engine hot_all_reduce's call go(x, x) (in place)",
                                   lambda: go(x, x), args, budget, sync).get("host_us")
    return res


def communicator_rows(group: str, comm, x, out, args, budget, sync) -> dict:
    """The Communicator's calls on the kernel path: in place, out= given, out allocated."""
    comm.all_reduce_(x, algorithm="one_shot")      # decides, then the hot path
    comm.all_reduce(x, out=out, algorithm="one_shot")
    comm.all_reduce(x, algorithm="one_shot")
    sync()
    res = {}
    res["comm_ip"] = row(group, "Communicator.all_reduce_(x) (in place)",
                         lambda: comm.all_reduce_(x, algorithm="one_shot"), args, budget,
                         sync).get("host_us")
    res["comm_oop"] = row(group, "Communicator.all_reduce(x, out=out)",
                          lambda: comm.all_reduce(x, out=out, algorithm="one_shot"), args,
                          budget, sync).get("host_us")
    res["comm_alloc"] = row(group, "Communicator.all_reduce(x) (allocates out)",
                            lambda: comm.all_reduce(x, algorithm="one_shot"), args, budget,
                            sync).get("host_us")
    res["hot_ip"] = row(group, "Communicator._all_reduce_hot(x, x) (no public frame)",
                        lambda: comm._all_reduce_hot(x, x, "one_shot"), args, budget,
                        sync).get("host_us")
    return res


def world1(dev, args, budget) -> dict:
    import torch.distributed as dist

    from tpcomm.communicator import Communicator
    from tpcomm.cuda.emulated import make_emulated_group
    from tpcomm.groups.launch import free_port
    sync = torch.cuda.synchronize
    n = args.numel
    x = torch.ones(n, dtype=torch.bfloat16, device=dev)
    out = torch.empty_like(x)
    bare_rows(dev, x, args, budget, sync)
    res = launch_rows(dev, args, budget, sync)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    comm = Communicator(device=dev)
    (eng,), _ = make_emulated_group(1, comm.max_bytes, args.grid, device=dev, timeout_s=5.0)
    comm._backend = eng          # the kernel path at world 1 (as tpcomm bench host does)
    try:
        res.update(engine_rows("world 1", eng, x, out, args, budget, sync))
        res.update(communicator_rows("world 1", comm, x, out, args, budget, sync))
        eng.check(sync=True)
    finally:
        comm._backend = None
        comm.close()
        eng.close()
        dist.destroy_process_group()
    return res


# ---------------------------------------------------------------- world 2
def world2(dev, args, budget) -> dict:
    """Engine and Communicator calls over 2 emulated ranks (tests/_emulated.py's set-up), per
    rank call, each rank on its own stream; the stream switch alone too."""
    import importlib.util
    # by path: a "tests" package installed elsewhere must not shadow this tree's
    spec = importlib.util.spec_from_file_location("_tpcomm_emulated",
                                                  os.path.join(ROOT, "tests", "_emulated.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    EmulatedRanks = mod.EmulatedRanks
    world = 2
    g = EmulatedRanks(world, max_bytes=8 << 20, timeout_s=5.0, device=dev)
    streams = g.streams
    main = torch.cuda.current_stream(dev)
    n = args.numel
    ins = [torch.ones(n, dtype=torch.bfloat16, device=dev) for _ in range(world)]
    outs = [torch.empty_like(t) for t in ins]
    engs = [c._backend for c in g.comms]
    set_stream = torch.cuda.set_stream

    def sync():
        for s in streams:
            s.synchronize()

    def each(fn):
        def go():
            for r in range(world):
                set_stream(streams[r])
                fn(r)
            set_stream(main)
        return go

    res = {}
    grp = "world 2"
    try:
        for fn in (lambda r: engs[r].all_reduce(ins[r], outs[r], "one_shot/push"),
                   lambda r: g.comms[r].all_reduce_(ins[r], algorithm="one_shot"),
                   lambda r: g.comms[r].all_reduce(ins[r], out=outs[r], algorithm="one_shot"),
                   lambda r: g.comms[r].all_reduce(ins[r], algorithm="one_shot")):
            g.warm(fn)        # one call per run: first-use compiles while no rank waits
        res["switch"] = row(grp, "stream switch alone", each(lambda r: None), args, budget,
                            sync, calls=world).get("host_us")
        res["engine_oop"] = row(grp, "engine all_reduce(x, out) one_shot/push",
                                each(lambda r: engs[r].all_reduce(ins[r], outs[r],
                                                                  "one_shot/push")),
                                args, budget, sync, calls=world).get("host_us")
        res["engine_ip"] = row(grp, "engine all_reduce(x, x) one_shot/push (in place)",
                               each(lambda r: engs[r].all_reduce(ins[r], ins[r],
                                                                 "one_shot/push")),
                               args, budget, sync, calls=world).get("host_us")
        res["comm_ip"] = row(grp, "Communicator.all_reduce_(x) (in place)",
                             each(lambda r: g.comms[r].all_reduce_(ins[r], algorithm="one_shot")),
                             args, budget, sync, calls=world).get("host_us")
        res["comm_oop"] = row(grp, "Communicator.all_reduce(x, out=out)",
                              each(lambda r: g.comms[r].all_reduce(ins[r], out=outs[r],
                                                                   algorithm="one_shot")),
                              args, budget, sync, calls=world).get("host_us")
        res["comm_alloc"] = row(grp, "Communicator.all_reduce(x) (allocates out)",
                                each(lambda r: g.comms[r].all_reduce(ins[r],
                                                                     algorithm="one_shot")),
                                args, budget, sync, calls=world).get("host_us")
        g.check("the timed calls")
        res["check"] = check_sums(g, ins, outs)
    finally:
        set_stream(main)
        g.close()
    return res


def check_sums(g, ins, outs) -> bool:
    """The hot path's results at world 2 (the timed calls only launch): out of place, in place,
    and a 2-D view of the same numel (the same cache entry), every rank exactly 1 + 2."""
    world = len(ins)
    ok = True
    for what, fn, res in (
            ("out=", lambda r: g.comms[r].all_reduce(ins[r], out=outs[r], algorithm="one_shot"),
             outs),
            ("2-D out=", lambda r: g.comms[r].all_reduce(ins[r].view(2, -1),
                                                         out=outs[r].view(2, -1),
                                                         algorithm="one_shot"), outs),
            ("in place", lambda r: g.comms[r].all_reduce_(ins[r], algorithm="one_shot"), ins)):
        for r in range(world):
            ins[r].fill_(r + 1)
            outs[r].fill_(-1)
        g.run(fn)
        g.check(what)
        good = all(bool((t == 3).all()) for t in res)
        print(f"{'PASS' if good else 'FAIL'} world 2 Communicator all_reduce {what}: every "
              f"element 1 + 2", flush=True)
        ok = ok and good
    return ok


# ---------------------------------------------------------------- report
def summary(w1: dict, w2: dict) -> list[str]:
    """The ratios the issue's targets are stated in (None where a row did not run)."""
    def sub(a, b):
        return None if a is None or b is None else a - b

    def div(a, b):
        return None if a is None or not b else a / b

    lines = []
    def add(name, value, unit, target=""):
        v = "n/a" if value is None else (f"{value:.2f} us" if unit == "us" else f"{value:.2f} x")
        lines.append(f"| {name} | {v} | {target} |")
        return value

    for tag, r in (("world 1", w1), ("world 2", w2)):
        add(f"{tag}: Communicator above engine, in place", sub(r.get("comm_ip"), r.get("engine_ip")),
            "us", "<= 2 us")
        add(f"{tag}: Communicator above engine, out= given",
            sub(r.get("comm_oop"), r.get("engine_oop")), "us", "<= 2 us")
        add(f"{tag}: Communicator / engine, in place", div(r.get("comm_ip"), r.get("engine_ip")),
            "x")
        add(f"{tag}: allocating out costs", sub(r.get("comm_alloc"), r.get("comm_oop")), "us")
    add("world 1: Communicator in place above the engine's per-shape call",
        sub(w1.get("comm_ip"), w1.get("engine_hot_ip")), "us")
    add("world 1: engine above its lean launch (out of place)",
        sub(w1.get("engine_oop"), w1.get("lean")), "us")
    add("world 1: engine / lean launch", div(w1.get("engine_oop"), w1.get("lean")), "x")
    add("world 1: Communicator in place / 16-arg CompiledKernel.run",
        div(w1.get("comm_ip"), w1.get("l16")), "x", "goal 1.3 x")
    add("world 1: Communicator out= / 16-arg CompiledKernel.run",
        div(w1.get("comm_oop"), w1.get("l16")), "x", "goal 1.3 x")
    add("world 1: Communicator in place / 1-arg dispatcher", div(w1.get("comm_ip"), w1.get("d1")),
        "x", "<= 1.0 x")
    add("world 2: Communicator in place / 16-arg CompiledKernel.run (per rank, with switch)",
        div(w2.get("comm_ip"), w1.get("l16")), "x")
    return lines


def git_head() -> str:
    try:
        import subprocess
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except Exception:  # noqa: BLE001 - the device copy may have no git metadata
        return "?"


def write(out_dir: str, meta: dict, lines: list[str]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "host_breakdown.json"), "w") as f:
        json.dump({"meta": meta, "rows": ROWS, "summary": lines}, f, indent=1)
    md = [f"# Host path breakdown ({meta['device']}, {meta['date']})", "",
          f"- command: `{meta['command']}`", f"- git {meta['git']}; torch {meta['torch']}, "
          f"triton {meta['triton']}; {meta['numel']} bf16 elements; {meta['iters']} calls "
          f"queued, median of {meta['reps']}", "",
          "| ratio | value | target |", "|---|---:|---|", *lines, "",
          "| group | piece | host us/call | with sync | spread | |", "|---|---|---:|---:|---:|---|"]
    for r in ROWS:
        if "host_us" in r:
            behind = "gpu behind" if r["with_sync_us"] > 1.1 * r["host_us"] else ""
            md.append(f"| {r['group']} | {r['what']} | {r['host_us']:.2f} | "
                      f"{r['with_sync_us']:.2f} | {r['spread_us']:.2f} | {behind} |")
        else:
            md.append(f"| {r['group']} | {r['what']} | {r.get('skipped') or r.get('error')} "
                      f"| | | |")
    with open(os.path.join(out_dir, "host_breakdown.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def run_baseline(args) -> list[dict] | None:
    """This script over revision ``args.baseline``'s tree, with a third of the budget; its rows
    (None where it could not run: said on stdout)."""
    import subprocess
    import tempfile
    tree = tempfile.mkdtemp(prefix="tpcomm-baseline-")
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    try:
        arch = subprocess.run(["git", "-C", here, "archive", args.baseline], capture_output=True,
                              timeout=60, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=arch, timeout=60, check=True)
    except (subprocess.SubprocessError, OSError) as e:
        print(f"FAIL baseline {args.baseline}: no tree ({e})", flush=True)
        return None
    share = max(10.0, args.budget_s / 3)
    out = os.path.join(args.out, "baseline")
    cmd = [sys.executable, os.path.abspath(__file__), "--budget-s", str(share), "--iters",
           str(args.iters), "--reps", str(args.reps), "--bytes", str(args.bytes), "--grid",
           str(args.grid), "--out", out]
    env = dict(os.environ, TPCOMM_BREAKDOWN_ROOT=tree, PYTHONPATH=tree)
    print(f"== baseline {args.baseline} ({tree}), {share:.0f} s", flush=True)
    try:
        p = subprocess.run(cmd, env=env, timeout=share + 25, capture_output=True, text=True)
        print(p.stdout[-4000:], p.stderr[-2000:], flush=True)
        with open(os.path.join(out, "host_breakdown.json")) as f:
            return json.load(f)["rows"]
    except (subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
        print(f"FAIL baseline {args.baseline}: {e}", flush=True)
        return None


def compare(out_dir: str, rev: str, before: list[dict]) -> None:
    """host_breakdown_compare.md: every row of both runs, before / after / after over before."""
    old = {(r["group"], r["what"]): r.get("host_us") for r in before}
    md = [f"# Host path breakdown, {rev} (before) against this tree (after)", "",
          "| group | piece | before us | after us | after / before |", "|---|---|---:|---:|---:|"]
    for r in ROWS:
        a, b = r.get("host_us"), old.get((r["group"], r["what"]))
        ratio = f"{a / b:.2f}" if a and b else ""
        md.append(f"| {r['group']} | {r['what']} | {'' if b is None else f'{b:.2f}'} | "
                  f"{'' if a is None else f'{a:.2f}'} | {ratio} |")
    text = "\n".join(md) + "\n"
    with open(os.path.join(out_dir, "host_breakdown_compare.md"), "w") as f:
        f.write(text)
    print(text, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=60.0, help="hard limit of the run")
    ap.add_argument("--iters", type=int, default=400, help="calls queued per repetition (keep "
                    "below the launch queue's ~1024: see the docstring)")
    ap.add_argument("--reps", type=int, default=11, help="repetitions (median reported)")
    ap.add_argument("--bytes", type=int, default=4096, help="all-reduce size (bf16)")
    ap.add_argument("--grid", type=int, default=8, help="blocks per kernel")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/tpcomm-host-breakdown")
    ap.add_argument("--baseline", metavar="REV", help="also time git revision REV's tree first")
    args = ap.parse_args()
    args.numel = args.bytes // 2
    if not torch.cuda.is_available():
        print("SKIP gpu_host_breakdown: no GPU visible")
        return 0
    # the hard limit: a watchdog ends the process if a wait outlives the budget
    t = threading.Timer(args.budget_s + 20, lambda: (print("FAIL watchdog: over budget",
                                                           flush=True), os._exit(3)))
    t.daemon = True
    t.start()
    import triton
    budget = Budget(args.budget_s)
    before = run_baseline(args) if args.baseline else None
    dev = torch.device("cuda", torch.cuda.current_device())
    meta = {"device": torch.cuda.get_device_name(dev), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                             time.gmtime()),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "git": git_head(), "torch": torch.__version__, "triton": triton.__version__,
            "numel": args.numel, "iters": args.iters, "reps": args.reps}
    w1 = w2 = {}
    ok = True
    try:
        w1 = world1(dev, args, budget)
    except Exception as e:  # noqa: BLE001
        ok = False
        print(f"FAIL world 1: {type(e).__name__}: {e}", flush=True)
    try:
        if budget.left() > 0:
            w2 = world2(dev, args, budget)
    except Exception as e:  # noqa: BLE001
        ok = False
        print(f"FAIL world 2: {type(e).__name__}: {e}", flush=True)
    if w2.get("check") is False:
        ok = False
    lines = summary(w1, w2)
    print("\n".join(lines))
    write(args.out, meta, lines)
    if before is not None:
        compare(args.out, args.baseline, before)
    errors = [r for r in ROWS if "error" in r]
    ok = ok and not errors
    print(f"{'PASS' if ok else 'FAIL'} gpu_host_breakdown: {len(ROWS)} rows, "
          f"{sum('skipped' in r for r in ROWS)} skipped, {len(errors)} errors; "
          f"{args.out}/host_breakdown.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
