"""scripts/gpu_fused_rs_sweep.py without a GPU: the parent's guard (a worker that hangs inside a
variant loses that variant and a new worker runs the rest; the deadline stops everything) and
the table, with stand-in workers that print the worker's RESULT lines."""
import importlib.util
import json
import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "..", "..", "scripts", "gpu_fused_rs_sweep.py")


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("gpu_fused_rs_sweep", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_worker(hang=(), crash=()):
    """A command line for run_workers: per variant start, a row per M, done; sleeps forever
    inside a variant in ``hang``, exits 3 inside one in ``crash``."""
    code = (
        "import json, sys, time\n"
        "def emit(**kw): print('RESULT ' + json.dumps(kw), flush=True)\n"
        f"hang, crash = {list(hang)!r}, {list(crash)!r}\n"
        "for n in sys.argv[1].split(','):\n"
        "    emit(event='start', variant=n)\n"
        "    if n in hang: time.sleep(600)\n"
        "    if n in crash: sys.exit(3)\n"
        "    for M in (1024, 4096):\n"
        "        emit(event='row', variant=n, M=M, kind='rs', config='c', ok=True,\n"
        "             us=100.0 if n == 'torch_mm' else 110.0, graph_us=99.0,\n"
        "             bitwise_vs_unfused=True, s=0.1)\n"
        "    emit(event='done', variant=n)\n")
    return lambda todo: [sys.executable, "-c", code, ",".join(todo)]


def test_every_variant_runs_in_order(sweep):
    names = ["torch_mm", "rs_rounds", "rs_single"]
    lines, hung, left = sweep.run_workers(names, [1024, 4096], time.perf_counter() + 60,
                                          cmd=fake_worker())
    assert hung == [] and left == []
    rows = [r for r in lines if r["event"] == "row"]
    assert [(r["variant"], r["M"]) for r in rows] == [(n, M) for n in names
                                                      for M in (1024, 4096)]


def test_a_crash_loses_only_its_variant(sweep, monkeypatch):
    monkeypatch.setattr(sweep, "RESTART_MIN_S", 1)
    names = ["torch_mm", "rs_rounds", "rs_single"]
    lines, hung, left = sweep.run_workers(names, [1024], time.perf_counter() + 60,
                                          cmd=fake_worker(crash=("rs_rounds",)))
    assert hung == ["rs_rounds"] and left == []
    assert {r["variant"] for r in lines if r["event"] == "row"} == {"torch_mm", "rs_single"}


def test_the_deadline_stops_a_hung_worker(sweep, monkeypatch):
    monkeypatch.setattr(sweep, "RESTART_MIN_S", 1)
    t0 = time.perf_counter()
    lines, hung, left = sweep.run_workers(["torch_mm", "rs_rounds", "rs_single"], [1024],
                                          t0 + 3, cmd=fake_worker(hang=("rs_rounds",)))
    assert time.perf_counter() - t0 < 20          # not the worker's 600 s sleep
    assert "rs_rounds" in left and "rs_single" in left and hung == []
    assert {r["variant"] for r in lines if r["event"] == "row"} == {"torch_mm"}


def test_table_ratios_and_failures(sweep):
    rows = [dict(variant="torch_mm", M=1024, us=100.0, graph_us=98.0, config="cublas",
                 bitwise_vs_unfused=None, ok=True),
            dict(variant="rs_rounds", M=1024, us=110.0, graph_us=109.0, config="a",
                 bitwise_vs_unfused=True, ok=True),
            dict(variant="rs_single", M=1024, us=99.0, graph_us=97.5, config="b",
                 bitwise_vs_unfused=True, ok=True),
            dict(variant="core_single", M=1024, ok=False, error="wrong", config="b")]
    lines = sweep.table(rows, [1024])
    assert lines[2] == "| torch_mm | 100.0 | 98.0 | 1.000 | 0.909 | - | n/a | cublas |"
    assert lines[3] == "| rs_rounds | 110.0 | 109.0 | 1.100 | 1.000 | - | yes | a |"
    assert lines[4] == "| rs_single | 99.0 | 97.5 | 0.990 | 0.900 | - | yes | b |"
    assert lines[5].startswith("| core_single | FAILED wrong")
    rows.append(dict(variant="inductor", M=1024, us=90.0, graph_us=90.0, config="i",
                     bitwise_vs_unfused=None, ok=True))
    lines = sweep.table(rows, [1024])
    assert lines[4] == "| rs_single | 99.0 | 97.5 | 0.990 | 0.900 | 1.100 | yes | b |"
    json.dumps(rows)


def test_no_warp_specialized_variant(sweep):
    for kind, kw in sweep.VARIANTS.values():
        cfg = kw.get("config")
        assert cfg is None or cfg == "rs_single" or not cfg.get("warp_specialize"), kw
    assert set(sweep.INTERLEAVED) <= set(sweep.VARIANTS)


def test_interleave_smoke_on_the_cpu(tmp_path):
    """--interleave end to end on the CPU (Triton's interpreter, small K and N): every variant
    built and checked, then timed round-robin (each row one sample per pass), the JSON written."""
    import subprocess
    env = dict(os.environ, TRITON_INTERPRET="1", OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, PATH, "--smoke", "--interleave", "2", "--ms", "128",
                           "--variants", "torch_mm,rs_single,core_tst_split", "--limit-s", "200"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "fused_rs_sweep.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"torch_mm", "rs_single", "core_tst_split"}
    assert all(r["ok"] and len(r["samples"]) == 2 for r in rows.values())
    assert rows["rs_single"]["bitwise_vs_unfused"] is True
    assert rows["core_tst_split"]["config"].endswith("_split_tmastore")
