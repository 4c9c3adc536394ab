import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tpcomm.flight_recorder import DONE, FAILED, RUNNING, FlightRecorder


def test_ring_keeps_the_last_n_oldest_first():
    fr = FlightRecorder(capacity=4)
    for i in range(10):
        rec = fr.start("all_reduce", "one_shot", i * 8, "torch.float32")
        fr.finish(rec)
    recs = fr.records()
    assert [r["call"] for r in recs] == [6, 7, 8, 9]
    assert all(r["state"] == DONE and r["end"] >= r["start"] for r in recs)
    assert recs[0]["bytes"] == 48 and recs[0]["dtype"] == "float32"


def test_states_and_render():
    fr = FlightRecorder(capacity=8)
    fr.finish(fr.start("all_gather", "direct", 64, "torch.bfloat16"))
    fr.finish(fr.start("all_reduce", "two_shot", 1 << 20, "torch.float16"), TimeoutError("peer 3"))
    fr.start("reduce_scatter", "direct", 4096, "torch.float32")
    states = [r["state"] for r in fr.records()]
    assert states == [DONE, FAILED, RUNNING]
    text = fr.render("rank 0/4")
    assert "last 3 of 3 calls" in text and "TimeoutError: peer 3" in text
    assert "reduce_scatter" in text and "..." in text  # still running: no duration yet


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_sigusr1_dumps_every_live_communicator(tmp_path):
    script = textwrap.dedent("""
        import os, signal, torch, torch.distributed as dist, tpcomm
        from tpcomm.groups.launch import free_port
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        comm = tpcomm.Communicator()
        comm.all_reduce(torch.ones(3))
        os.kill(os.getpid(), signal.SIGUSR1)
        comm.close()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tpcomm flight recorder: rank 0/1" in proc.stderr
    assert "all_reduce" in proc.stderr and "done" in proc.stderr
