"""The skinny GEMM (decode GEMV) kernel: the interpreted checks (skinny_gemm_sim.py) and the
host side (configs, the tuned table's lookup)."""
import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="needs triton (pip install --no-deps triton) to interpret the kernels")
def test_skinny_gemm_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, os.path.join(HERE, "skinny_gemm_sim.py")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "ALL OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
