"""The CPU contenders of `tpcomm bench` (Open MPI / MPICH through mpi4py, DeepSpeed's shm op):
named when missing with what to install, and, where installed, timed in the same table after a
check of their result (exit 0 means no wrong element)."""
import glob
import json
import os
import subprocess
import sys

import pytest

from tpcomm.bench import contenders, contenders_cpu

pytestmark = pytest.mark.cpu
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_missing_contender_says_what_to_install(monkeypatch):
    monkeypatch.setattr(contenders_cpu.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install mpi4py"):
        contenders.resolve_contenders("tpcomm,mpi", "cpu", "all_reduce")
    with pytest.raises(ValueError, match="pip install deepspeed"):
        contenders.resolve_contenders("tpcomm,deepspeed_shm", "cpu", "all_reduce")


def test_contenders_are_cpu_all_reduce_only():
    with pytest.raises(ValueError, match="all_reduce only"):
        contenders.resolve_contenders("tpcomm,mpi_openmpi", "cpu", "all_gather")
    with pytest.raises(ValueError, match="does not run on cuda"):
        contenders.resolve_contenders("tpcomm,mpi_mpich", "cuda", "all_reduce")


def _deepspeed_built() -> bool:
    """DeepSpeed's op is built on first use (minutes on 2 cores): only time it when built."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    return bool(glob.glob(f"{root}/*/deepspeed_shm_comm/deepspeed_shm_comm.so"))


def test_installed_contenders_run_in_one_table(tmp_path):
    names = [n for n in contenders.EXTERNAL if contenders_cpu.why_unavailable(n) is None]
    if "deepspeed_shm" in names and not _deepspeed_built():
        names.remove("deepspeed_shm")
    if not names:
        pytest.skip("no CPU contender installed (pip install 'tpcomm[contenders]' and an MPI)")
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "tpcomm", "bench", "--backends",
                          ",".join(["tpcomm", *names]), "-b", "4K", "-e", "16K", "-f", "4",
                          "--iters", "5", "--warmup", "1", "--reps", "1", "--no-progress",
                          "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    for name in names:
        assert name in text, name
    doc = json.loads(text)
    assert "mpi_openmpi" not in names or "Open MPI" in json.dumps(doc)
