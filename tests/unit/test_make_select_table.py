"""scripts/make_select_table.py: the graph column from gpu_timing.py rows, the eager column from
eager `tpcomm bench --json` runs with the algorithm forced; the written module is exercised."""
import importlib.util
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_select_table", os.path.join(ROOT, "scripts", "make_select_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _timing(world):   # graph: one_shot wins at 4K and 64K, NCCL at 1M
    return {"world": world, "device": "H200", "rows": [
        {"bytes": 4096, "mode": "graph", "one_shot_push": 4.0, "two_shot": 6.0, "nccl": 12.0},
        {"bytes": 65536, "mode": "graph", "one_shot_push": 5.0, "two_shot": 6.0, "nccl": 13.0},
        {"bytes": 1 << 20, "mode": "graph", "one_shot_push": 30.0, "two_shot": 29.0,
         "nccl": 20.0}]}


def _bench(world, algo, times, nccl):
    rows = []
    for nbytes, t in times.items():
        rows.append({"backend": "tpcomm", "op": "all_reduce", "nbytes": nbytes, "mode": "eager",
                     "algo": algo, "time_us": t, "wrong": 0})
        rows.append({"backend": "nccl", "op": "all_reduce", "nbytes": nbytes, "mode": "eager",
                     "algo": "-", "time_us": nccl[nbytes], "wrong": 0})
    return {"meta": {"op": "all_reduce", "world_size": world, "date": "2026-12-03T10:00",
                     "command": f"tpcomm bench --algorithm {algo}"}, "rows": rows}


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


def _load(path):
    spec = importlib.util.spec_from_file_location("written_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eager_runs_fill_the_eager_column(tmp_path):
    nccl = {4096: 30.0, 65536: 32.0, 1 << 20: 40.0}
    eager = [_write(tmp_path, "one.json", _bench(4, "one_shot", {4096: 20.0, 65536: 33.0,
                                                                   1 << 20: 60.0}, nccl)),
             _write(tmp_path, "two.json", _bench(4, "two_shot", {4096: 25.0, 65536: 24.0,
                                                                   1 << 20: 39.5}, nccl))]
    out = tmp_path / "table.py"
    _script().main([_write(tmp_path, "t4.json", _timing(4)), "--eager", *eager, "-o", str(out)])
    table = _load(str(out))
    sel = table.select_cuda
    # graph column as before; eager: one_shot at 4K, two_shot at 64K, NCCL at 1M (39.5 is
    # not under 0.97 x 40)
    assert sel("all_reduce", 4096, torch.bfloat16, 4, graph=True) == "one_shot"
    assert sel("all_reduce", 4096, torch.bfloat16, 4, graph=False) == "one_shot"
    assert sel("all_reduce", 60000, torch.bfloat16, 4, graph=True) == "one_shot"
    assert sel("all_reduce", 60000, torch.bfloat16, 4, graph=False) == "two_shot"
    assert sel("all_reduce", 1 << 20, torch.bfloat16, 4, graph=False) == "torch"
    assert sel("all_reduce", 1 << 20, torch.bfloat16, 4, graph=True) == "torch"
    assert "eager 64 KiB: two_shot 24.0, one_shot 33.0, nccl 32.0 us" in out.read_text()


def test_without_eager_runs_the_eager_column_stays_unmeasured(tmp_path):
    out = tmp_path / "table.py"
    _script().main([_write(tmp_path, "t2.json", _timing(2)), "-o", str(out)])
    table = _load(str(out))
    assert all(eager is None for _, _, eager in table.ALL_REDUCE[2])
    assert table.select_cuda("all_reduce", 4096, torch.bfloat16, 2, graph=True) == "one_shot"


def test_default_output_is_the_selection_package():
    src = open(os.path.join(ROOT, "scripts", "make_select_table.py")).read()
    assert '"tpcomm", "selection",' in src and os.path.exists(
        os.path.join(ROOT, "tpcomm", "selection", "select_table.py"))
