"""One GPU, at most 200 s: the fused GEMM + reduce-scatter at world 1 (issue 14's remaining miss),
its schedules and tile configs against torch.mm, the current schedule and the plain core, bf16
[M, 7168] x [7168, 8192], M = 1024 / 4096 / 16384, in one run.

    OUT=/tmp/out PYTHONUNBUFFERED=1 python3 scripts/gpu_fused_rs_sweep.py
        [--ms 1024,4096,16384] [--limit-s 190] [--variants rs_rounds,rs_single,...]

Why: on 2026-12-02 the fused reduce-scatter ran 1.069 / 1.099 x inductor at M = 4096 / 16384
while the fused all-gather + GEMM (the same GEMM core) met <= 1.0 x. Until issue 14's fix the
reduce-scatter ran in rounds of one push slot (1024 rows at N = 8192 with the default 32 MiB
buffer: 4 launches at M = 4096, 16 at 16384, each ending in a drained wave) and took the
table's 1024-row config at every M, although at world 1 its kernel stores every tile straight
into ``out`` and uses no slot. Schedule "single" (now the default at world 1) runs one launch
over all rows with the table's config for M, not flattened, as the all-gather's GEMM does.

Variants (``VARIANTS``; each timed at every M):

    torch_mm            cuBLAS, the baseline of every ratio
    rs_rounds           the fused op as before the fix: schedule="rounds", the 1024-row config
    rs_single           the new default at world 1: one launch, the table's config for M
                        without flattening (the all-gather GEMM's loop)
    core_single         the plain core (``_gemm.matmul``, local store) with rs_single's config
                        (the fused kernel without its communication)
    ag_w1               the fused all-gather + GEMM at world 1 (the path that met the target)
    rs_single_<cfg>     one launch with a fixed config (s3/s4, flattened or not, group 16)
    rs_rounds_s4_nofl   rounds with the 16384-row config (does the config or the rounds cost?)
    core_s3_nofl        the plain core with the rounds' config (the 2026-12-02 "core" column)

Checks (before timing, every variant at every M): the fused ops bitwise equal to the unfused
reference (the plain core with the same tile config: at world 1 the reduce-scatter of one rank
is its own product, rounded once), everything within 2e-2 of max |torch.mm|. Also recorded,
not required: bitwise equal to the core with the 1024-row config (same BLOCK_K, so the same
summation order: expected true for every variant here).

Timing: CUDA events around back-to-back calls (about 25 ms), median of 7 repetitions
(``tpcomm.bench.fused_gemm.time_us``, as in the 2026-12-02 tables), and the same for replays of
a CUDA graph of one call (no host launch cost: separates the rounds' GPU cost from their
Python launches). Inputs are not rotated (b is 117 MB, twice the L2).

Guarding: the measurements run in a worker subprocess that reports a JSON line per result;
a variant running longer than ITEM_LIMIT_S ends the worker (faulthandler prints where it
was), the parent records the variant as hung and starts a new worker for the rest while time
is left; the whole run stops at --limit-s (default 190 s) with what it has. No
warp-specialized config anywhere (``_gemm.plan`` refuses them: one hung the GPU process on
2026-12-02).

Writes $OUT/fused_rs_sweep.json and $OUT/fused_rs_sweep.md; prints the table and PASS/FAIL.
Exit status 1 when a result was wrong (or nothing was measured).

--grid1k (issue 14's last miss: M = 1024, where the fused ops ran 1.069 (RS) / 1.029 (AG) x
inductor in graph replays on 2026-12-03):

    OUT=/tmp/out PYTHONUNBUFFERED=1 python3 scripts/gpu_fused_rs_sweep.py --grid1k --budget-s 150

times every tile config of ``GRID_1K`` (inductor's sm90 persistent-TMA list and neighbours:
128x256 / 256x128 / 128x128 / 64x256 tiles, BLOCK_K 64 / 128, 3-5 stages, 4 / 8 warps, group
8 / 4, the loop flattened or not, whole- or half-tile TMA stores) for both fused ops at world
1 (``rs1k_<config>``, ``ag1k_<config>``: each bitwise-checked against the plain core with its
config), interleaved with torch.mm and inductor's max-autotune GEMM (21 passes unless
--interleave says otherwise), and prints per config the ratios to inductor and torch.mm
(calls and graph replays), then per op and for both ops together the best config by the
graph-replay ratio to inductor as a ready-to-paste ``fused_gemm.SINGLE_CONFIGS`` entry
(lines ``BEST ...`` and ``SINGLE_CONFIGS entry: ...``). --budget-s is hard, compiles included:
the worker builds no variant within TIMING_RESERVE_S of its deadline (listed as over budget)
and stops its passes before it; the parent kills it at the budget. Writes
$OUT/fused_1k_sweep.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

K, N = 7168, 8192
MS = (1024, 4096, 16384)
ITEM_LIMIT_S = 60        # one variant at every M (compile, check, time)
INDUCTOR_LIMIT_S = 240   # inductor's max-autotune at one M (--interleave)
RESTART_MIN_S = 25       # a new worker needs this much time left (start-up, inputs, torch.mm)
TIMING_RESERVE_S = 20    # --interleave: per M, left for graphs and the timed passes
WORKER_MARGIN_S = 8      # --interleave: the worker stops this long before the parent's kill
TOL = 2e-2               # against torch.mm, relative to max |torch.mm|

# name -> (kind, gemm keyword arguments); configs as GemmConfig fields (warp_specialize never)
_S3_NOFL = dict(flatten=False)
VARIANTS = {
    "torch_mm": ("mm", {}),
    "rs_rounds": ("rs", {"schedule": "rounds"}),
    "rs_single": ("rs", {"schedule": "single"}),
    "core_single": ("core", {"config": "rs_single"}),
    "ag_w1": ("ag", {}),
    "rs_single_s3_nofl": ("rs", {"schedule": "single", "config": _S3_NOFL}),
    "rs_single_s4_nofl": ("rs", {"schedule": "single",
                                 "config": dict(flatten=False, num_stages=4)}),
    "rs_single_s3_flat": ("rs", {"schedule": "single", "config": {}}),
    "rs_single_s4_flat": ("rs", {"schedule": "single", "config": dict(num_stages=4)}),
    "rs_single_g16_s4_nofl": ("rs", {"schedule": "single",
                                     "config": dict(group_m=16, flatten=False, num_stages=4)}),
    "rs_rounds_s4_nofl": ("rs", {"schedule": "rounds",
                                 "config": dict(flatten=False, num_stages=4)}),
    "core_s3_nofl": ("core", {"config": _S3_NOFL}),
    # --interleave candidates (2026-12-03, second session): inductor in the same run, and the
    # core's TMA-store epilogue (a host descriptor over C, with and without the split halves)
    "inductor": ("inductor", {}),
    "core_tst": ("core", {"config": "rs_single", "tma_store": True}),
    "core_tst_split": ("core", {"config": "rs_single", "tma_store": True, "split": True}),
    "core_tst_s4_nofl": ("core", {"config": dict(flatten=False, num_stages=4),
                                  "tma_store": True}),
    "core_tst_s4_flat": ("core", {"config": dict(num_stages=4), "tma_store": True}),
    "core_tst_256x128": ("core", {"config": dict(block_m=256, block_n=128),
                                  "tma_store": True}),
    "core_tst_g16": ("core", {"config": dict(group_m=16), "tma_store": True}),
}
# --interleave default set: the current default, its core, inductor, cuBLAS and the candidates
INTERLEAVED = ("torch_mm", "inductor", "rs_single", "core_single", "ag_w1", "core_tst",
               "core_tst_split", "core_tst_s4_nofl", "core_tst_s4_flat", "core_tst_256x128",
               "core_tst_g16")


# --grid1k (issue 14's last miss, 2026-12-03 third session): at M = 1024 the fused ops ran
# 1.069 (RS) / 1.029 (AG) x inductor in graph replays with 128x256x64, 3 stages, 8 warps, group
# 8, the loop not flattened, half-tile TMA stores (overlap-fused-gemm-h200x1-2026-12-03.md).
# Inductor's autotuner picked that very tile (128x256x64 s3 w8, flattened loop) there, then
# 256x128x64 s4 w8, 128x128x64 s3 w4 (non-persistent), 128x128x64 s5 w4 / w8 (fused-rs-
# interleaved-h200x1-2026-12-03.log); its sm90 persistent-TMA list (torch/_inductor/
# template_heuristics/triton.py, persistent_mm_configs) is 128x256x64 s3 w8, 128x128x64 s3/s4/
# s5 w8, 128x128x128 s3 w8/w4, 256x128x64 s4 w8, 128x128x64 s5 w4. Every entry below: TMA loads
# and stores (the world-1 path), no warp specialization; shared memory per stage
# (BM*BK + BK*BN) * 2 bytes plus the store box (half a tile with split): all <= 224 KiB of 227.
# In priority order (a run short of budget drops the last ones).
def _cfg(bm, bn, bk, stages, warps, group=8, flat=False, split=True):
    return dict(block_m=bm, block_n=bn, block_k=bk, num_stages=stages, num_warps=warps,
                group_m=group, flatten=flat, epilogue_split=split, tma_store=True)


GRID_1K = {
    "128x256x64_s3w8_nofl_split": _cfg(128, 256, 64, 3, 8),      # the current default
    "128x256x64_s3w8_flat_split": _cfg(128, 256, 64, 3, 8, flat=True),
    "128x256x64_s3w8_flat": _cfg(128, 256, 64, 3, 8, flat=True, split=False),   # inductor's
    "128x256x64_s4w8_nofl_split": _cfg(128, 256, 64, 4, 8),
    "256x128x64_s4w8_nofl_split": _cfg(256, 128, 64, 4, 8),
    "128x128x64_s5w4_nofl_split": _cfg(128, 128, 64, 5, 4),
    "128x128x64_s4w8_nofl_split": _cfg(128, 128, 64, 4, 8),
    "128x256x64_s3w8_nofl": _cfg(128, 256, 64, 3, 8, split=False),
    "128x256x64_s4w8_flat_split": _cfg(128, 256, 64, 4, 8, flat=True),
    "128x256x64_s3w8g4_nofl_split": _cfg(128, 256, 64, 3, 8, group=4),
    "256x128x64_s3w8_nofl_split": _cfg(256, 128, 64, 3, 8),
    "128x128x64_s5w8_flat_split": _cfg(128, 128, 64, 5, 8, flat=True),
    "128x128x128_s3w8_nofl_split": _cfg(128, 128, 128, 3, 8),
    "64x256x64_s4w4_nofl_split": _cfg(64, 256, 64, 4, 4),
    "64x256x64_s5w4_nofl_split": _cfg(64, 256, 64, 5, 4),
}
GRID_OPS = {"rs": "rs1k_", "ag": "ag1k_"}   # kind -> variant prefix
for _key, _fields in GRID_1K.items():
    for _kind, _prefix in GRID_OPS.items():
        VARIANTS[_prefix + _key] = (_kind, {"config": _fields})
# --grid1k default set: cuBLAS, inductor, each config for both ops (priority order), then the
# default paths of both ops as a noise control (the current config again: the same binary, no
# compile; how far two timings of one kernel in this run differ)
CONTROLS = {"rs": "rs_single", "ag": "ag_w1"}
GRID_VARIANTS = ("torch_mm", "inductor") + tuple(
    p + key for key in GRID_1K for p in GRID_OPS.values()) + tuple(CONTROLS.values())
GRID_MS = (1024,)


def emit(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


# ---------------------------------------------------------------- worker (the GPU process)


def worker(names, ms, smoke=False, interleave=0, until=None):
    """The measurements (``smoke``: on the CPU under TRITON_INTERPRET=1 at a small K and N,
    one timed call, no graph: the code path alone, for a machine without a GPU). ``until``
    (``time.time()``, --interleave only): build no variant and time no pass past it."""
    import faulthandler

    import torch

    from tpcomm.bench.fused_gemm import MAX_BYTES, inputs, time_us, world1_engine
    from tpcomm.cuda import fused_gemm
    from tpcomm.kernels import _gemm

    k, n = (K, N) if not smoke else (128, 512)
    if smoke:
        # the interpreter patches of the CPU sims (numpy >= 2.4 and Triton 3.6's interpreter)
        sys.path.insert(0, os.path.join(HERE, "..", "tests", "unit"))
        import gpu_protocol_sim  # noqa: F401

        from tpcomm.cuda.emulated import make_emulated_group
        dev = torch.device("cpu")
        eng = make_emulated_group(1, MAX_BYTES, 4)[0][0]
        emit(event="device", name="cpu (smoke)", sms=4, torch=torch.__version__, K=k, N=n)

        def time_us(fn):   # noqa: F811 - one call, the path only
            t0 = time.perf_counter()
            fn()
            return round((time.perf_counter() - t0) * 1e6, 1)
    else:
        dev = torch.device("cuda", 0)
        props = torch.cuda.get_device_properties(dev)
        emit(event="device", name=props.name, sms=props.multi_processor_count,
             torch=torch.__version__, triton=__import__("triton").__version__, K=k, N=n)
        eng = world1_engine(dev)
    data = {M: inputs(M, k, n, torch.bfloat16, dev) for M in ms}
    mm = {M: torch.mm(*data[M]) for M in ms}
    ref_cfg = _gemm.GemmConfig(flatten=False)      # the rounds' (1024-row) config
    common = {}
    for M in ms:
        c = torch.empty_like(mm[M])
        _gemm.matmul(_gemm.plan(*data[M], ref_cfg), c)
        common[M] = c
    if not smoke:
        torch.cuda.synchronize()

    def graph_us(fn):
        """Replays of a graph of one call (``fn`` already ran: compiled and loaded)."""
        torch.cuda.synchronize(dev)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return time_us(g.replay)

    def build(kind, kw, M):
        """(call, output, reference output or None, config name)"""
        a, b = data[M]
        kw = dict(kw)
        if isinstance(kw.get("config"), dict):
            kw["config"] = _gemm.GemmConfig(**kw["config"])
        if kind == "mm":
            y = torch.empty_like(mm[M])
            return (lambda: torch.mm(a, b, out=y)), y, None, "cublas"
        if kind == "inductor":   # inductor's best Triton GEMM (minutes of autotuning)
            from tpcomm.bench.fused_gemm import inductor_mm
            f = inductor_mm()
            y = f(a, b)
            return (lambda: f(a, b)), y, None, "inductor max-autotune (Triton templates)"
        if kind == "core":
            cfg = kw["config"]
            if cfg == "rs_single":   # the default fused op's config at world 1
                cfg = fused_gemm.gemm_config(eng, "matmul_reduce_scatter", a, b,
                                             schedule="single")
            if kw.get("split"):
                cfg = dataclasses.replace(cfg, epilogue_split=True)
            if "tma_store" in kw:   # else the config's (the fused op's own at world 1)
                cfg = dataclasses.replace(cfg, tma_store=kw["tma_store"])
            p = _gemm.plan(a, b, cfg)
            c = torch.empty_like(mm[M])
            return (lambda: _gemm.matmul(p, c)), c, None, cfg.name()
        op = {"rs": "matmul_reduce_scatter", "ag": "all_gather_matmul"}[kind]
        cfg = fused_gemm.gemm_config(eng, op, a, b, **kw)
        ref = torch.empty_like(mm[M])
        _gemm.matmul(_gemm.plan(a, b, dataclasses.replace(cfg, num_sms=None)), ref)
        out = torch.full_like(mm[M], 7.0)
        fn = getattr(eng, op)
        return (lambda: fn(a, b, out, **kw)), out, ref, cfg.name()

    if interleave:
        for M in ms:   # the configs the fused ops take by default (the table marks them)
            a, b = data[M]
            emit(event="current", M=M, **{
                kind: fused_gemm.gemm_config(eng, op, a, b).name()
                for kind, op in (("rs", "matmul_reduce_scatter"), ("ag", "all_gather_matmul"))})
        return interleaved(names, ms, interleave, build, graph_us, eng, mm, common, smoke,
                           time_us, until)
    for name in names:
        kind, kw = VARIANTS[name]
        emit(event="start", variant=name)
        faulthandler.dump_traceback_later(ITEM_LIMIT_S * (10 if smoke else 1), exit=True)
        for M in ms:
            t0 = time.perf_counter()
            row = dict(event="row", variant=name, M=M, kind=kind)
            try:
                fn = checked(row, build, eng, mm, common, kind, kw, M, t0)
                if row["ok"]:
                    row["us"] = time_us(fn)
                    try:
                        if not smoke:
                            row["graph_us"] = graph_us(fn)
                    except Exception as e:  # noqa: BLE001 - graphs are a second opinion
                        row["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    eng.check(sync=True)
            except Exception as e:  # noqa: BLE001 - a variant that fails is reported
                row["ok"] = False
                row["error"] = f"{type(e).__name__}: {str(e).strip()[-300:]}"
            row["s"] = round(time.perf_counter() - t0, 1)
            emit(**row)
            if not smoke:
                torch.cuda.empty_cache()
        faulthandler.cancel_dump_traceback_later()
        emit(event="done", variant=name)


def interleaved(names, ms, rounds, build, graph_us, eng, mm, common, smoke, time_us,
                until=None):
    """``--interleave``: at each M, every variant built and checked first (each under its own
    faulthandler limit; inductor's autotuning gets INDUCTOR_LIMIT_S), then timed in ``rounds``
    round-robin passes (the order rotated each pass), one ~25 ms sample per variant per pass,
    and the same for replays of a one-call CUDA graph: clock and thermal drift fall on every
    variant alike. A row's ``us`` / ``graph_us`` is the median over the passes; ``spread``
    the (max - min) / median of its samples.

    ``until`` (``time.time()``; the budget): a variant whose build would start within
    TIMING_RESERVE_S of it is skipped (a row with ``error`` "budget"), and the passes stop
    once the next would end past it (at least one pass; ``rounds`` in the row says how many
    ran)."""
    import faulthandler
    import statistics

    import torch
    emit(event="start", variant="interleaved")
    for M in ms:
        built = {}
        for name in names:
            kind, kw = VARIANTS[name]
            if until is not None and time.time() > until - TIMING_RESERVE_S:
                emit(event="row", variant=name, M=M, kind=kind, ok=False, config="-",
                     error="budget: not built (no time left to time it)", s=0.0)
                continue
            limit = INDUCTOR_LIMIT_S if kind == "inductor" else ITEM_LIMIT_S
            faulthandler.dump_traceback_later(limit * (10 if smoke else 1), exit=True)
            t0 = time.perf_counter()
            row = dict(event="row", variant=name, M=M, kind=kind)
            try:
                fn = checked(row, build, eng, mm, common, kind, kw, M, t0)
                if row["ok"]:
                    built[name] = (fn, row)
                else:
                    row["s"] = round(time.perf_counter() - t0, 1)
                    emit(**row)
            except Exception as e:  # noqa: BLE001 - a variant that fails is reported
                row["ok"] = False
                row["error"] = f"{type(e).__name__}: {str(e).strip()[-300:]}"
                row["s"] = round(time.perf_counter() - t0, 1)
                emit(**row)
            faulthandler.cancel_dump_traceback_later()
        graphs = {}
        if not smoke:
            from tpcomm.bench.fused_gemm import graph_of
            for name, (fn, row) in built.items():
                g = graph_of(fn)    # graphs are a second opinion: None where capture failed
                if g is None:
                    row["graph_error"] = "the call could not be captured in a CUDA graph"
                else:
                    graphs[name] = g
        samples = {n: [] for n in built}
        gsamples = {n: [] for n in graphs}
        order = list(built)
        # the passes: 2 x ~25 ms per variant each (calls, graph replays), with room to spare
        faulthandler.dump_traceback_later((ITEM_LIMIT_S + 0.2 * rounds * len(order))
                                          * (10 if smoke else 1), exit=True)
        t0 = time.perf_counter()
        done, last = 0, 0.0
        for r in range(rounds):
            if done and until is not None and time.time() + 1.2 * last > until:
                break
            t1 = time.perf_counter()
            done += 1
            k = r % len(order)
            for name in order[k:] + order[:k]:
                samples[name].append(time_us(built[name][0], reps=1) if not smoke else
                                     time_us(built[name][0]))
                if name in graphs:
                    gsamples[name].append(time_us(graphs[name].replay, reps=1))
            last = time.perf_counter() - t1
        faulthandler.cancel_dump_traceback_later()
        eng.check(sync=True)
        for name, (fn, row) in built.items():
            xs = samples[name]
            med = statistics.median(xs)
            row["us"] = round(med, 1)
            row["spread"] = round((max(xs) - min(xs)) / med, 3)
            row["samples"] = xs
            row["rounds"] = done
            if gsamples.get(name):
                row["graph_us"] = round(statistics.median(gsamples[name]), 1)
                row["graph_samples"] = gsamples[name]
            row["s"] = round(time.perf_counter() - t0, 1)
            emit(**row)
        del built, graphs
        if not smoke:
            torch.cuda.empty_cache()
    emit(event="done", variant="interleaved")


def checked(row, build, eng, mm, common, kind, kw, M, t0):
    """Build the variant, run it once and fill ``row``'s checks: within TOL of torch.mm, bitwise
    the 1024-row config's core, bitwise its unfused reference (None where a variant has no
    output of its own to compare or no reference), ``ok``; returns the call."""
    import torch

    from tpcomm.bench.fused_gemm import rel_err
    fn, out, ref, row["config"] = build(kind, kw, M)
    fn()
    eng.check(sync=True)
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    row["err_vs_torch_mm"] = 0.0 if out is None else rel_err(out, mm[M])
    row["bitwise_vs_1024_config_core"] = (None if out is None else
                                          bool(torch.equal(out, common[M])))
    row["bitwise_vs_unfused"] = None if ref is None else bool(torch.equal(out, ref))
    row["ok"] = row["err_vs_torch_mm"] <= TOL and row["bitwise_vs_unfused"] is not False
    return fn


# ---------------------------------------------------------------- parent (guard, table)


def _stop(p):
    """Kill the worker's process group (the worker this script started, by its id)."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def show(r):
    print(f"  {r['variant']:24s} M={r['M']:6d} " + (
        f"{r['us']:8.1f} us  graph {r.get('graph_us', float('nan')):8.1f}  "
        f"bitwise={r['bitwise_vs_unfused']}  {r['config']}" if r.get("us") else
        f"FAILED {r.get('error', 'wrong')}") + f"  [{r.get('s', '-')} s]", flush=True)


def run_workers(names, ms, deadline, cmd=None, smoke=False):
    """Workers until every variant ran, hung or the deadline came: (result lines, hung
    variants, variants not run). A worker prints ``RESULT {json}`` lines (start, row, done per
    variant); one that ends inside a variant had it hang or crash: that variant is not tried
    again. ``cmd(todo)``: the worker's command line (tests)."""
    cmd = cmd or (lambda todo: [sys.executable, os.path.abspath(__file__), "--worker",
                                "--variants", ",".join(todo), "--ms", ",".join(map(str, ms))]
                          + (["--smoke"] if smoke else []))
    lines, todo, hung = [], list(names), []
    while todo and deadline - time.perf_counter() > RESTART_MIN_S:
        p = subprocess.Popen(cmd(todo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
        timer = threading.Timer(max(1.0, deadline - time.perf_counter()), _stop, (p,))
        timer.start()
        current = None
        try:
            for line in p.stdout:
                if not line.startswith("RESULT "):
                    print("  | " + line.rstrip(), flush=True)
                    continue
                r = json.loads(line[len("RESULT "):])
                lines.append(r)
                if r["event"] == "start":
                    current = r["variant"]
                elif r["event"] == "done":
                    todo.remove(r["variant"])
                    current = None
                elif r["event"] == "row":
                    show(r)
            p.wait()
        finally:
            timer.cancel()
            _stop(p)
        if time.perf_counter() >= deadline - 0.5:
            print("  worker stopped at --limit-s", flush=True)
            break
        if current is not None:                    # it hung or crashed: not again
            hung.append(current)
            todo.remove(current)
            print(f"  {current}: worker ended inside it (rc {p.returncode})", flush=True)
        elif p.returncode:
            print(f"  worker failed (rc {p.returncode})", flush=True)
            break
    return lines, hung, todo


def table(rows, ms):
    by = {(r["variant"], r["M"]): r for r in rows}
    names = list(dict.fromkeys(r["variant"] for r in rows))
    base = {M: by.get(("torch_mm", M), {}).get("us") for M in ms}
    cur = {M: by.get(("rs_rounds", M), {}).get("us") for M in ms}
    ind = {M: by.get(("inductor", M), {}).get("us") for M in ms}
    head = "| variant | " + " | ".join(
        f"M={M} us | graph us | /torch.mm | /rs_rounds | /inductor | bitwise" for M in ms) \
        + " | config |"
    out = [head, "|---|" + "---:|---:|---:|---:|---:|---|" * len(ms) + "---|"]
    for n in names:
        cells, cfgs = [], []
        for M in ms:
            r = by.get((n, M))
            if r is None:
                cells.append("| | | | | ")
                continue
            cfgs.append(r.get("config", "?"))
            if not r.get("us"):
                cells.append(f"FAILED {r.get('error', 'wrong')[:60]} | | | | | ")
                continue
            us, g = r["us"], r.get("graph_us")
            cells.append(f"{us:.1f} | {g if g is not None else '-'} | "
                         f"{us / base[M]:.3f} | " if base[M] else f"{us:.1f} | {g} | - | ")
            cells[-1] += (f"{us / cur[M]:.3f} | " if cur[M] else "- | ")
            cells[-1] += (f"{us / ind[M]:.3f} | " if ind[M] else "- | ")
            bw = r.get("bitwise_vs_unfused")
            cells[-1] += "n/a" if bw is None else ("yes" if bw else "NO")
        out.append(f"| {n} | " + " | ".join(cells) + f" | {' / '.join(dict.fromkeys(cfgs))} |")
    return out


def _bucket(m: int) -> int:
    """``_gemm.m_bucket`` without importing torch: the next power of two in [64, 16384]."""
    return min(16384, max(64, 1 << max(0, m - 1).bit_length()))


def paste_entry(fields: dict, m: int, n: int, k: int) -> str:
    """A ready-to-paste ``fused_gemm.SINGLE_CONFIGS`` entry for GRID_1K ``fields`` (only the
    fields that differ from GemmConfig's defaults)."""
    from tpcomm.kernels._gemm import GemmConfig
    default = GemmConfig()
    args = ", ".join(f"{f}={v!r}" for f, v in fields.items() if getattr(default, f) != v)
    return f"(torch.bfloat16, {_bucket(m)}, {n}, {k}): _gemm.GemmConfig({args}),"


def _ratio(x, y):
    return x / y if x and y else None


def _fmt(x):
    return f"{x:.3f}" if x is not None else "-"


def grid_summary(rows, ms, current, n=N, k=K):
    """--grid1k: per M a table of GRID_1K's configs (both ops: us, graph us, ratios to inductor
    and torch.mm, bitwise, spread) and the best config per op and for both ops together (by
    the graph-replay ratio to inductor, the overlap benchmark's target column; the calls' ratio
    where no graph was timed), with ready-to-paste SINGLE_CONFIGS entries. Returns (markdown
    lines, {M: {"rs"|"ag"|"both": {...}}})."""
    by = {(r["variant"], r["M"]): r for r in rows}
    out, best = [], {}
    for M in ms:
        ind, mm = by.get(("inductor", M), {}), by.get(("torch_mm", M), {})
        cur = current.get(M, {})
        # the ranking: graph replays against inductor, else what this run has of them
        basis = next(((col, label) for col, ref, label in (
            ("ind_graph", ind.get("graph_us"), "x inductor (graph replays)"),
            ("ind_calls", ind.get("us"), "x inductor (calls)"),
            ("mm_graph", mm.get("graph_us"), "x torch.mm (graph replays)"),
            ("mm_calls", mm.get("us"), "x torch.mm (calls)")) if ref),
            (None, "no reference"))

        def stats(kind, key):
            r = by.get((GRID_OPS[kind] + key, M))
            if r is None or not r.get("us"):
                return None
            st = dict(variant=r["variant"], us=r["us"], graph_us=r.get("graph_us"),
                      ind_calls=_ratio(r["us"], ind.get("us")),
                      ind_graph=_ratio(r.get("graph_us"), ind.get("graph_us")),
                      mm_calls=_ratio(r["us"], mm.get("us")),
                      mm_graph=_ratio(r.get("graph_us"), mm.get("graph_us")),
                      bitwise=r.get("bitwise_vs_unfused"), spread=r.get("spread"),
                      current=r.get("config") == cur.get(kind), key=key)
            st["rank"] = st.get(basis[0])
            return st
        out += [f"\n## M = {M}: GRID_1K (inductor {ind.get('us', '-')} us, graph "
                f"{ind.get('graph_us', '-')}; torch.mm {mm.get('us', '-')} us, graph "
                f"{mm.get('graph_us', '-')})\n",
                "| config | op | us | graph us | /inductor | graph /inductor | /torch.mm | "
                "graph /torch.mm | bitwise | spread | current |",
                "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
        found = {"rs": [], "ag": []}
        for key in GRID_1K:
            for kind in GRID_OPS:
                r = by.get((GRID_OPS[kind] + key, M))
                if r is None:
                    continue
                st = stats(kind, key)
                if st is None:
                    out.append(f"| {key} | {kind} | FAILED {str(r.get('error', 'wrong'))[:80]} "
                               f"| | | | | | | | |")
                    continue
                found[kind].append(st)
                out.append(f"| {key} | {kind} | {st['us']} | {st['graph_us'] or '-'} | "
                           f"{_fmt(st['ind_calls'])} | {_fmt(st['ind_graph'])} | "
                           f"{_fmt(st['mm_calls'])} | {_fmt(st['mm_graph'])} | "
                           f"{st['bitwise']} | {st['spread']} | "
                           f"{'yes' if st['current'] else ''} |")
        best[M] = {}
        for kind in GRID_OPS:
            ok = [st for st in found[kind] if st["bitwise"] and st["rank"] is not None]
            if ok:
                best[M][kind] = min(ok, key=lambda st: st["rank"])
        rs = {st["key"]: st for st in found["rs"] if st["bitwise"] and st["rank"] is not None}
        both = [(max(st["rank"], rs[st["key"]]["rank"]), st["key"]) for st in found["ag"]
                if st["bitwise"] and st["rank"] is not None and st["key"] in rs]
        if both:
            worst, key = min(both)
            best[M]["both"] = dict(key=key, rank=worst)
        out.append("")
        for kind, label in (("rs", "matmul_reduce_scatter"), ("ag", "all_gather_matmul"),
                            ("both", "both ops (the worse of the two ratios)")):
            st = best[M].get(kind)
            if st is None:
                out.append(f"BEST M={M} {label}: none measured")
                continue
            curs = [c for c in found.get(kind, []) if c["current"]]
            extra = "" if kind == "both" else (
                f" (calls {_fmt(st['ind_calls'])} x inductor, graph {_fmt(st['mm_graph'])} / "
                f"calls {_fmt(st['mm_calls'])} x torch.mm; current config "
                f"{_fmt(curs[0]['rank']) if curs else '-'})")
            out.append(f"BEST M={M} {label}: {st['key']} {_fmt(st['rank'])} {basis[1]}{extra}")
            out.append(f"    SINGLE_CONFIGS entry: "
                       f"{paste_entry(GRID_1K[st['key']], M, n, k)}")
        for kind, control in CONTROLS.items():
            c = by.get((control, M), {})
            twin = next((st for st in found[kind] if st["current"]), None)
            if c.get("us") and twin:
                g = _ratio(c.get("graph_us"), twin["graph_us"])
                out.append(f"CONTROL M={M} {control} (the default path, the current config "
                           f"{twin['key']}): {c['us']} us / graph {c.get('graph_us', '-')} "
                           f"against {twin['us']} / {twin['graph_us'] or '-'} as "
                           f"{twin['variant']}: one kernel timed twice differs by x "
                           f"{_fmt(_ratio(c['us'], twin['us']))} (graph {_fmt(g)})")
    return out, best


def classify(rows):
    """(rows measured or failed, variants skipped for the budget, variants whose config does
    not fit the SM (Triton's OutOfResources: shared memory, registers; not a wrong result),
    wrong results with their errors)."""
    def err(r):
        return str(r.get("error", ""))
    skipped = [f"{r['variant']} M={r['M']}" for r in rows if err(r).startswith("budget")]
    rows = [r for r in rows if not err(r).startswith("budget")]
    unfit = [f"{r['variant']} M={r['M']}" for r in rows
             if not r["ok"] and err(r).startswith("OutOfResources")]
    wrong = [f"{r['variant']} M={r['M']}: {r.get('error', 'wrong')}" for r in rows
             if not r["ok"] and not err(r).startswith("OutOfResources")]
    return rows, skipped, unfit, wrong


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default=None, help=f"default {MS} ({GRID_MS} with --grid1k)")
    ap.add_argument("--variants", default=None)
    ap.add_argument("--limit-s", type=float, default=190.0,
                    help="stop every worker by then (the device call's hard limit is 200 s)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="hard budget of the whole run, compiles included (replaces --limit-s; "
                         "with --interleave the worker skips builds and passes that would not "
                         "fit, so it reports what it measured before the budget ends)")
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                    help="build every variant at an M, then time them round-robin for ROUNDS "
                         "passes (median per variant; default variants: INTERLEAVED, inductor "
                         "included); 0: one variant after another (the 2026-12-03 sweep)")
    ap.add_argument("--grid1k", action="store_true",
                    help="GRID_1K's tile configs for both fused ops at M = 1024, interleaved "
                         "with torch.mm and inductor (--interleave 21 unless given), the best "
                         "as SINGLE_CONFIGS entries")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--until", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU: the worker's code path on the CPU (needs TRITON_INTERPRET=1; "
                         "use small --ms such as 128,256)")
    args = ap.parse_args()
    if args.grid1k and not args.interleave:
        args.interleave = 21
    limit = args.limit_s if args.budget_s is None else args.budget_s
    ms = [int(x) for x in (args.ms or ",".join(
        map(str, GRID_MS if args.grid1k else MS))).split(",") if x]
    if args.variants:
        names = [x for x in args.variants.split(",") if x]
    elif args.grid1k:
        names = list(GRID_VARIANTS)
    elif args.interleave:
        names = list(INTERLEAVED)
    else:
        names = [v for v in VARIANTS if v not in INTERLEAVED[5:] and v != "inductor"
                 and not v.startswith(tuple(GRID_OPS.values()))]
    bad = [x for x in names if x not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    if args.worker:
        worker(names, ms, smoke=args.smoke, interleave=args.interleave, until=args.until)
        return 0
    t0 = time.perf_counter()
    print(f"fused RS sweep: {len(names)} variants x M = {ms}, limit {limit:.0f} s", flush=True)
    if args.interleave:
        # the worker's own deadline: its last pass and its rows before the parent's kill
        until = time.time() + limit - WORKER_MARGIN_S
        cmd = (lambda todo: [sys.executable, os.path.abspath(__file__), "--worker",
                             "--interleave", str(args.interleave), "--variants", ",".join(names),
                             "--ms", ",".join(map(str, ms)), "--until", f"{until:.1f}"]
               + (["--smoke"] if args.smoke else []))
        lines, hung, left = run_workers(["interleaved"], ms, t0 + limit, cmd=cmd,
                                        smoke=args.smoke)
    else:
        lines, hung, left = run_workers(names, ms, t0 + limit, smoke=args.smoke)
    rows = [r for r in lines if r["event"] == "row"]
    dev = next((r for r in lines if r["event"] == "device"), {})
    current = {r["M"]: r for r in lines if r["event"] == "current"}
    rows, skipped, unfit, wrong = classify(rows)
    lines_md = table(rows, ms)
    grid_md, best = (grid_summary(rows, ms, current, dev.get("N", N), dev.get("K", K))
                     if args.grid1k else ([], {}))
    res = {"device": dev, "K": dev.get("K", K), "N": dev.get("N", N), "dtype": "bfloat16",
           "ms": ms, "rows": rows, "current": current, "best": best,
           "hung": hung, "not_run": left, "skipped_budget": skipped, "unfit": unfit,
           "wrong": wrong,
           "seconds": round(time.perf_counter() - t0, 1)}
    out_dir = os.environ.get("OUT")
    stem = "fused_1k_sweep" if args.grid1k else "fused_rs_sweep"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, stem + ".json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(out_dir, stem + ".md"), "w") as f:
            how = (f"median over {args.interleave} interleaved passes of one ~25 ms sample"
                   if args.interleave else "median of 7")
            f.write(f"# Fused GEMM + reduce-scatter at world 1: schedules and configs\n\n"
                    f"{json.dumps(dev)}; bf16; us per call (CUDA events around "
                    f"back-to-back calls, {how}; graph: replays of one captured call)\n\n"
                    + "\n".join(lines_md) + "\n" + "\n".join(grid_md) + "\n")
    print("\n".join(lines_md))
    if grid_md:
        print("\n".join(grid_md))
    print(json.dumps({k: v for k, v in res.items() if k not in ("rows", "best")}))
    for h in hung:
        print(f"FAIL {h}: hung or crashed its worker")
    for w in wrong:
        print(f"FAIL {w}")
    if skipped:
        print(f"NOTE {len(skipped)} variants not built within the budget: {', '.join(skipped)}")
    if unfit:
        print(f"NOTE {len(unfit)} variants do not fit the SM (OutOfResources): "
              f"{', '.join(unfit)}")
    if not rows:
        print("FAIL nothing measured")
        return 1
    print(("PASS" if not wrong else "FAIL") + f": {len(rows)} results, {len(wrong)} wrong, "
          f"{len(hung)} hung, {len(left)} not run, {len(skipped)} over budget, "
          f"{len(unfit)} unfit, "
          f"{res['seconds']} s")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
