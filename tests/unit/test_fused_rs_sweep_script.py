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


# ---------------------------------------------------------------- --grid1k (issue 14, M = 1024)


def test_grid_variants_cover_both_ops(sweep):
    """Every GRID_1K config is a variant of both fused ops, TMA-stored, never warp-specialized,
    and its shared memory (stages of A and B boxes plus the store box) fits the H200's 227 KiB."""
    assert sweep.GRID_VARIANTS[:2] == ("torch_mm", "inductor")
    assert sweep.GRID_VARIANTS[-2:] == ("rs_single", "ag_w1")   # the noise controls
    for key, f in sweep.GRID_1K.items():
        assert sweep.VARIANTS["rs1k_" + key] == ("rs", {"config": f})
        assert sweep.VARIANTS["ag1k_" + key] == ("ag", {"config": f})
        assert f["tma_store"] and not f.get("warp_specialize")
        stage = (f["block_m"] + f["block_n"]) * f["block_k"] * 2
        box = f["block_m"] * f["block_n"] * 2 // (2 if f["epilogue_split"] else 1)
        assert f["num_stages"] * stage + box <= 227 * 1024, key
    # the plain sweep's default set stays as it was
    assert not any(v.startswith(("rs1k_", "ag1k_")) for v in sweep.INTERLEAVED)


def test_paste_entry_builds_the_config(sweep):
    """The printed SINGLE_CONFIGS entry, pasted, is the GemmConfig of the grid's fields."""
    import torch

    from tpcomm.kernels import _gemm
    for f in sweep.GRID_1K.values():
        line = sweep.paste_entry(f, 1000, 8192, 7168)
        key, _, expr = line.rstrip(",").partition(": ")
        assert key == "(torch.bfloat16, 1024, 8192, 7168)"
        assert eval(expr, {"_gemm": _gemm, "torch": torch}) == _gemm.GemmConfig(**f)


def _grid_rows(sweep, times):
    """Rows as the worker emits them: times = {variant: (us, graph_us, bitwise)}."""
    rows = []
    for v, (us, g, bw) in times.items():
        rows.append(dict(variant=v, M=1024, us=us, graph_us=g, ok=bw is not False,
                         bitwise_vs_unfused=bw, spread=0.05,
                         config=("cur" if v.endswith("128x256x64_s3w8_nofl_split") else v)))
    return rows


def test_grid_summary_picks_the_best_by_graph_ratio(sweep):
    keys = list(sweep.GRID_1K)
    cur, k1, k2 = keys[0], keys[1], keys[2]
    times = {"torch_mm": (150.0, 150.0, None), "inductor": (160.0, 200.0, None),
             "rs1k_" + cur: (190.0, 210.0, True), "ag1k_" + cur: (180.0, 205.0, True),
             # k1: fastest RS in calls, but the graph ratio ranks
             "rs1k_" + k1: (150.0, 204.0, True), "ag1k_" + k1: (181.0, 190.0, True),
             # k2: fastest RS in graph replays but wrong bits: never chosen
             "rs1k_" + k2: (170.0, 180.0, False), "ag1k_" + k2: (185.0, 198.0, True)}
    lines, best = sweep.grid_summary(_grid_rows(sweep, times), [1024],
                                     {1024: {"rs": "cur", "ag": "cur"}}, 8192, 7168)
    b = best[1024]
    assert b["rs"]["key"] == k1 and abs(b["rs"]["rank"] - 204 / 200) < 1e-9
    assert b["ag"]["key"] == k1 and abs(b["ag"]["rank"] - 190 / 200) < 1e-9
    assert b["both"] == {"key": k1, "rank": 204 / 200}
    text = "\n".join(lines)
    assert f"BEST M=1024 matmul_reduce_scatter: {k1} 1.020 x inductor (graph replays)" in text
    assert "current config 1.050" in text       # the current config's 210 / 200
    assert text.count("SINGLE_CONFIGS entry: (torch.bfloat16, 1024, 8192, 7168)") == 3
    row = next(ln for ln in lines if ln.startswith(f"| {cur} | rs |"))
    assert row.endswith("| yes |")               # marked current
    assert not any(ln.startswith("CONTROL") for ln in lines)
    times["rs_single"] = (200.0, 220.0, True)    # the noise control: the current config again
    rows = _grid_rows(sweep, times)
    rows[-1]["config"] = "cur"
    lines, _ = sweep.grid_summary(rows, [1024], {1024: {"rs": "cur", "ag": "cur"}}, 8192, 7168)
    ctl = [ln for ln in lines if ln.startswith("CONTROL")]
    assert len(ctl) == 1 and ctl[0].endswith("differs by x 1.053 (graph 1.048)")


def test_grid_summary_without_inductor_ranks_by_torch_mm(sweep):
    key = next(iter(sweep.GRID_1K))
    times = {"torch_mm": (100.0, 100.0, None), "rs1k_" + key: (120.0, 110.0, True)}
    lines, best = sweep.grid_summary(_grid_rows(sweep, times), [1024], {}, 8192, 7168)
    assert abs(best[1024]["rs"]["rank"] - 1.1) < 1e-9 and "ag" not in best[1024]
    assert any("1.100 x torch.mm (graph replays)" in ln for ln in lines)


def test_interleaved_budget_skips_builds_and_passes(sweep, monkeypatch, capsys):
    """With ``until`` close, the worker builds what fits, skips the rest with a "budget" row,
    and stops its passes early instead of being killed with nothing reported."""
    import faulthandler

    import torch
    monkeypatch.setattr(sweep, "TIMING_RESERVE_S", 1.0)
    # the worker's hang guard needs a real stderr (capsys has none): not under test here
    monkeypatch.setattr(faulthandler, "dump_traceback_later", lambda *a, **k: None)

    class Eng:
        def check(self, sync=False):
            pass
    z = torch.zeros(2, 2)

    def build(kind, kw, M):
        time.sleep(0.4)
        return (lambda: time.sleep(0.05)), z.clone(), None, kind

    def one_call(fn):
        fn()
        return 1.0
    t0 = time.time()
    sweep.interleaved(["torch_mm", "rs_single", "ag_w1", "core_single"], [128], 500, build,
                      None, Eng(), {128: z}, {128: z}, True, one_call, until=t0 + 1.8)
    rows = [json.loads(ln[len("RESULT "):]) for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("RESULT ")]
    rows = [r for r in rows if r["event"] == "row"]
    built = [r for r in rows if "samples" in r]
    skipped = [r for r in rows if str(r.get("error", "")).startswith("budget")]
    assert built and skipped and len(built) + len(skipped) == 4
    assert built[0]["variant"] == "torch_mm" and skipped[-1]["variant"] == "core_single"
    assert all(1 <= r["rounds"] < 500 and len(r["samples"]) == r["rounds"] for r in built)
    assert time.time() - t0 < 8


def test_grid1k_smoke_on_the_cpu(tmp_path):
    """--grid1k end to end on the CPU (interpreter, small K and N, two configs of both ops):
    bitwise against the unfused path, the best entries written and printed."""
    import subprocess
    keys = ["128x256x64_s3w8_nofl_split", "128x128x64_s4w8_nofl_split"]
    variants = ["torch_mm"] + [p + k for k in keys for p in ("rs1k_", "ag1k_")]
    env = dict(os.environ, TRITON_INTERPRET="1", OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, PATH, "--smoke", "--grid1k", "--interleave", "2",
                           "--ms", "128", "--variants", ",".join(variants), "--budget-s", "200"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "fused_1k_sweep.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == set(variants)
    assert all(rows[v]["ok"] and rows[v]["bitwise_vs_unfused"] is True for v in variants[1:])
    best = res["best"]["128"]
    assert {best["rs"]["key"], best["ag"]["key"], best["both"]["key"]} <= set(keys)
    assert "SINGLE_CONFIGS entry: (torch.bfloat16, 128, 512, 128): _gemm.GemmConfig(" \
        in proc.stdout
    assert (tmp_path / "fused_1k_sweep.md").read_text().count("BEST M=128") == 3


def test_classify_separates_budget_unfit_and_wrong(sweep):
    rows = [dict(variant="a", M=1, ok=True, us=1.0),
            dict(variant="b", M=1, ok=False, error="budget: not built (no time left)"),
            dict(variant="c", M=1, ok=False, error="OutOfResources: out of resource: shared"),
            dict(variant="d", M=1, ok=False, bitwise_vs_unfused=False),
            dict(variant="e", M=1, ok=False, error="RuntimeError: boom")]
    kept, skipped, unfit, wrong = sweep.classify(rows)
    assert [r["variant"] for r in kept] == ["a", "c", "d", "e"]
    assert skipped == ["b M=1"] and unfit == ["c M=1"]
    assert wrong == ["d M=1: wrong", "e M=1: RuntimeError: boom"]
