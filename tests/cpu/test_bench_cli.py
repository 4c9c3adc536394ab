"""`python -m tpcomm bench` end to end on 2 CPU ranks (a few seconds per run)."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest

pytestmark = pytest.mark.cpu
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK",
                 "LOCAL_WORLD_SIZE")


def _env():
    return {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}


def _bench(args, tmp_path, launcher=(sys.executable, "-m", "tpcomm")):
    """Run the bench in its own session, so that a hang kills every process it started."""
    out = tmp_path / "run.json"
    proc = subprocess.Popen([*launcher, "bench", *args, "--json", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    doc = json.loads(out.read_text()) if out.exists() else None
    return types.SimpleNamespace(returncode=proc.returncode, stdout=stdout, stderr=stderr), doc


def test_sweep_tpcomm_against_gloo(tmp_path):
    extra = ["--markdown", str(tmp_path / "run.md")]
    if importlib.util.find_spec("matplotlib"):
        extra += ["--plot", str(tmp_path / "run.png")]
    proc, doc = _bench(["--backends", "tpcomm,gloo", "-n", "2", "-b", "4", "-e", "64K", "-f", "4",
                        "--iters", "5", *extra], tmp_path)
    assert proc.returncode == 0, proc.stderr
    sizes = [4 << (2 * k) for k in range(8)]
    assert doc["backends"] == ["tpcomm", "gloo"] and doc["wrong"] == 0
    for backend in ("tpcomm", "gloo"):
        rows = [r for r in doc["rows"] if r["backend"] == backend]
        assert [r["nbytes"] for r in rows] == sizes
        assert all(r["wrong"] == 0 and r["time_us"] > 0 for r in rows)
    tpcomm_rows = [r for r in doc["rows"] if r["backend"] == "tpcomm"]
    assert {r["algo"] for r in tpcomm_rows} <= {"one_shot", "two_shot"}
    assert all("gloo" in r["speedup"] for r in tpcomm_rows)
    meta = doc["meta"]
    assert meta["world_size"] == 2 and meta["command"].startswith("tpcomm bench --backends")
    assert meta["backends"]["tpcomm"].startswith("tpcomm.Communicator, engine 'shm'")
    for text in ("# tpcomm", "x gloo", "#wrong", "# summary"):
        assert text in proc.stdout
    assert "| size | tpcomm (us) | gloo (us) | x gloo |" in (tmp_path / "run.md").read_text()
    if "--plot" in extra:
        assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_wrong_result_fails_the_run(tmp_path):
    # _broken: a test-only backend, gloo with one element of rank 0's result off by one
    proc, doc = _bench(["--backends", "tpcomm,_broken", "-n", "2", "-b", "4K", "-e", "16K",
                        "--iters", "2", "--reps", "1", "--warmup", "0"], tmp_path)
    assert proc.returncode == 1
    assert "wrong element(s): _broken at 16K, _broken at 4K, _broken at 8K" in proc.stderr
    assert {(r["backend"], r["wrong"]) for r in doc["rows"]} == {("tpcomm", 0), ("_broken", 1)}


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_under_torchrun(tmp_path):
    proc, doc = _bench(["--backends", "tpcomm,gloo", "--op", "reduce_scatter", "-b", "8K",
                        "-e", "8K", "--iters", "2", "--reps", "1"], tmp_path,
                       launcher=("torchrun", "--standalone", "--nproc-per-node", "2", "-m", "tpcomm"))
    assert proc.returncode == 0, proc.stderr
    assert doc["meta"]["world_size"] == 2 and doc["wrong"] == 0
    assert proc.stdout.count("# summary") == 1   # rank 0 reports, the others stay quiet


def test_all_reduce_add_rms_norm_rows(tmp_path):
    """The fused sublayer end as its own rows: whole [size / H, H] rows, x checked as the
    all-reduce it contains, and a wrong backend still caught."""
    proc, doc = _bench(["--op", "all_reduce_add_rms_norm", "--hidden", "256", "-n", "2",
                        "-b", "1K", "-e", "16K", "-f", "4", "--iters", "3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert doc["meta"]["op"] == "all_reduce_add_rms_norm" and doc["meta"]["hidden"] == 256
    # float32 rows of 256 elements are 1 KiB: 1K, 4K, 16K
    assert sorted({r["nbytes"] for r in doc["rows"]}) == [1024, 4096, 16384]
    assert doc["wrong"] == 0 and {r["backend"] for r in doc["rows"]} == {"tpcomm", "gloo"}
    proc, doc = _bench(["--op", "all_reduce_add_rms_norm", "--hidden", "256", "-n", "2",
                        "--backends", "tpcomm,_broken", "-b", "1K", "-e", "1K"], tmp_path)
    assert proc.returncode == 1 and doc["wrong"] > 0


def _multicast_env(rank, world):
    return {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                           "NVSHMEM_DISABLE_NVLS")}


def test_every_spawned_rank_has_multicast_off(monkeypatch):
    """The one place that sets the no-multicast environment (groups/launch.py): every rank that
    spawn starts has it, whatever the caller passed, and it stays what the rules ask for."""
    from tpcomm.groups.launch import NO_MULTICAST_ENV, spawn
    for k in NO_MULTICAST_ENV:
        monkeypatch.delenv(k, raising=False)
    got = spawn(_multicast_env, 2, timeout_s=120)
    assert got == [{"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}] * 2
