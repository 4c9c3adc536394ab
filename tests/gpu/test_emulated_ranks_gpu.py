"""Every GPU kernel with 2 and 4 emulated ranks on ONE GPU (``scripts/gpu_emulated_ranks.py``).

Runs where a single GPU is all there is: the kernels as compiled for the GPU, exact sums and
bitwise equality across ranks, CUDA-graph and eager soaks with new inputs, the fused
all-reduce + add + RMSNorm, the P2P probe kernels and a stalled rank. Not NVLink and not
separate processes (the 2- and 4-GPU tests cover those). Skipped, visibly, without a GPU.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "gpu_emulated_ranks.py")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs 1 CUDA GPU, found 0")
def test_kernels_with_emulated_ranks_on_one_gpu(tmp_path):
    out = tmp_path / "emulated.json"
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, SCRIPT, "--soak-ops", "5000", "--eager-soak-ops", "2000",
                        "--json", str(out)], env=env, capture_output=True, text=True,
                       timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    tally = json.loads(out.read_text())
    assert not tally["failures"]
    assert tally["checked"] > 500
    soaks = {k: v for k, v in tally.items() if k.startswith("soak_")}
    assert len(soaks) == 8 and all(v["rounds_with_a_wrong_rank"] == 0 for v in soaks.values())
    assert tally["timeout"]["raised_after_s"] < 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs 1 CUDA GPU, found 0")
def test_call_mismatch_raises_on_every_emulated_rank_and_the_engines_recover(tmp_path):
    """The kernels' call check on the GPU: calls that differ (sizes, rounds, push vs pull,
    dtype, op, all-gather, fused norm, ring) raise MismatchError on every rank, no timeout; the
    mismatched call writes no output; every rank's engine resets itself, and 100 eager calls,
    replays of a graph captured before the mismatch and of one captured after are exact."""
    out = tmp_path / "mismatch.json"
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, SCRIPT, "--only", "mismatch", "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    tally = json.loads(out.read_text())
    cases = tally["mismatch_w2"]
    assert len(cases) == 9 and all(v["ranks"] == ["mismatch", "mismatch"]
                                   for v in cases.values()), cases
    for name, v in cases.items():
        assert v["outputs_kept"] and v["eager_calls_after"] == 100, (name, v)
        assert v["eager_wrong_after"] == 0 and v["graph_wrong_after"] == 0, (name, v)
        assert v["graph_replays_after"] >= 50 and not v["errors_after"], (name, v)
