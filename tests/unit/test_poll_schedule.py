"""The one-shot push kernel's first poll issues all its loads of a round back to back (sm_90).

Since b5ba387 the poll of ``_lamport.poll_sum_call`` loaded the peers' call headers before the
data, and ptxas (Triton 3.6) then issued slot 1's volatile load only after the header's and slot
0's had returned: two round trips per poll round, +0.3 us per push call inside CUDA graphs
(2 emulated ranks, one H200; benchmarks/results/push-latency-h200x1-2026-12-03-s4.md). Loading
the data first gives one round trip. This test compiles the kernel for sm_90 on the CPU (a
stand-in driver, as ``scripts/compile_check.py`` does), disassembles it and checks that the
first poll loop's volatile loads (R data vectors and the header word) lie within a few
instructions of each other. It depends on the compiler's schedule, so it runs only with the
Triton this project pins (3.6) and its bundled ptxas / cuobjdump."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = textwrap.dedent('''
    import os, re, subprocess, sys, tempfile
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import torch, triton, triton.language as tl
    from triton.runtime import driver
    import compile_check as cc
    driver.set_active(cc._Sm90Driver())
    from tpcomm.kernels import all_reduce_one_shot as m
    bins = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    for R, dtype in ((2, torch.bfloat16), (2, torch.float32), (4, torch.bfloat16)):
        item = dtype.itemsize
        itype, canon = (tl.int32, 0x7FC00000) if item == 4 else (tl.int16, 0x7FC0)
        addrs = tuple(0x7F0000000000 + i * (1 << 30) for i in range(R))
        k = m.bind_all_reduce_one_shot_push(
            sync=cc._sync(addrs, 1, 1 << 24), slot_stride=1 << 20, grid=132, num_warps=8,
            itype=itype, canon=canon, block=8 * 32 * (16 // item), item=item)
        x = torch.empty(4104, dtype=dtype)
        ck = k.warmup(x, torch.empty_like(x), 4096, 12345)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"])
            f.flush()
            sass = subprocess.run([os.path.join(bins, "cuobjdump"), "-sass", f.name],
                                  capture_output=True, text=True, check=True).stdout
        ins = re.findall(r"/\\*([0-9a-f]{4,})\\*/\\s+([^;]*);", sass)
        vol = [(int(a, 16) // 16, op) for a, op in ins if "STRONG.SYS" in op and "LDG" in op]
        data = [i for i, op in vol if "LDG.E.128" in op]
        first = data[:R]                         # one 16-byte vector per slot and thread
        near = [i for i, op in vol if "LDG.E.64" in op and abs(i - first[0]) < 64]
        group = first + near[:1]
        span = max(group) - min(group)
        print(f"R={R} {dtype}: poll loads at {group}, span {span} instructions")
        assert len(data) >= 2 * R and near, (R, dtype, vol)
        assert span <= 8, f"R={R} {dtype}: the poll's loads are {span} instructions apart"
    print("ALL OK")
''')


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="needs triton 3.6 (pip install --no-deps triton==3.6.0)")
def test_push_poll_issues_its_loads_together():
    import triton
    if not triton.__version__.startswith("3.6"):
        pytest.skip(f"the schedule checked is ptxas's of Triton 3.6, this is {triton.__version__}")
    bins = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bins, "cuobjdump")):
        pytest.skip("Triton's bundled cuobjdump is missing")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + _SCRIPT], env=env,
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0 and "ALL OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
