"""`tpcomm bench host` on the CPU (the CI smoke test of the host-path benchmark) and its
report helpers."""
import json
import os
import signal
import subprocess
import sys

import pytest

from tpcomm.bench import host

pytestmark = pytest.mark.cpu
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK",
                 "LOCAL_WORLD_SIZE")


def test_cpu_rows_end_to_end(tmp_path):
    out, md = tmp_path / "host.json", tmp_path / "host.md"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    proc = subprocess.Popen([sys.executable, "-m", "tpcomm", "bench", "host", "--device", "cpu",
                             "--sizes", "4K", "--iters", "5", "--reps", "2", "--json", str(out),
                             "--markdown", str(md)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    whats = [r["what"] for r in rows]
    assert whats == ["torch.add, 1024 elements", "gloo all_reduce, world 1",
                     "gloo all_reduce, world 2",
                     "tpcomm Communicator.all_reduce, world 1 (local copy)",
                     "tpcomm Communicator.all_reduce, world 2 (shm)"], whats
    for r in rows:
        assert "na" not in r and 0 < r["host_us"] <= r["with_sync_us"] + 1e-9, r
    assert "gloo all_reduce, world 2" in stdout and "| what |" in md.read_text()


def test_ratios_and_slowest_rank():
    a = [{"what": host.BASE_1, "nbytes": None, "host_us": 10.0, "with_sync_us": 11.0},
         {"what": host.BASE_16, "nbytes": None, "host_us": 8.0, "with_sync_us": 9.0},
         {"what": "x", "nbytes": 4096, "host_us": 5.0, "with_sync_us": 6.0},
         {"what": "y", "nbytes": 4096, "na": "not here"}]
    b = [dict(r) for r in a]
    b[2] = dict(b[2], host_us=12.0)
    rows = host.merge_ranks([a, b])
    host.add_ratios(rows)
    assert rows[2]["host_us"] == 12.0
    assert rows[2]["x_dispatcher_1arg"] == pytest.approx(1.2)
    assert rows[2]["x_launcher_16arg"] == pytest.approx(1.5)
    assert rows[3]["na"] == "not here" and "x_dispatcher_1arg" not in rows[3]
    head, cells = host.table(rows)
    assert cells[3][2] == "n/a" and cells[2][4] == "1.20"


def test_bad_sizes_are_refused(tmp_path):
    p = subprocess.run([sys.executable, "-m", "tpcomm", "bench", "host", "--device", "cpu",
                        "--sizes", "100"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert p.returncode == 2 and "multiples of 64" in p.stderr, p.stderr
