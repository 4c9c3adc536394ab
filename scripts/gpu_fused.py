"""One GPU, one command, at most --budget-s seconds including compiles: the fused GEMM +
collective ops of issue 14 (matmul_reduce_scatter, all_gather_matmul, matmul_all_reduce with
method "fused", ``tpcomm/cuda/fused_gemm.py``): correctness, graph replays, and their GEMM at
world 1 against the same core without communication, torch.mm and inductor.

    OUT=/tmp/out python3 scripts/gpu_fused.py [--budget-s 240] [--ms 1024,4096,16384]
        [--inductor-ms 4096,1024,16384] [--k 7168] [--n 8192]

Items, each in a subprocess of its own under a hard time limit (a hang or a compile that never
ends costs that item's limit, not the device call; what an item measured before it was stopped
is kept: it writes its JSON after every measurement):

1. ``w1`` (limit 50 s): one emulated rank, the three ops on odd shapes (rows not a multiple of
   the tile, N odd, K not a multiple of BLOCK_K; fp32, bf16 with b = w.t(), fp16), small-integer
   inputs, bitwise against the unfused path (per-rank products rounded once, summed or gathered
   in rank order), outputs poisoned first, an all-reduce on the same buffers afterwards; then
   the three ops captured in one CUDA graph and replayed three times with new inputs
   (``gpu_emulated_ranks.fused_ops_case``).
2. ``timing`` (the budget less 75 s kept for the next item): bf16 [M, K] x [K, N] at world 1
   for every --M: torch.mm, then per op the fused op (one emulated rank, 32 MiB buffer, every
   SM) and the same GEMM core without communication, checked (fused bitwise = core) then timed
   (``tpcomm/bench/fused_gemm.py``); then inductor's best Triton GEMM (max-autotune, Triton
   templates only) at the --inductor-ms in that order, as long as its time lasts (M = 4096
   first).
3. ``emulated_w2`` and ``emulated_w4``, side by side where the GPU's compute mode allows two
   processes (what is left, about 75 s; their compiles run on two cores and their GPU work
   takes turns; else one after the other, each with what is left): the correctness of
   item 1 with 2 and 4 emulated ranks (every rank a stream of this GPU;
   CUDA_MODULE_LOADING=EAGER; every kernel loaded before the ranks run).

Writes $OUT/fused.json (every item's results, limits and seconds) and $OUT/fused_<item>.log;
prints a compact table at the end. Exit status 1 if a result was wrong or an item failed or ran
out of time.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
# seconds: w1's limit; what the timing item leaves for the emulated worlds; the driver's own
ORDER = (("w1",), ("timing",), ("emulated_w2", "emulated_w4"))
W1_LIMIT_S, EMULATED_RESERVE_S, MARGIN_S = 50.0, 75.0, 5.0


# ---------------------------------------------------------------- items (in the subprocess)


def _save(path, res):
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)


def item_correctness(worlds, path):
    sys.path.insert(0, HERE)
    import gpu_emulated_ranks as g
    res = {"failures": [], "tally": {"checked": 0}}
    for w in worlds:
        t0 = time.perf_counter()
        try:
            g.fused_ops_case(w, res["failures"], res["tally"], shapes=g.FUSED_OPS_QUICK)
        except Exception as e:  # noqa: BLE001 - a compile error or a timeout: record, go on
            res["failures"].append(f"world {w}: {type(e).__name__}: {str(e)[:400]}")
        res[f"seconds_w{w}"] = round(time.perf_counter() - t0, 1)
        print(f"world {w}: {res['tally'].get(f'fused_ops_w{w}')} [{res[f'seconds_w{w}']} s]",
              flush=True)
        _save(path, res)


def item_timing(args, path, deadline):
    sys.path.insert(0, ROOT)
    import torch
    from tpcomm.bench import fused_gemm
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import triton
    res["triton"] = triton.__version__

    def on_row(table):
        res.update(table)
        _save(path, res)
    table = fused_gemm.world1_table(
        args.ms, args.k, args.n, torch.bfloat16, inductor_ms=args.inductor_ms,
        deadline=deadline, progress=lambda line: print(line, flush=True), on_row=on_row)
    on_row(table)


# ---------------------------------------------------------------- driver


def start_item(name, args, out, limit):
    """Start ``name`` in a subprocess (a session of its own: at the limit the whole group is
    killed, inductor's compile workers too)."""
    path = os.path.join(out, f"fused_{name}.json")
    log_path = os.path.join(out, f"fused_{name}.log")
    if os.path.exists(path):
        os.remove(path)
    env = dict(os.environ, **NO_MULTICAST, PYTHONUNBUFFERED="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # emulated ranks spin on each other: every kernel loaded when CUDA starts (a lazy load waits
    # for the running kernels; gpu_emulated_ranks.py); one rank waits for nobody, and loading
    # every kernel of torch up front costs seconds
    env["CUDA_MODULE_LOADING"] = "EAGER" if name.startswith("emulated") else "LAZY"
    cmd = [sys.executable, os.path.abspath(__file__), "--item", name, "--result", path,
           "--ms", ",".join(map(str, args.ms)), "--k", str(args.k), "--n", str(args.n),
           "--inductor-ms", ",".join(map(str, args.inductor_ms)),
           "--deadline-in", str(max(0.0, limit - 20.0))]
    log = open(log_path, "w")
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    return {"name": name, "proc": p, "log": log, "path": path, "log_path": log_path,
            "limit": limit, "t0": time.perf_counter()}


def finish_item(it):
    """Wait for a started item until its limit; its JSON (possibly partial) and how it ended."""
    p, status = it["proc"], "ok"
    try:
        if p.wait(timeout=max(0.0, it["t0"] + it["limit"] - time.perf_counter())):
            status = f"exit {p.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        status = f"stopped at its limit of {it['limit']:.0f} s"
    it["log"].close()
    seconds = round(time.perf_counter() - it["t0"], 1)
    result = {}
    if os.path.exists(it["path"]):
        with open(it["path"]) as f:
            result = json.load(f)
    with open(it["log_path"]) as f:
        tail = f.read()[-1500:]
    print(f"== {it['name']}: {status} in {seconds} s (limit {it['limit']:.0f} s)", flush=True)
    return {"status": status, "seconds": seconds, "limit_s": it["limit"], "result": result,
            "log_tail": tail}


def summary(items, n_ms: int) -> tuple[list[str], list[str]]:
    lines, problems = [], []
    for name in ("w1", "emulated_w2", "emulated_w4"):
        it = items.get(name)
        if not it:
            continue
        r = it["result"]
        fails = r.get("failures", [])
        tally = {k: v for k, v in r.get("tally", {}).items() if k.startswith("fused_ops")}
        lines.append(f"{name}: {it['status']}, {r.get('tally', {}).get('checked', 0)} outputs "
                     f"checked, {len(fails)} wrong; {json.dumps(tally)[:600]}")
        problems += [f"{name}: {f}" for f in fails]
        if it["status"] != "ok":
            problems.append(f"{name}: {it['status']}")
    it = items.get("timing")
    if it:
        r = it["result"]
        lines.append(f"timing: {it['status']} ({r.get('device', '?')}, torch "
                     f"{r.get('torch', '?')}, triton {r.get('triton', '?')})")
        if r.get("rows"):
            sys.path.insert(0, ROOT)
            from tpcomm.bench.fused_gemm import table_lines
            lines += table_lines(r)
        problems += [f"timing: {row['op']} M={row['M']} " + (row.get("error") or
                     f"wrong (bitwise = core: {row['bitwise_fused_vs_core']}, core vs torch.mm "
                     f"{row['core_err_vs_torch_mm']:.3g})")
                     for row in r.get("rows", []) if not row.get("ok")]
        complete = len(r.get("rows", [])) == 3 * n_ms
        if it["status"].startswith("stopped") and complete:
            lines.append("timing: every fused row measured; stopped during inductor's "
                         "autotuning (the inductor column holds what finished)")
        elif it["status"] != "ok":
            problems.append(f"timing: {it['status']}")
    return lines, problems


def _shared_gpu() -> bool:
    """Can two processes use GPU 0 at once (compute mode Default)? Otherwise the emulated
    worlds run one after the other."""
    try:
        mode = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=compute_mode",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return mode == "Default"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--ms", default="1024,4096,16384")
    ap.add_argument("--inductor-ms", default="4096,1024,16384")
    ap.add_argument("--k", type=int, default=7168)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--item", choices=("w1", "timing", "emulated_w2", "emulated_w4"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-in", type=float, default=1e9, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.ms = [int(x) for x in args.ms.split(",") if x]
    args.inductor_ms = [int(x) for x in args.inductor_ms.split(",") if x]
    if args.item:
        deadline = time.perf_counter() + args.deadline_in
        if args.item == "timing":
            item_timing(args, args.result, deadline)
        else:
            item_correctness((1,) if args.item == "w1" else (int(args.item[-1]),), args.result)
        return 0
    t_start = time.perf_counter()
    out = os.environ.get("OUT", "/tmp/tpcomm-gpu-fused")
    os.makedirs(out, exist_ok=True)
    items = {}
    order = ORDER if _shared_gpu() else tuple((name,) for group in ORDER for name in group)
    for i, group in enumerate(order):   # the items of a group run at the same time
        left = args.budget_s - (time.perf_counter() - t_start) - MARGIN_S
        later = len(order) - i        # the emulated worlds one after the other share the rest
        limit = {"w1": min(W1_LIMIT_S, left), "timing": left - EMULATED_RESERVE_S}.get(
            group[0], left / later)
        if limit < 20:
            for name in group:
                items[name] = {"status": f"not run: {left:.0f} s of the budget left",
                               "result": {}}
            continue
        started = [start_item(name, args, out, limit) for name in group]
        for it in started:
            items[it["name"]] = finish_item(it)
    lines, problems = summary(items, len(args.ms))
    doc = {"command": " ".join(["python3", "scripts/gpu_fused.py", *sys.argv[1:]]),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget_s,
           "seconds": round(time.perf_counter() - t_start, 1), "items": items,
           "problems": problems}
    with open(os.path.join(out, "fused.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print("\n".join(["", "# fused GEMM + collective ops (issue 14)", *lines, "",
                     f"{len(problems)} problems", *problems[:20],
                     f"wrote {out}/fused.json; {doc['seconds']} s in all"]))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
