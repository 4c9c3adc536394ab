"""The fused GEMM + reduce-scatter kernels on the CPU, through Triton's interpreter (see
fused_gemm_sim.py): exact results for worlds 2 and 3, rounds, regions left clean, timeout.

Skipped where Triton is not installed (the CPU CI machine): it needs no GPU, only triton.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="needs triton (pip install --no-deps triton) to interpret the kernels")
def test_matmul_reduce_scatter_fused_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, os.path.join(HERE, "fused_gemm_sim.py")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "ALL OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
