"""One GPU: the skinny GEMM (``tpcomm/kernels/skinny_gemm.py``) against F.linear (cuBLAS) on the
Llama-3-8B world-1 decode shapes, M in {1, 8}, bf16: correctness, then time per call and TB/s.

    OUT=/tmp/out PYTHONUNBUFFERED=1 python3 scripts/gpu_skinny_gemm.py [--budget-s 150]
        [--json PATH] [--ms 1,8] [--shapes qkv,o,gate_up,gate_up_swiglu,down,lm_head]

Steps, each line stamped with the seconds used:

1. inputs: per shape, copies of W filling >= 200 MB (W rotates call by call, so no call finds
   its weights in the 50 MB L2), x [M, K] random.
2. compile every candidate config up front (``candidates``: 10-20 per shape and M, blocks and
   splits chosen for 132 SMs) and check it: max |y - ref| / max |ref| <= 1e-2 against the
   float32 product (F.linear's own error printed beside), the folded split-K bitwise equal run
   to run, to the split-K sum as a second kernel, and the counters back to 0. PASS / FAIL per
   config (SKIP where it does not fit the SM's shared memory or registers). Compile time
   counts against the budget: configs not compiled in time are SKIPPED.
3. time, per shape and M: F.linear (cuBLAS, with its split-K reduce where it picks one; for the
   SwiGLU shape F.linear followed by one SwiGLU kernel, what inductor emits), every passing
   config (folded split-K), and the best split config's split-K as a second kernel. A CUDA
   graph holds ``calls`` calls over the rotating copies (about 3 ms); us per call = median of 7
   replays / calls. TB/s = weight bytes / time.

Prints a markdown table per shape and M, the best config per shape and M, and the winners (the
configs faster than F.linear) as a Python literal for ``tpcomm/models/skinny_linear.py``
``TUNED``. Writes the JSON (--json, default $OUT/skinny_gemm.json) after every shape. Exit
status 1 when a result was wrong.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from tpcomm.kernels.skinny_gemm import SkinnyConfig, counters_for, skinny_gemm  # noqa: E402

# name: (weight rows N, K, swiglu); Llama-3-8B at world 1
SHAPES = {"qkv": (6144, 4096, False), "o": (4096, 4096, False),
          "gate_up": (28672, 4096, False), "gate_up_swiglu": (28672, 4096, True),
          "down": (4096, 14336, False), "lm_head": (128256, 4096, False)}
ROTATE_BYTES = 200e6     # >= 4x the H200's 50 MB L2
DEVICE = "cuda"          # the unit test runs the steps on the CPU under Triton's interpreter
GRAPH_US = 3000.0        # one replay
TOL = 1e-2
MIN_SPEEDUP = 1.02       # a winner beats F.linear by this much (medians of 7 replays move ~1 %)
SMEM_BYTES = 232448      # an H100 / H200 SM's shared memory for one block (227 KiB)
# (block_n, block_k, warps, stages): dot path (any M), sum path (M = 1). A [BLOCK_N, BLOCK_K]
# bf16 tile is 16-64 KiB; 2-4 stages stay under the SM's 227 KiB and keep 32-128 KiB in
# flight per program (4.3 TB/s x ~1 us of latency is ~32 KiB per SM).
# The first H200 sweep (2026-12-03 16:01 UTC) had (64, 128, 4, 4) best on every shape but the
# head ((128, 128, 4, 3) at M = 1), and no FMA-path config best anywhere: the grid is centred
# there, deeper pipelines of smaller K tiles.
DOT_TILES = [(64, 128, 4, 4), (64, 128, 4, 5), (64, 128, 4, 6), (64, 64, 4, 8),
             (128, 128, 4, 3), (128, 128, 4, 4), (128, 64, 4, 6), (32, 128, 4, 6),
             (64, 256, 4, 3)]
SUM_TILES = [(32, 256, 4, 3)]


def log(t0: float, *a) -> None:
    print(f"[{time.monotonic() - t0:6.1f}s]", *a, flush=True)


def splits_for(blocks: int, K: int, block_k: int, sms: int) -> list[int]:
    """Split counts for ``blocks`` column blocks: 1 if they fill the SMs twice; else the
    smallest split that fills them once and the next (at most 2, each split >= 2 K blocks)."""
    if blocks >= 2 * sms:
        return [1]
    out = []
    for s in (1, 2, 3, 4, 6, 8, 12, 16):
        if blocks * s >= sms and K // s >= 2 * block_k:
            out.append(s)
        if len(out) == 2:
            break
    return out or [1]


def smem_bytes(bn: int, bk: int, stages: int, swiglu: bool) -> int:
    """Shared memory of the pipelined loop: ``stages`` x (the W tile(s) + x^T's [bk, 16]),
    16-bit (what Triton asked for in the first sweep: 417792 B for (128, 256, 3) with SwiGLU)."""
    return stages * (bn * bk * 2 * (2 if swiglu else 1) + bk * 16 * 2)


def candidates(n_out: int, K: int, M: int, sms: int, swiglu: bool = False) -> list[SkinnyConfig]:
    """10-20 configs for one shape and M that fit an SM's shared memory."""
    out = []
    for use_dot, tiles in ((True, DOT_TILES), (False, SUM_TILES if M == 1 else [])):
        for bn, bk, w, st in tiles:
            if smem_bytes(bn, bk, st, swiglu) > SMEM_BYTES:
                continue
            for s in splits_for(triton.cdiv(n_out, bn), K, bk, sms):
                out.append(SkinnyConfig(bn, bk, s, w, st, use_dot))
    return out


@triton.jit
def _swiglu_kernel(y_ptr, out_ptr, I, BLOCK: tl.constexpr):
    """out[m, i] = silu(y[m, i]) * y[m, I + i] in float32 (inductor's fused SwiGLU)."""
    m = tl.program_id(1)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < I
    g = tl.load(y_ptr + m * 2 * I + i, mask=mask).to(tl.float32)
    u = tl.load(y_ptr + m * 2 * I + I + i, mask=mask).to(tl.float32)
    tl.store(out_ptr + m * I + i, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty),
             mask=mask)


def linear_swiglu(x, w, out):
    y = F.linear(x, w)
    _swiglu_kernel[(triton.cdiv(out.shape[1], 1024), x.shape[0])](y, out, out.shape[1],
                                                                  BLOCK=1024)
    return out


def graph_us(fn, ws: list, calls: int) -> float:
    """Median over 7 replays of a graph of ``calls`` calls fn(w) over ``ws`` in turn, per call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for w in ws[:2]:
            fn(w)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(ws[i % len(ws)])
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(7):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        samples.append(e0.elapsed_time(e1) * 1e3 / calls)
    del g
    return statistics.median(samples)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reference(x, w, swiglu):
    y = x.float() @ w.float().t()
    if not swiglu:
        return y
    n = w.shape[0] // 2
    g, u = y[:, :n].to(x.dtype).float(), y[:, n:].to(x.dtype).float()
    return F.silu(g) * u


def rel_err(got, ref) -> float:
    return float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _does_not_fit(e: BaseException) -> bool:
    """Triton's "out of resource" (shared memory, registers, threads), by class or by text
    (the first sweep's came past an ``except OutOfResources``: a copy of the error, raised
    again by the cached kernel, may not be the class this process imported)."""
    return isinstance(e, OutOfResources) or "out of resource" in str(e).lower()


def check(x, w, cfg, swiglu, ref) -> tuple[bool, str]:
    """Compile (first call) and check one config: error, determinism, counters."""
    M, n_out = x.shape[0], w.shape[0] // (2 if swiglu else 1)
    counters = counters_for(n_out, x.device)
    outs = [skinny_gemm(x, w, torch.empty(M, n_out, dtype=x.dtype, device=x.device), cfg,
                        swiglu=swiglu, counters=counters) for _ in range(3)]
    two = skinny_gemm(x, w, torch.empty(M, n_out, dtype=x.dtype, device=x.device), cfg,
                      swiglu=swiglu, fold=False)
    _sync()
    err = rel_err(outs[0], ref)
    why = []
    if not err <= TOL:
        why.append(f"error {err:.2e} > {TOL}")
    if not all(torch.equal(o, outs[0]) for o in outs[1:]):
        why.append("folded result differs run to run")
    if not torch.equal(two, outs[0]):
        why.append("folded != split-K sum as a second kernel")
    if counters.any():
        why.append("counters not back to 0")
    return not why, f"err {err:.2e}" + ("; " + "; ".join(why) if why else "")


def run_shape(name, M, t0, deadline, sms, results, failures, dtype=torch.bfloat16):
    """Check and time one shape at M rows (the module docstring's steps 1-3); appends its row
    to ``results`` and its wrong results to ``failures``."""
    N, K, swiglu = SHAPES[name]
    n_out = N // 2 if swiglu else N
    dev = torch.device(DEVICE)
    dt = dtype
    wbytes = N * K * dt.itemsize
    copies = max(2, math.ceil(ROTATE_BYTES / wbytes))
    gen = torch.Generator(device=dev).manual_seed(0)
    ws = [torch.randn(N, K, device=dev, dtype=dt, generator=gen) / math.sqrt(K)
          for _ in range(copies)]
    x = torch.randn(M, K, device=dev, dtype=dt, generator=gen)
    ref = reference(x, ws[0], swiglu)
    out = torch.empty(M, n_out, device=dev, dtype=dt)
    base_fn = ((lambda w: linear_swiglu(x, w, out)) if swiglu else (lambda w: F.linear(x, w)))
    base_err = rel_err(base_fn(ws[0]), ref)
    row = {"shape": name, "N": N, "K": K, "M": M, "swiglu": swiglu, "weight_bytes": wbytes,
           "copies": copies, "configs": [], "baseline": "F.linear" + (" + swiglu" if swiglu
                                                                       else "")}
    cands = candidates(n_out, K, M, sms, swiglu)
    log(t0, f"{name} M={M}: N={N} K={K}, {copies} copies of W ({copies * wbytes / 1e6:.0f} MB), "
        f"{len(cands)} configs; {row['baseline']} err {base_err:.2e}")
    passed = []
    for cfg in cands:          # compile and check up front
        if time.monotonic() > deadline:
            row["configs"].append({"config": cfg.name(), "status": "SKIPPED (budget)"})
            continue
        c0 = time.monotonic()
        status = None
        try:
            ok, note = check(x, ws[0], cfg, swiglu, ref)
        except Exception as e:   # noqa: BLE001 - a config that does not compile is reported
            ok, note = False, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            if _does_not_fit(e):   # shared memory or registers: not a wrong result
                status = "SKIP (does not fit)"
            else:
                traceback.print_exc(limit=1)
        status = status or ("PASS" if ok else "FAIL")
        if status == "FAIL":
            failures.append(f"{name} M={M} {cfg.name()}: {note}")
        row["configs"].append({"config": cfg.name(), "cfg": cfg.as_list(), "status": status,
                               "check": note, "compile_check_s": round(time.monotonic() - c0, 2)})
        print(f"  {status} {name} M={M} {cfg.name()}: {note} "
              f"({time.monotonic() - c0:.1f}s)", flush=True)
        if ok:
            passed.append((cfg, row["configs"][-1]))
    calls = max(copies, min(400, int(GRAPH_US / max(wbytes / 4.3e6, 1.0))))
    row["calls_per_graph"] = calls

    def timed(fn):
        us = graph_us(fn, ws, calls)
        return {"us": round(us, 2), "tbps": round(wbytes / us / 1e6, 3)}

    if time.monotonic() > deadline:
        log(t0, f"{name} M={M}: budget spent before timing")
        results.append(row)
        return
    row["baseline_time"] = timed(base_fn)
    if swiglu:
        row["linear_alone_time"] = timed(lambda w: F.linear(x, w))
    for cfg, rec in passed:
        if time.monotonic() > deadline:
            rec["status"] += " (not timed: budget)"
            continue
        counters = counters_for(n_out, dev)
        try:
            rec.update(timed(lambda w, cfg=cfg, counters=counters: skinny_gemm(
                x, w, out, cfg, swiglu=swiglu, counters=counters)))
        except Exception as e:   # noqa: BLE001 - e.g. a capture that fails: report, go on
            rec["status"] = f"FAIL (timing: {type(e).__name__}: {str(e)[:120]})"
            failures.append(f"{name} M={M} {cfg.name()}: {rec['status']}")
            continue
        if counters.any():
            rec["status"] = "FAIL (counters not 0 after the graph replays)"
            failures.append(f"{name} M={M} {cfg.name()}: {rec['status']}")
        rec["speedup"] = round(row["baseline_time"]["us"] / rec["us"], 3)
    timed_ok = [(c, r) for c, r in passed if "us" in r and r["status"] == "PASS"]
    if timed_ok:
        best_cfg, best = min(timed_ok, key=lambda cr: cr[1]["us"])
        row["best"] = {"config": best_cfg.name(), "cfg": best_cfg.as_list(), **best}
        split = [(c, r) for c, r in timed_ok if c.split_k > 1]
        if split and time.monotonic() < deadline:
            sc, sr = min(split, key=lambda cr: cr[1]["us"])
            row["fold_vs_two_kernels"] = {"config": sc.name(), "folded_us": sr["us"],
                                          **{"two_kernels_" + k: v for k, v in timed(
                                              lambda w: skinny_gemm(x, w, out, sc,
                                                                    swiglu=swiglu,
                                                                    fold=False)).items()}}
    results.append(row)
    print_table(row)
    del ws


def print_table(row) -> None:
    b = row.get("baseline_time", {})
    print(f"\n### {row['shape']} N={row['N']} K={row['K']} M={row['M']} "
          f"({row['weight_bytes'] / 1e6:.1f} MB of weights)\n")
    print("| kernel | status | us/call | TB/s | vs baseline |\n|---|---|---|---|---|")
    print(f"| {row['baseline']} (cuBLAS) | | {b.get('us', '-')} | {b.get('tbps', '-')} | 1.00 |")
    if "linear_alone_time" in row:
        a = row["linear_alone_time"]
        print(f"| F.linear alone | | {a['us']} | {a['tbps']} | - |")
    for r in sorted(row["configs"], key=lambda r: r.get("us", 1e18)):
        print(f"| {r['config']} | {r['status']} | {r.get('us', '-')} | {r.get('tbps', '-')} | "
              f"{r.get('speedup', '-')} |")
    f = row.get("fold_vs_two_kernels")
    if f:
        print(f"\nsplit-K {f['config']}: folded {f['folded_us']} us, as two kernels "
              f"{f['two_kernels_us']} us")
    print(flush=True)


def winners_literal(results) -> str:
    """The configs faster than the baseline by ``MIN_SPEEDUP``, as ``TUNED`` entries:
    {(N, K, epilogue): ((m_max, config tuple or None), ...)}; the config measured at M serves
    the rows above the previous measured M up to M (None: F.linear, where a smaller M lost and
    a larger one won)."""
    table: dict = {}
    for row in results:
        best = row.get("best")
        if not best or best.get("speedup", 0) < MIN_SPEEDUP:
            continue
        key = (row["N"], row["K"], "swiglu" if row["swiglu"] else "")
        m_max = row["M"]
        table.setdefault(key, {})[m_max] = (best["cfg"], best["speedup"])
    lines = ["TUNED = {"]
    for key, entries in sorted(table.items()):
        if 1 not in entries:        # M = 1 lost (or was not measured): cuBLAS
            entries[1] = (None, None)
        items = ", ".join(f"({m}, {_literal(cfg)})" for m, (cfg, _) in sorted(entries.items()))
        gains = ", ".join(f"M<={m}: {sp:.2f}x" for m, (_, sp) in sorted(entries.items()) if sp)
        lines.append(f"    {key}: ({items},),   # {gains}")
    lines.append("}")
    return "\n".join(lines)


def _literal(cfg) -> str:
    if cfg is None:
        return "None"
    bn, bk, sk, w, st, dot = cfg
    return f"({bn}, {bk}, {sk}, {w}, {st}, {bool(dot)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="wall-clock budget; configs not compiled or timed by then are skipped")
    ap.add_argument("--json", default=None, help="output JSON (default $OUT/skinny_gemm.json)")
    ap.add_argument("--ms", default="1,8")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 0
    out_dir = os.environ.get("OUT", ".")
    path = args.json or os.path.join(out_dir, "skinny_gemm.json")
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    log(t0, f"{props.name}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}, "
        f"budget {args.budget_s:.0f}s")
    results, failures = [], []
    shapes = [s for s in args.shapes.split(",") if s]
    for name in shapes:
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    for name in shapes:
        for M in (int(m) for m in args.ms.split(",")):
            if time.monotonic() > deadline:
                log(t0, f"SKIPPED {name} M={M}: budget spent")
                results.append({"shape": name, "M": M, "status": "SKIPPED (budget)"})
                continue
            try:
                run_shape(name, M, t0, deadline, sms, results, failures)
            except Exception as e:   # noqa: BLE001 - report and go on with the next shape
                traceback.print_exc()
                failures.append(f"{name} M={M}: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
            with open(path, "w") as f:
                json.dump({"device": props.name, "sms": sms, "results": results,
                           "failures": failures}, f, indent=1)
    print("## best per shape\n")
    for row in results:
        if "best" in row:
            b = row["best"]
            print(f"- {row['shape']} M={row['M']}: {b['config']} {b['us']} us "
                  f"({b['tbps']} TB/s) vs {row['baseline_time']['us']} us: {b['speedup']}x")
    print("\n# winners (faster than F.linear), for tpcomm/models/skinny_linear.py:")
    print(winners_literal(results))
    print(f"\nJSON: {path}")
    for f in failures:
        print("FAIL", f)
    log(t0, "ALL PASS" if not failures else f"{len(failures)} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
