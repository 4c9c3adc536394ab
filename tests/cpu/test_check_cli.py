import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu


def test_tpcomm_check_passes_on_this_machine():
    proc = subprocess.run([sys.executable, "-m", "tpcomm", "check", "--device", "cpu", "-n", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "torch" in out and "/dev/shm" in out
    assert "backend: shm" in out and "== PASS" in out
    for op_algo in ("all_reduce      one_shot", "all_reduce      two_shot",
                    "reduce_scatter  direct", "all_gather      direct", "all_reduce      torch"):
        assert op_algo in out, out
    assert "FAIL" not in out


def test_tpcomm_check_refuses_cuda_without_cuda():
    # exit 2 and a message, not a traceback
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "tpcomm", "check", "--device", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
