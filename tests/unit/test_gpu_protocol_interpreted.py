"""The GPU kernels' protocol on the CPU, through Triton's interpreter (see gpu_protocol_sim.py).

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
def test_gpu_kernels_protocol_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, os.path.join(HERE, "gpu_protocol_sim.py"), "quick"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and "ALL OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
