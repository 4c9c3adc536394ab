"""The GPU kernels' protocols on the CPU, through Triton's interpreter: each script runs several
"ranks" as threads over CPU tensors (``tpcomm.cuda.emulated``) and prints ALL OK.

- gpu_protocol_sim.py: every collective kernel (indexing, push/poll/clear, epoch rotation,
  chunking, the fused all-reduce + add + RMSNorm, the timeout path); with ``mismatch``: the
  call check (calls that differ in size, rounds, kernel family, dtype or op raise
  MismatchError on every rank, write no output, every rank's engine resets itself and the
  calls after it are exact; a rank whose peer had already stopped records it too); with
  ``mixed4``: world 4, one-shot push
  calls of varying sizes interleaved with fused-norm calls and the other algorithms on one group
  (the call headers and push regions in step across kernel families; the interpreter runs a
  kernel's blocks one after another and has no warps, so a block's warps going out of step on
  the GPU is out of its reach: scripts/gpu_emulated_ranks.py checks that);
- p2p_probe_sim.py: the data-moving P2P check (a healthy mapping passes, a mapping that does not
  reach the peer is found and names the writing rank);
- fused_gemm_sim.py: the fused GEMM + reduce-scatter (exact for worlds 2 and 3, every operand
  mode, rounds, regions left clean, timeout);
- fused_ops_sim.py: the three fused GEMM + collective ops (reduce-scatter, all-gather + GEMM,
  all-reduce) at worlds 1, 2 and 4 (exact, odd shapes, rounds, regions left clean, timeout).
- decode_attention_sim.py: the model's decode attention (RoPE, cache write, attention up to the
  position read on the device), and the tiny model's tokens through it.

Skipped where Triton is not installed: they need no GPU, only triton.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="needs triton (pip install --no-deps triton) to interpret the kernels")
@pytest.mark.parametrize("script, args, timeout_s", [
    ("gpu_protocol_sim.py", ["quick"], 900),
    ("gpu_protocol_sim.py", ["mismatch"], 600),
    ("gpu_protocol_sim.py", ["mixed4"], 600),
    ("p2p_probe_sim.py", [], 300),
    ("fused_gemm_sim.py", [], 600),
    ("fused_ops_sim.py", [], 600),
    ("decode_attention_sim.py", [], 300),
])
def test_kernels_under_the_triton_interpreter(script, args, timeout_s):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, os.path.join(HERE, script), *args], env=env,
                       capture_output=True, text=True, timeout=timeout_s)
    assert p.returncode == 0 and "ALL OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
