"""Progress on a terminal for the commands that run longer than a few seconds, seen through a
pseudo-terminal as a user would (the bar is drawn only when stderr is a terminal)."""
import os
import pty
import select
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.cpu
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK",
                 "LOCAL_WORLD_SIZE")


def _stderr_on_a_tty(argv, timeout_s=180):
    """Run ``python -m argv`` with stderr on a pseudo-terminal: (exit code, what it drew)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.DEVNULL,
                            stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    drawn, deadline = b"", time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:   # the other side closed: every rank has exited
                    break
                if not chunk:
                    break
                drawn += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        os.close(master)
    return code, drawn.decode(errors="replace")


@pytest.mark.parametrize("argv,steps", [
    (["tpcomm.bench.two_level", "--device", "cpu", "-b", "4K", "-e", "16K", "--iters", "1",
      "--reps", "1", "--warmup", "0"], ["  0/4 4K two_level", "  1/4 4K flat", "  3/4 16K flat"]),
    (["tpcomm", "plan", "--measured", "--sizes", "1M"],
     ["  0/3 fitting: baseline rows", "  2/3 fitting: cross-check"]),
])
def test_long_commands_draw_progress_on_a_terminal(argv, steps):
    code, drawn = _stderr_on_a_tty(argv)
    assert code == 0, drawn
    for step in steps:
        assert step in drawn, drawn
    assert drawn.endswith("\r")   # the bar erases itself at the end
