"""Decode attention of one Llama-3-8B layer (world 1: 32 q heads, 8 KV heads, D 128, bf16), per
layer, on one GPU: the model's old path against the kernel that replaced it.

- ``old``: RoPE of q and k as torch ops, two ``index_copy_`` cache writes, masked SDPA (GQA)
  over the whole preallocated cache (what the model did before: static shapes, graph-safe);
- ``kernel``: ``tpcomm.models.attention`` (one Triton kernel: RoPE, cache write, attention
  up to the position read on the device, the splits combined by the last program of each
  (sequence, head); graph-safe; the layer's zeroed counters, as in the model; ``TUNED``);
- ``kernel_2k``: the same with the combine as a second kernel (``fold_combine=False``, the
  kernel until 2026-12-03): kernel_2k - kernel is what the fold saves per layer;
- ``sdpa_filled``: SDPA over exactly the filled positions, no mask (the length is a host value:
  not graph-safe, eager; a yardstick for the attention kernel torch would pick);
- ``floor``: the filled K and V read once at 4.3 TB/s.

The cache and positions are those of ``tpcomm bench model``'s timed decode steps: a cache of
context + 3 warm-up + 64 timed steps + 1 positions, the timed steps at positions context + 3 to
context + 66 (the 10 replays step through that range); bytes and GB/s count the filled part
(positions 0 to pos) of K and V.

``--sweep``: the kernel at the tuning points of ``SWEEP`` (block_n, programs per SM, warps,
pipeline stages, combine chunk: ``decode_attention_rope``'s keywords) for every batch (default
1,2,4,8,16), each point checked first on one layer against ``decode_attention_reference`` (2 %
of the largest output value) and bitwise against its own two-kernel form
(``fold_combine=False``). Prints us per layer and GB/s of the filled cache, a markdown table
(--md FILE too), and the best point per batch as a literal for ``TUNED``. The points run in the
order of ``SWEEP`` (each compiles once, then runs on every batch); past --time-limit minus 10 s
no point starts (marked skipped), and at --time-limit the script stops (exit 3).

32 layers (32 separate caches, so L2 does not hold them) per CUDA graph replay (``sdpa_filled``:
eager launches, timed by CUDA events), microseconds per layer, median of 10 replays.

    python scripts/gpu_decode_attention.py [--batch 1,8] [--context 1024] [--json FILE]
    python scripts/gpu_decode_attention.py --sweep [--time-limit 90] [--json F] [--md F]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tpcomm.kernels.decode_attention import decode_attention_rope  # noqa: E402
from tpcomm.models.attention import (  # noqa: E402
    _launch, apply_rope, decode_attention, decode_attention_reference)

HQ, HK, D, LAYERS = 32, 8, 128, 32
DEV = torch.device("cuda", 0)
WARMUP_STEPS, DECODE_TOKENS = 3, 64     # tpcomm bench model's defaults (tpcomm/bench/model.py)
REPS = 10
HBM_BPS = 4.3e12

# (block_n, programs per SM, warps, stages, combine chunk), in the order they run: TUNED's
# points first, then more programs per SM with the combine one partial at a time (a program
# reads ~30 GB/s, bound by its chain per block, so several per SM are what reads the cache
# fast), two stages where that fits more programs per SM, small combine chunks. The first
# round (2026-12-03, one H200) measured chunk 8 slower everywhere, 3 to 6
# stages alike, 8 warps slower past batch 1. Shared memory per program (sm_90 compile):
# block_n 64 at 3 stages 70 KiB, 2 stages 38; block_n 32 at 2 stages ~21; 128 at 2 stages 72
SWEEP = [(128, 2, 8, 3, 1), (64, 1, 4, 3, 1), (128, 0, 8, 3, 1),
         (64, 2, 4, 3, 1), (64, 2, 4, 2, 1), (64, 3, 4, 2, 1), (64, 4, 4, 2, 1),
         (32, 2, 4, 3, 1), (32, 4, 4, 2, 1), (64, 1, 4, 2, 1), (128, 1, 4, 2, 1),
         (128, 2, 4, 2, 1), (64, 6, 4, 2, 1), (32, 8, 4, 2, 1), (64, 1, 4, 3, 2),
         (64, 1, 4, 3, 4), (64, 2, 4, 2, 4), (128, 2, 8, 3, 2), (128, 3, 8, 3, 1)]


def point_name(point) -> str:
    return "n{}_p{}_w{}_s{}_c{}".format(*point)


def old_path(qkv, cos, sin, k_cache, v_cache, pos):
    B = qkv.shape[0]
    q, k, v = qkv.view(B, 1, HQ + 2 * HK, D).split([HQ, HK, HK], dim=2)
    q = apply_rope(q, cos[None], sin[None]).transpose(1, 2)
    k_cache[:B].index_copy_(2, pos, apply_rope(k, cos[None], sin[None]).transpose(1, 2))
    v_cache[:B].index_copy_(2, pos, v.transpose(1, 2))
    S = k_cache.shape[2]
    mask = torch.arange(S, device=qkv.device)[None, :] <= pos[:, None]
    return F.scaled_dot_product_attention(q, k_cache[:B], v_cache[:B], attn_mask=mask,
                                          enable_gqa=True).view(B, HQ, D)


def filled_path(qkv, cos, sin, k_cache, v_cache, pos, n):
    B = qkv.shape[0]
    q = qkv.view(B, 1, HQ + 2 * HK, D)[:, :, :HQ]
    q = apply_rope(q, cos[None], sin[None]).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k_cache[:B, :, :n], v_cache[:B, :, :n],
                                          enable_gqa=True).view(B, HQ, D)


class Batch:
    """32 layers of inputs and caches for one batch size, the bench's cache geometry."""

    def __init__(self, batch: int, context: int):
        self.batch = batch
        S = context + WARMUP_STEPS + DECODE_TOKENS + 1
        first = context + WARMUP_STEPS
        self.positions = [first + i * DECODE_TOKENS // REPS for i in range(REPS)]
        gen = torch.Generator(device=DEV).manual_seed(batch)
        self.qkv = [torch.randn(batch, (HQ + 2 * HK) * D, generator=gen, device=DEV).bfloat16()
                    for _ in range(LAYERS)]
        self.caches = [(torch.randn(batch, HK, S, D, generator=gen, device=DEV).bfloat16(),
                        torch.randn(batch, HK, S, D, generator=gen, device=DEV).bfloat16())
                       for _ in range(LAYERS)]
        self.counters = [torch.zeros(batch * HK, dtype=torch.int32, device=DEV)
                         for _ in range(LAYERS)]
        self.cos = torch.randn(D, generator=gen, device=DEV).bfloat16()
        self.sin = torch.randn(D, generator=gen, device=DEV).bfloat16()
        self.pos = torch.tensor([self.positions[0]], device=DEV)
        self.host_pos = self.positions[0]
        k0, v0 = (c.clone() for c in self.caches[0])
        self.ref = decode_attention_reference(self.qkv[0], self.cos, self.sin, k0, v0,
                                              self.pos).float()
        self.scale = float(self.ref.abs().max())

    def args(self, i: int):
        return (self.qkv[i], self.cos, self.sin, *self.caches[i], self.pos)

    def filled_bytes(self) -> float:
        """K and V of positions 0..pos, averaged over the timed positions."""
        n = statistics.mean(p + 1 for p in self.positions)
        return 2 * self.batch * HK * n * D * 2

    def median_us(self, fn) -> float:
        """``fn`` (32 layers) at each timed position: median microseconds per layer."""
        self.set_pos(self.positions[0])
        fn()
        torch.cuda.synchronize()
        times = []
        for p in self.positions:
            self.set_pos(p)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / LAYERS)
        self.set_pos(self.positions[0])
        return statistics.median(times)

    def set_pos(self, p: int) -> None:
        self.pos.fill_(p)
        self.host_pos = p


def _graph(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _tuned(point, fold_combine=True):
    block_n, programs_per_sm, num_warps, num_stages, chunk = point

    def fn(qkv, cos, sin, k_cache, v_cache, pos, counters=None):
        out = torch.empty(qkv.shape[0], HQ, D, dtype=qkv.dtype, device=qkv.device)
        decode_attention_rope(qkv, cos, sin, k_cache, v_cache, pos, out, D ** -0.5,
                              counters=counters, fold_combine=fold_combine, block_n=block_n,
                              programs_per_sm=programs_per_sm, num_warps=num_warps,
                              num_stages=num_stages, combine_chunk=chunk)
        return out
    return fn


def baseline(bt: Batch) -> dict:
    """The fixed rows of one batch: agreement of old, kernel, two-kernel, filled SDPA, then
    their times."""
    a = old_path(*bt.args(0)).float()
    b = decode_attention(*bt.args(0), bt.counters[0]).float()
    b2 = _launch(*bt.args(0), fold_combine=False).float()
    c = filled_path(*bt.args(0), bt.host_pos + 1).float()
    err = max(float((a - b).abs().max()), float((a - c).abs().max()),
              float((bt.ref - b).abs().max())) / bt.scale
    out = {"batch": bt.batch, "filled_mb": round(bt.filled_bytes() / 1e6, 2),
           "max_rel_diff": err, "fold_bitwise": torch.equal(b, b2)}
    L = range(LAYERS)
    runs = {
        "old": _graph(lambda: [old_path(*bt.args(i)) for i in L]),
        "kernel": _graph(lambda: [decode_attention(*bt.args(i), bt.counters[i]) for i in L]),
        "kernel_2k": _graph(lambda: [_launch(*bt.args(i), fold_combine=False) for i in L]),
        "sdpa_filled": lambda: [filled_path(*bt.args(i), bt.host_pos + 1) for i in L],
    }
    for name, fn in runs.items():
        out[f"{name}_us"] = round(bt.median_us(fn), 2)
    out["floor_us"] = round(bt.filled_bytes() / HBM_BPS * 1e6, 2)
    return out


def sweep_point(bt: Batch, point) -> dict:
    """One tuning point on one batch: checked, then timed (or why not)."""
    fold, two = _tuned(point), _tuned(point, fold_combine=False)
    try:   # a point may not fit (shared memory, registers): say so, go on
        got = fold(*bt.args(0), bt.counters[0]).float()
        got2 = two(*bt.args(0)).float()
    except Exception as e:  # noqa: BLE001
        return {"status": f"failed: {type(e).__name__}: {str(e)[:160]}"}
    err = float((got - bt.ref).abs().max()) / bt.scale
    if not err <= 2e-2:
        return {"status": "WRONG (reference)", "max_rel_diff": err}
    if not torch.equal(got, got2):
        return {"status": "WRONG (fold not bitwise the two-kernel form)", "max_rel_diff": err,
                "fold_diff": float((got - got2).abs().max())}
    if bt.counters[0].any():
        return {"status": "WRONG (counters not reset)"}
    us = bt.median_us(_graph(lambda: [fold(*bt.args(i), bt.counters[i])
                                      for i in range(LAYERS)]))
    return {"status": "ok", "us": round(us, 2), "gbps": round(bt.filled_bytes() / us / 1e3, 1),
            "max_rel_diff": err}


def _compile_points(points, batches, context) -> int:
    """Run every point's two forms once per batch on one layer (a worker process: Triton's
    compiles of the points in parallel, into its on-disk cache, which the timed run reuses)."""
    for point in points:
        for batch in batches:
            S = context + WARMUP_STEPS + DECODE_TOKENS + 1
            qkv = torch.randn(batch, (HQ + 2 * HK) * D, device=DEV).bfloat16()
            kc, vc = (torch.randn(batch, HK, S, D, device=DEV).bfloat16() for _ in range(2))
            cs = torch.randn(D, device=DEV).bfloat16()
            pos = torch.tensor([context + WARMUP_STEPS], device=DEV)
            try:
                _tuned(point)(qkv, cs, cs, kc, vc, pos)
                _tuned(point, fold_combine=False)(qkv, cs, cs, kc, vc, pos)
            except Exception:  # noqa: BLE001 (the timed run reports it)
                pass
    torch.cuda.synchronize()
    return len(points)


def precompile(points, batches, context, jobs: int):
    """Start ``jobs`` worker processes compiling ``points`` (round robin); returns the pool and
    its futures (the caller waits, with a bound)."""
    pool = concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(_compile_points, points[i::jobs], batches, context)
               for i in range(min(jobs, len(points)))]
    return pool, futures


def markdown(report: dict) -> str:
    batches = [r["batch"] for r in report["rows"]]
    lines = [f"# decode attention sweep: {report['device']}, torch {report['torch']}, "
             f"context {report['context']}",
             "", "us per layer (GB/s of the filled K and V); x32 layers per step", "",
             "| point (block_n, programs/SM, warps, stages, chunk) | "
             + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for key in ("old_us", "kernel_us", "kernel_2k_us", "sdpa_filled_us", "floor_us"):
        lines.append(f"| {key[:-3]} | " + " | ".join(str(r.get(key, "")) for r in report["rows"])
                     + " |")
    for name in report["points"]:
        cells = []
        for r in report["rows"]:
            s = r["sweep"].get(name, {"status": "not run"})
            cells.append(f"{s['us']} ({s['gbps']})" if s["status"] == "ok" else s["status"])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "best per batch: " + ", ".join(
        f"{b}: {p['name']} {p['us']} us" for b, p in report["best"].items()),
        "", "```python", report["tuned_literal"], "```"]
    return "\n".join(lines) + "\n"


def best_points(rows) -> dict:
    best = {}
    for r in rows:
        ok = [(s["us"], name) for name, s in r.get("sweep", {}).items() if s["status"] == "ok"]
        if ok:
            us, name = min(ok)
            best[r["batch"]] = {"name": name, "us": us, "point": r["points"][name]}
    return best


def tuned_literal(best: dict) -> str:
    """``TUNED = ((batch, point), ...)`` of the best point per batch, batches ascending."""
    return "TUNED = " + repr(tuple((b, tuple(best[b]["point"])) for b in sorted(best)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", help="batch sizes (default 1,8; with --sweep 1,2,4,8,16)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--sweep", action="store_true", help="the kernel at the SWEEP points too")
    ap.add_argument("--time-limit", type=float, default=90.0,
                    help="seconds for the whole run, compiles included (default 90)")
    ap.add_argument("--jobs", type=int, default=8,
                    help="processes compiling the sweep's points first (0: none)")
    ap.add_argument("--json")
    ap.add_argument("--md", help="the markdown table to this file too")
    args = ap.parse_args()
    t0 = time.monotonic()
    batches = [int(b) for b in (args.batch or ("1,2,4,8,16" if args.sweep else "1,8")).split(",")]
    pool = None
    if args.sweep and args.jobs > 0:   # compiles in parallel while the inputs are made
        pool, futures = precompile(SWEEP, batches, args.context, args.jobs)
    report = {"device": torch.cuda.get_device_name(DEV), "torch": torch.__version__,
              "context": args.context, "rows": [], "points": [], "best": {},
              "tuned_literal": ""}

    def write():
        report["best"] = best_points(report["rows"])
        report["tuned_literal"] = tuned_literal(report["best"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        if args.md and args.sweep:
            with open(args.md, "w") as f:
                f.write(markdown(report))

    def hard_stop():
        print(f"FAIL: past the time limit of {args.time_limit:.0f} s; partial results written",
              flush=True)
        write()
        os._exit(3)

    watchdog = threading.Timer(args.time_limit, hard_stop)
    watchdog.daemon = True
    watchdog.start()
    data = [Batch(b, args.context) for b in batches]
    for bt in data:
        report["rows"].append(dict(baseline(bt), sweep={}, points={}))
    print(f"# {report['device']}, torch {report['torch']}: decode attention, us per layer "
          f"(x{LAYERS} layers per step), cache of {args.context + WARMUP_STEPS + DECODE_TOKENS + 1}"
          f" positions, filled to {data[0].positions[0] + 1}..{data[0].positions[-1] + 1}")
    keys = ("old_us", "kernel_us", "kernel_2k_us", "sdpa_filled_us", "floor_us", "max_rel_diff")
    print("batch " + " ".join(f"{k:>14}" for k in keys))
    for r in report["rows"]:
        print(f"{r['batch']:>5} " + " ".join(f"{r[k]:>14.4g}" if isinstance(r[k], float)
                                             else f"{r[k]:>14}" for k in keys), flush=True)
    write()
    if pool is not None:
        left = max(1.0, args.time_limit - 15 - (time.monotonic() - t0))
        done, _ = concurrent.futures.wait(futures, timeout=left)
        print(f"precompiled in {args.jobs} processes: {len(done)} of {len(futures)} finished "
              f"({time.monotonic() - t0:.1f} s since start)", flush=True)
        for proc in list(getattr(pool, "_processes", {}).values()):   # ours, still compiling
            if proc.is_alive():
                proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
    failures = []
    for point in SWEEP if args.sweep else ():
        name = point_name(point)
        report["points"].append(name)
        for bt, r in zip(data, report["rows"]):
            late = time.monotonic() - t0 > args.time_limit - 10
            r["points"][name] = list(point)
            s = {"status": "skipped (time limit)"} if late else sweep_point(bt, point)
            r["sweep"][name] = s
            if s["status"] == "ok":
                print(f"batch {bt.batch:>2} {name:<22} {s['us']:>7.2f} us "
                      f"{s['gbps']:>7.1f} GB/s  PASS", flush=True)
            elif not s["status"].startswith("skipped"):
                failures.append(f"batch {bt.batch} {name}: {s['status']}")
                print(f"batch {bt.batch:>2} {name:<22} FAIL {s['status']}", flush=True)
        write()
    watchdog.cancel()
    if args.sweep:
        print()
        print(markdown(report))
    folds = [r["fold_bitwise"] for r in report["rows"]]
    print(f"folded combine bitwise the combine kernel's (TUNED): "
          f"{'PASS' if all(folds) else 'FAIL'}")
    ok_ref = all(r["max_rel_diff"] < 2e-2 for r in report["rows"])
    print(f"old path, kernel and filled SDPA agree with the reference: "
          f"{'PASS' if ok_ref else 'FAIL'}")
    if args.sweep:
        print(f"sweep points checked (reference, bitwise fold, counters): "
              f"{'PASS' if not failures else 'FAIL'} ({len(failures)} failed)")
        for f in failures:
            print("  " + f)
    print(f"elapsed {time.monotonic() - t0:.1f} s")
    return 0 if ok_ref and all(folds) and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
