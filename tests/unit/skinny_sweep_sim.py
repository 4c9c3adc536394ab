"""scripts/gpu_skinny_gemm.py's steps on the CPU under Triton's interpreter (tiny shapes, a
wall-clock timer for the CUDA graph): check, timing bookkeeping, tables, winners. Prints
ALL OK."""
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
sys.path.insert(0, HERE)

import skinny_gemm_sim  # noqa: E402,F401  (the interpreter patch)
import gpu_skinny_gemm as g  # noqa: E402

from tpcomm.kernels.skinny_gemm import SkinnyConfig as C  # noqa: E402


def wall_us(fn, ws, calls):
    t = time.perf_counter()
    for i in range(calls):
        fn(ws[i % len(ws)])
    return (time.perf_counter() - t) * 1e6 / calls


g.DEVICE = "cpu"
g.graph_us = wall_us
g.ROTATE_BYTES = 3 * 64 * 96 * 2
g.GRAPH_US = 1.0          # calls per timing: the copies (3)
g.SHAPES = {"tiny": (64, 96, False), "tiny_swiglu": (64, 96, True)}
g.candidates = lambda n_out, K, M, sms, swiglu=False: [
    C(16, 32, 1, 4, 1, True), C(16, 32, 3, 4, 1, True), C(32, 32, 2, 4, 1, False)][:3 if M == 1 else 2]
results, failures = [], []
t0 = time.monotonic()
for name in g.SHAPES:
    for M in (1, 8):
        x_dtype = torch.float16
        g.run_shape(name, M, t0, t0 + 600, 8, results, failures, dtype=x_dtype)
assert not failures, failures
for row in results:
    assert row["baseline_time"]["us"] > 0
    timed = [r for r in row["configs"] if "us" in r]
    assert len(timed) == (3 if row["M"] == 1 else 2), row
    assert row["best"]["us"] == min(r["us"] for r in timed)
    assert "fold_vs_two_kernels" in row
ns = {"SkinnyConfig": C}
exec(g.winners_literal(results), ns)
assert isinstance(ns["TUNED"], dict)
# a budget already spent: everything SKIPPED, nothing fails
late = []
g.run_shape("tiny", 1, t0, t0, 8, late, failures, dtype=torch.float16)
assert not failures and all(r["status"].startswith("SKIPPED") for r in late[0]["configs"])
print("ALL OK")
