"""scripts/gpu_host_breakdown.py off the GPU: it skips visibly without one (exit 0), and its
summary and before / after table compute what they say from the rows."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_host_breakdown.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_host_breakdown as hb  # noqa: E402


def test_skips_without_gpu():
    import torch
    if torch.cuda.is_available():
        return
    p = subprocess.run([sys.executable, SCRIPT, "--budget-s", "5"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "SKIP gpu_host_breakdown: no GPU visible" in p.stdout


def test_summary_ratios():
    w1 = {"comm_ip": 9.0, "engine_ip": 6.5, "comm_oop": 9.5, "engine_oop": 7.0,
          "comm_alloc": 11.0, "lean": 5.0, "l16": 7.5, "d1": 18.0}
    lines = hb.summary(w1, {})
    text = "\n".join(lines)
    assert "| world 1: Communicator above engine, in place | 2.50 us | <= 2 us |" in text
    assert "| world 1: allocating out costs | 1.50 us |" in text
    assert "| world 1: engine above its lean launch (out of place) | 2.00 us |" in text
    assert "| world 1: Communicator in place / 16-arg CompiledKernel.run | 1.20 x |" in text
    assert "| world 2: Communicator above engine, in place | n/a |" in text


def test_compare_and_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(hb, "ROWS", [
        {"group": "g", "what": "a", "host_us": 3.0, "with_sync_us": 3.1, "spread_us": 0.1},
        {"group": "g", "what": "b", "skipped": "time budget spent"}])
    hb.compare(str(tmp_path), "rev", [{"group": "g", "what": "a", "host_us": 4.0}])
    text = (tmp_path / "host_breakdown_compare.md").read_text()
    assert "| g | a | 4.00 | 3.00 | 0.75 |" in text
    assert "| g | b |  |  |  |" in text
    # a spent budget records a skipped row instead of timing
    called = []
    args = type("A", (), {"iters": 1, "reps": 1})
    r = hb.row("g", "c", lambda: called.append(1), args, hb.Budget(-1), lambda: None)
    assert r["skipped"] and not called
    r = hb.row("g", "d", lambda: called.append(1), args, hb.Budget(10), lambda: None)
    assert r["host_us"] > 0 and len(called) == 4   # 3 warm-up calls, then 1 timed
