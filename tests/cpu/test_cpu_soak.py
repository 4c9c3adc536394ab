"""A short soak in CI: random ops, sizes, dtypes and algorithms, each result checked exactly.
The long soaks (100,000 ops per algorithm on GPU) use the same script; see
benchmarks/results/reliability.md."""
import json
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import soak  # noqa: E402


def test_soak_checker_catches_a_wrong_element():
    dev = torch.device("cpu")
    for op in ("all_reduce", "reduce_scatter", "all_gather"):
        if op == "all_reduce":
            out = soak.expected_all_reduce(33, 3, torch.bfloat16, 5, dev)
        elif op == "all_gather":
            out = torch.cat([soak.exact(33, r, torch.bfloat16, 5, dev) for r in range(3)])
        else:
            out = soak.expected_all_reduce(99, 3, torch.bfloat16, 5, dev)[33:66].clone()
        assert soak.check(op, out, 33, 1, 3, torch.bfloat16, 5, dev)
        out[17] += 1
        assert not soak.check(op, out, 33, 1, 3, torch.bfloat16, 5, dev)


@pytest.mark.cpu
def test_short_soak_all_algorithms_zero_wrong():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--ops", "600",
                           "--algorithm", "auto,one_shot,two_shot"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ops"] == 600 and result["wrong_all_ranks"] == 0
    assert result["fallbacks"] == {}
    assert {"all_reduce/one_shot", "all_reduce/two_shot", "reduce_scatter/auto",
            "all_gather/auto"} <= set(result["counts"])
