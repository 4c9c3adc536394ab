"""One GPU: the GEMM core of the fused kernels (``tpcomm/kernels/_gemm.py``) against torch.mm
(cuBLAS) and inductor's best Triton GEMM, bf16 [M, 7168] x [7168, 8192] (the Llama-70B TP-4
down projection), then the fused GEMM + reduce-scatter at world 1 (one emulated rank: the push
is a store into its own receive slot).

    OUT=/tmp/out PYTHONUNBUFFERED=1 python3 scripts/gpu_gemm_sweep.py
        [--ms 1024,4096,16384] [--no-inductor] [--inductor-ms 4096] [--budget-s 300]
        [--limit-s 400] [--quick]

Steps, each printing its progress and seconds:

1. torch.mm per M (the baseline of every ratio).
2. every candidate tile config of the core as a plain GEMM (``_gemm.matmul``: local store):
   compiled (a failure is printed and the config skipped), checked against a float64 torch
   reference at the first M (max |err| / max |ref| <= 1e-2) and against torch.mm at every M,
   then timed per M.
3. the fused op at world 1 (``P2PCollectives.matmul_reduce_scatter`` over an emulated buffer
   of the default 32 MiB, ``schedule="rounds"``: rounds of 1024 rows at N = 8192; the default
   at world 1 is now one launch, see scripts/gpu_fused_rs_sweep.py) with the three configs
   fastest as a plain GEMM at the round's rows: checked bitwise against the plain core with
   the same config, timed per M, next to the plain core with that config in the same rounds
   (the fused kernel without its push and receive) and, as the unfused reference, torch.mm
   then tpcomm's reduce_scatter.
4. correctness on odd shapes with small-integer inputs (sums exact in fp32, so the result must
   equal float64's rounded once, bitwise): fp16 / bf16 / fp32 (ieee and tf32), M = 1000,
   N = 8190 / 8191, K = 7000, b = w.t(), a strided; the plain core in each operand mode and
   the fused op at world 1.
5. inductor (``torch.compile(mode="max-autotune-no-cudagraphs")``, Triton templates only,
   persistent TMA on) per M, late: its autotuning time is the least predictable; an M is
   skipped once the run has used --budget-s seconds (each prints how long it took).
6. the fused op with 2 and 4 emulated ranks (``gpu_emulated_ranks.fused_gemm_case``, in a
   subprocess with CUDA_MODULE_LOADING=EAGER: bitwise, odd shapes, several rounds), if it can
   end before --limit-s.

Timing: CUDA events around back-to-back calls (about 25 ms of them), median of 7 repetitions.
Inputs are not rotated: b alone is 117 MB, more than twice the 50 MB L2, so every call streams
b from HBM, as in the model, for every contender alike.

Writes $OUT/gemm_sweep.json (after every step, so a killed run keeps what it measured); prints
a table and the ``CONFIGS`` entries for kernels/_gemm.py.
Exit status 1 when a result was wrong.
"""
from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import subprocess
import sys
import time
import traceback

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import triton  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from tpcomm.bench.fused_gemm import rel_err, time_us, world1_engine  # noqa: E402
from tpcomm.cuda.p2p_collectives import Layout  # noqa: E402
from tpcomm.kernels import _gemm  # noqa: E402

G = _gemm.GemmConfig
# ~12 candidates: inductor's persistent-TMA configs for Hopper, Triton's persistent tutorial's,
# the flattened loop against the plain one, host- vs device-side descriptors. All compile for
# sm_90a within 227 KiB of shared memory and without spills (scripts/compile_check.py
# --gemm-only). Triton 3.6's Hopper warp specialization is not among them: its first launch hung
# the 2026-12-02 run (``_gemm.WARP_SPECIALIZE_HANG``; plan() refuses it).
CANDIDATES = [
    G(),                                                     # 128x256x64 s3 w8, flattened
    G(num_stages=4),
    G(group_m=16),
    G(flatten=False),                                        # inductor's template's loop
    G(flatten=False, num_stages=4),
    G(block_m=256, block_n=128),
    G(block_m=256, block_n=128, num_stages=4, epilogue_split=True),
    G(block_n=128, num_stages=4),
    G(block_n=128, num_stages=5),
    G(block_n=128, num_stages=5, num_warps=4),
    G(block_n=128, block_k=128),
    G(tma="device"),
]
QUICK = [CANDIDATES[0], CANDIDATES[3]]
# a candidate (compile, check, timing at every M) that runs longer than this ends the process
# (faulthandler prints where it was): a hung launch costs seconds, not the device call
ITEM_LIMIT_S = 120
K, N = 7168, 8192
DEV = torch.device("cuda", 0)
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-5}
MAX_BYTES = 32 << 20   # the Communicator's default buffer (settings.max_bytes)
ALL_MODES = ("host", "device", "off")
# name, dtype, M, N, K, b = w.t(), a strided, tl.dot input precision, operand modes, fused too
ODD_CASES = (
    ("fp16 N=8190", torch.float16, 1000, 8190, 7000, False, False, None, ALL_MODES, True),
    ("bf16 N=8191", torch.bfloat16, 1000, 8191, 7000, False, False, None, ("host",), True),
    ("bf16 N=8191 b=w.t()", torch.bfloat16, 1000, 8191, 7000, True, False, None, ALL_MODES, True),
    ("bf16 a strided", torch.bfloat16, 1000, 8192, 7000, False, True, None, ("host",), True),
    ("fp32 ieee N=8190", torch.float32, 1000, 8190, 7000, False, False, None, ("host",), True),
    ("fp32 tf32 b=w.t()", torch.float32, 1000, 8190, 7000, True, False, "tf32", ("host",), False),
)


def log(*a, **kw):
    print(*a, **kw, flush=True)


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"


# ---------------------------------------------------------------- 2. candidates, plain GEMM


def sweep_candidates(ms, inputs, mm_out, candidates, res, failures):
    a0, b = inputs[ms[0]]
    ref32 = torch.mm(a0.double(), b.double()).float()     # the reference: no tf32 question
    res["torch_mm_err_vs_fp32"] = rel_err(mm_out[ms[0]], ref32)
    rows = res["candidates"] = []
    for i, cfg in enumerate(candidates):
        t0 = time.perf_counter()
        faulthandler.dump_traceback_later(ITEM_LIMIT_S, exit=True)
        row = {"config": cfg.name(), "fields": dataclasses.asdict(cfg), "us": {}}
        rows.append(row)
        try:
            c = torch.empty(ms[0], N, dtype=a0.dtype, device=DEV)
            p = _gemm.plan(a0, b, cfg)
            row["modes"] = list(p.modes)
            _gemm.matmul(p, c)
            torch.cuda.synchronize()
            row["compile_s"] = round(time.perf_counter() - t0, 1)
            row["err_vs_fp32"] = rel_err(c, ref32)
            if row["err_vs_fp32"] > TOL[a0.dtype]:
                raise AssertionError(f"wrong: max err {row['err_vs_fp32']:.3g} of max |ref|")
            for M in ms:
                a, _ = inputs[M]
                c = torch.empty(M, N, dtype=a.dtype, device=DEV)
                p = _gemm.plan(a, b, cfg)
                _gemm.matmul(p, c)
                err = rel_err(c, mm_out[M])
                if err > 2 * TOL[a.dtype]:
                    raise AssertionError(f"M={M}: differs from torch.mm by {err:.3g}")
                row["us"][M] = time_us(lambda: _gemm.matmul(p, c))
                del c
        except Exception as e:  # noqa: BLE001 - a config that fails is reported, not fatal
            row["error"] = short(e)
            if isinstance(e, AssertionError):
                failures.append(f"candidate {cfg.name()}: {row['error']}")
        log(f"  [{i + 1}/{len(candidates)}] {cfg.name():42s} "
            + (f"FAILED {row['error']}" if "error" in row else
               "  ".join(f"M={M}: {row['us'][M]:8.1f} us" for M in ms)
               + f"  (err {row['err_vs_fp32']:.1e}, compile {row['compile_s']} s)")
            + f"  [{time.perf_counter() - t0:.1f} s]")
        faulthandler.cancel_dump_traceback_later()
        torch.cuda.empty_cache()
    return [r for r in rows if "error" not in r]


# ---------------------------------------------------------------- 3. fused op, world 1


def world1():
    """One emulated rank with the Communicator's default buffer (32 MiB) and grid (SMs)."""
    return world1_engine(DEV)


def fused_rows_per_round(b) -> int:
    """Rows of one round of the fused op at world 1 (``P2PCollectives.matmul_reduce_scatter``:
    one push slot of the layout holds rows * N elements)."""
    L = Layout.make(1, MAX_BYTES, 1)
    return L.push_buf // b.element_size() // b.shape[1]


def fused_world1(ms, inputs, best, res, failures):
    back = world1()
    b = inputs[ms[0]][1]
    per_round = fused_rows_per_round(b)
    res["fused_rows_per_round"] = per_round
    out_rows = res["fused"] = []
    for cfg in best:
        row = {"config": cfg.name(), "us": {}, "plain_rounds_us": {}, "bitwise_vs_plain": {}}
        out_rows.append(row)
        try:
            for M in ms:
                t0 = time.perf_counter()
                a, _ = inputs[M]
                out = torch.empty(M, N, dtype=a.dtype, device=DEV)
                plain = torch.empty(M, N, dtype=a.dtype, device=DEV)
                _gemm.matmul(_gemm.plan(a, b, cfg), plain)
                back.matmul_reduce_scatter(a, b, out, config=cfg, schedule="rounds")
                back.check(sync=True)
                same = bool(torch.equal(out, plain))
                row["bitwise_vs_plain"][M] = same
                if not same:
                    failures.append(f"fused w1 {cfg.name()} M={M}: differs from the plain core "
                                    f"(max err {rel_err(out, plain):.3g})")
                row["us"][M] = time_us(lambda: back.matmul_reduce_scatter(
                    a, b, out, config=cfg, schedule="rounds"))
                rounds = [(_gemm.plan(a[lo:lo + per_round], b, cfg), plain[lo:lo + per_round])
                          for lo in range(0, M, per_round)]

                def plain_rounds():
                    for p, c in rounds:
                        _gemm.matmul(p, c)
                row["plain_rounds_us"][M] = time_us(plain_rounds)
                back.check(sync=True)
                log(f"  fused w1 {cfg.name():42s} M={M}: {row['us'][M]:8.1f} us "
                    f"(plain core in the same rounds {row['plain_rounds_us'][M]:8.1f}; "
                    f"bitwise = plain: {same}) [{time.perf_counter() - t0:.1f} s]")
                del out, plain
        except Exception as e:  # noqa: BLE001
            row["error"] = short(e)
            failures.append(f"fused w1 {cfg.name()}: {row['error']}")
            log(f"  fused w1 {cfg.name()}: FAILED {row['error']}")
    unf = res["mm_then_reduce_scatter_w1_us"] = {}
    for M in ms:
        a, _ = inputs[M]
        y = torch.empty(M, N, dtype=a.dtype, device=DEV)
        out = torch.empty(M, N, dtype=a.dtype, device=DEV)

        def mm_rs():
            torch.mm(a, b, out=y)
            back.reduce_scatter(y.view(1, -1), out.view(-1))
        unf[M] = time_us(mm_rs)
        log(f"  torch.mm then tpcomm reduce_scatter, w1, M={M}: {unf[M]:8.1f} us")
    back.close()


# ---------------------------------------------------------------- 4. odd shapes


def small_ints(shape, seed, dtype):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=g, device=DEV).to(dtype)


def odd_shapes(res, failures):
    """Bitwise: small-integer products are exact in fp32 (|sum| <= 4 K < 2^24) and rounded once."""
    back = world1()
    rows = res["odd_shapes"] = []
    for name, dtype, M, n, k, b_t, strided, prec, modes, fused in ODD_CASES:
        t0 = time.perf_counter()
        a = small_ints((M, k + 3), 1, dtype)[:, 1:1 + k] if strided else small_ints((M, k), 1,
                                                                                     dtype)
        b = small_ints((n, k), 2, dtype).t() if b_t else small_ints((k, n), 2, dtype)
        want = (a.double() @ b.double()).to(dtype)
        for tma in modes:
            row = {"case": name, "tma": tma}
            rows.append(row)
            try:
                p = _gemm.plan(a, b, None, tma=tma, input_precision=prec)
                row["modes"], row["config"] = list(p.modes), p.config.name()
                c = torch.full((M, n), 7.0, dtype=dtype, device=DEV)
                _gemm.matmul(p, c)
                row["ok"] = bool(torch.equal(c, want))
            except Exception as e:  # noqa: BLE001
                row["ok"], row["error"] = False, short(e)
            if not row["ok"]:
                failures.append(f"odd shape {name} tma={tma}: {row.get('error', 'wrong')}")
        if fused:
            row = {"case": name, "tma": "fused w1 (table config)"}
            rows.append(row)
            try:
                out = torch.full((M, n), 7.0, dtype=dtype, device=DEV)
                back.matmul_reduce_scatter(a, b, out)
                back.check(sync=True)
                row["ok"] = bool(torch.equal(out, want))
            except Exception as e:  # noqa: BLE001
                row["ok"], row["error"] = False, short(e)
            if not row["ok"]:
                failures.append(f"odd shape {name} fused w1: {row.get('error', 'wrong')}")
        log(f"  {name:24s} " + "  ".join(
            f"{r['tma']}{r.get('modes', '')}: {'ok' if r['ok'] else 'WRONG ' + r.get('error', '')}"
            for r in rows if r["case"] == name) + f"  [{time.perf_counter() - t0:.1f} s]")
    back.close()


def emulated_worlds(res, failures, timeout_s):
    """gpu_emulated_ranks.fused_gemm_case for worlds 2 and 4, in a fresh process (emulated ranks
    spin on each other: every kernel must be loaded before any runs, CUDA_MODULE_LOADING=EAGER)."""
    code = ("import json, sys; sys.path.insert(0, {here!r}); import gpu_emulated_ranks as g\n"
            "f, t = [], {{'checked': 0}}\n"
            "for w in (2, 4):\n"
            "    g.fused_gemm_case(w, f, t)\n"
            "print('RESULT ' + json.dumps({{'failures': f, 'tally': t}}))\n").format(here=HERE)
    env = dict(os.environ, CUDA_MODULE_LOADING="EAGER")
    try:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=timeout_s)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            raise RuntimeError(f"rc {p.returncode}: {(p.stdout + p.stderr)[-600:]}")
        got = json.loads(line[-1][len("RESULT "):])
        res["emulated_worlds_2_4"] = got
        failures.extend(f"emulated: {f}" for f in got["failures"])
        log(f"  worlds 2, 4: {len(got['failures'])} failures; "
            f"{json.dumps({k: v for k, v in got['tally'].items() if k != 'checked'})}")
    except Exception as e:  # noqa: BLE001
        res["emulated_worlds_2_4"] = {"error": short(e)}
        failures.append(f"emulated worlds 2, 4: {short(e)}")
        log(f"  worlds 2, 4: FAILED {short(e)}")


# ---------------------------------------------------------------- 5. inductor


def inductor(ms, inputs, mm_out, res, deadline):
    import torch._inductor.config as icfg
    icfg.max_autotune_gemm_backends = "TRITON"      # Triton templates only: not cuBLAS
    if hasattr(icfg.triton, "enable_persistent_tma_matmul"):
        icfg.triton.enable_persistent_tma_matmul = True
    out = res["inductor"] = {}
    for M in ms:
        if time.perf_counter() > deadline:
            out[M] = {"skipped": "past --budget-s"}
            log(f"  inductor M={M}: skipped (past --budget-s)")
            continue
        a, b = inputs[M]
        t0 = time.perf_counter()
        try:
            torch._dynamo.reset()

            def mm(x, y):
                return torch.mm(x, y)
            f = torch.compile(mm, mode="max-autotune-no-cudagraphs", dynamic=False)
            y = f(a, b)
            torch.cuda.synchronize()
            compile_s = round(time.perf_counter() - t0, 1)
            err = rel_err(y, mm_out[M])
            out[M] = {"us": time_us(lambda: f(a, b)), "compile_s": compile_s,
                      "err_vs_torch_mm": err}
            log(f"  inductor M={M}: {out[M]['us']:8.1f} us (autotune + compile {compile_s} s, "
                f"err vs torch.mm {err:.1e})")
        except Exception as e:  # noqa: BLE001
            out[M] = {"error": short(e), "s": round(time.perf_counter() - t0, 1)}
            log(f"  inductor M={M}: FAILED {short(e)}")


# ---------------------------------------------------------------- report


def table(ms, res):
    mm = res["torch_mm_us"]
    ind = res.get("inductor", {})
    cands = [r for r in res.get("candidates", []) if "error" not in r]
    lines = ["", "| M | torch.mm | inductor | best core (config) | core/cuBLAS | core/inductor "
             "| fused w1 (config) | fused/inductor | fused/cuBLAS | plain rounds | mm + rs w1 |",
             "|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    entries = []
    for M in ms:
        i_us = ind.get(M, {}).get("us")
        best = min(cands, key=lambda r: r["us"].get(M, float("inf")), default=None)
        fused = [r for r in res.get("fused", []) if M in r.get("us", {})]
        fb = min(fused, key=lambda r: r["us"][M], default=None)

        def ratio(x, y):
            return f"{x / y:.3f}" if x and y else "-"
        c_us = best["us"].get(M) if best else None
        f_us = fb["us"][M] if fb else None
        lines.append(
            f"| {M} | {mm[M]} | {i_us or '-'} | {c_us or '-'} ({best['config'] if best else '-'}) "
            f"| {ratio(c_us, mm[M])} | {ratio(c_us, i_us)} | {f_us or '-'} "
            f"({fb['config'] if fb else '-'}) | {ratio(f_us, i_us)} | {ratio(f_us, mm[M])} "
            f"| {fb['plain_rounds_us'].get(M, '-') if fb else '-'} "
            f"| {res.get('mm_then_reduce_scatter_w1_us', {}).get(M, '-')} |")
        if best:
            fields = {k: v for k, v in best["fields"].items()
                      if v != getattr(G(), k) and k != "num_sms"}
            args = ", ".join(f"{k}={v!r}" for k, v in fields.items())
            entries.append(f"    (torch.bfloat16, {_gemm.m_bucket(M)}, {N}, {K}): "
                           f"GemmConfig({args}),   # {c_us} us, torch.mm {mm[M]} us")
    lines += ["", "Candidates, us per call (plain core, local store):",
              "| config | " + " | ".join(f"M={M}" for M in ms) + " |",
              "|---|" + "---:|" * len(ms)]
    for r in res.get("candidates", []):
        lines.append(f"| {r['config']} | " + " | ".join(
            str(r["us"].get(M, "-")) if "error" not in r else "failed" for M in ms) + " |")
    lines += ["", "CONFIGS entries for tpcomm/kernels/_gemm.py (the fused op launches rounds of "
              f"{res.get('fused_rows_per_round', '?')} rows: its key is that bucket):", *entries]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1024,4096,16384")
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--inductor-ms", help="the Ms inductor autotunes (default: --ms)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="no inductor autotuning starts after this many seconds of the run")
    ap.add_argument("--limit-s", type=float, default=400.0,
                    help="the emulated-ranks check runs only if it can end before this")
    ap.add_argument("--quick", action="store_true", help="2 candidates, no odd shapes")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "/tmp/gemm_sweep")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gemm_sweep.json")
    t_start = time.perf_counter()
    ms = [int(x) for x in args.ms.split(",")]
    res = {"device": torch.cuda.get_device_name(DEV), "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda,
           "sms": torch.cuda.get_device_properties(DEV).multi_processor_count,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "shape": {"K": K, "N": N, "ms": ms},
           "command": " ".join(["python3", *sys.argv])}
    log(json.dumps(res))
    failures: list[str] = []

    def elapsed():
        return time.perf_counter() - t_start

    def step(name):
        res["failures"], res["seconds"] = failures, round(elapsed(), 1)
        with open(path, "w") as f:   # after every step: a killed run keeps what it measured
            json.dump(res, f, indent=1, default=str)
        if name:
            log(f"== {name} (at {elapsed():.0f} s)")

    step("1. torch.mm")
    gen = torch.Generator(device=DEV).manual_seed(0)
    b = torch.randn(K, N, generator=gen, device=DEV).to(torch.bfloat16)
    inputs, mm_out = {}, {}
    res["torch_mm_us"] = {}
    for M in ms:
        a = (torch.randn(M, K, generator=gen, device=DEV) / K ** 0.5).to(torch.bfloat16)
        inputs[M] = (a, b)
        mm_out[M] = torch.mm(a, b)
        res["torch_mm_us"][M] = time_us(lambda: torch.mm(a, b))
        log(f"  torch.mm M={M}: {res['torch_mm_us'][M]} us")
    try:
        step("2. candidates (plain GEMM on the core)")
        ok = sweep_candidates(ms, inputs, mm_out, QUICK if args.quick else CANDIDATES, res,
                              failures)
        step("3. fused GEMM + reduce-scatter, world 1")
        # rank by the plain time at the M nearest the fused op's launches (its rounds' rows)
        m_round = min(ms, key=lambda M: abs(M - fused_rows_per_round(b)))
        best = sorted(ok, key=lambda r: r["us"].get(m_round, float("inf")))[:3]
        fused_world1(ms, inputs, [G(**r["fields"]) for r in best], res, failures)
        if not args.quick:
            step("4. odd shapes, bitwise")
            odd_shapes(res, failures)
    except Exception:  # noqa: BLE001 - keep what was measured
        failures.append("sweep aborted: " + traceback.format_exc()[-800:])
        log(failures[-1])
    if not args.no_inductor:
        step("5. inductor max-autotune (Triton templates, persistent TMA on)")
        i_ms = [int(x) for x in args.inductor_ms.split(",")] if args.inductor_ms else ms
        inductor([M for M in i_ms if M in inputs], inputs, mm_out, res,
                 t_start + args.budget_s)
    if not args.quick:
        step("6. fused op with 2 and 4 emulated ranks (subprocess)")
        left = args.limit_s - elapsed()
        if left >= 60:
            emulated_worlds(res, failures, timeout_s=min(150.0, left))
        else:
            res["emulated_worlds_2_4"] = {"skipped": f"{left:.0f} s left of --limit-s"}
            log(f"  skipped: {left:.0f} s left of --limit-s (run scripts/gpu_emulated_ranks.py)")
    step(None)
    log(table(ms, res))
    log(f"\n{len(failures)} failures", *failures[:20], sep="\n")
    log(f"wrote {path}; {res['seconds']} s in all")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
