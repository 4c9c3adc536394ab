"""scripts/gpu_decode_attention.py without a GPU: its tuning points are valid launcher
keywords, the best passing point per batch is picked (failed, wrong and skipped points never),
and the TUNED literal it prints is one the kernel's table lookup takes as it is."""
import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "..", "..", "scripts", "gpu_decode_attention.py")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("gpu_decode_attention", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_points_are_valid_and_distinct(script):
    names = [script.point_name(p) for p in script.SWEEP]
    assert len(set(names)) == len(names)
    for block_n, programs, warps, stages, chunk in script.SWEEP:
        assert block_n in (16, 32, 64, 128) and programs >= 0 and warps in (2, 4, 8)
        assert stages >= 1 and chunk >= 1 and chunk & (chunk - 1) == 0


def _rows():
    ok = {"status": "ok"}
    return [{"batch": 1, "points": {"a": [128, 2, 8, 3, 1], "b": [64, 2, 4, 3, 8],
                                    "c": [32, 4, 4, 3, 8]},
             "sweep": {"a": dict(ok, us=9.5, gbps=100.0), "b": dict(ok, us=7.0, gbps=150.0),
                       "c": {"status": "WRONG (reference)"}}},
            {"batch": 8, "points": {"a": [128, 2, 8, 3, 1], "b": [64, 2, 4, 3, 8],
                                    "c": [32, 4, 4, 3, 8]},
             "sweep": {"a": dict(ok, us=16.0, gbps=2100.0),
                       "b": {"status": "skipped (time limit)"},
                       "c": dict(ok, us=12.5, gbps=2700.0)}}]


def test_best_point_per_batch_and_the_tuned_literal(script, monkeypatch):
    from tpcomm.kernels import decode_attention as da
    best = script.best_points(_rows())
    assert {b: p["name"] for b, p in best.items()} == {1: "b", 8: "c"}
    literal = script.tuned_literal(best)
    assert literal == "TUNED = ((1, (64, 2, 4, 3, 8)), (8, (32, 4, 4, 3, 8)))"
    namespace = {}
    exec(literal, namespace)
    monkeypatch.setattr(da, "TUNED", namespace["TUNED"])
    assert da.tuned_constants(1) == (64, 2, 4, 3, 8) == da.tuned_constants(7)
    assert da.tuned_constants(16) == (32, 4, 4, 3, 8)


def test_markdown_names_every_point_and_its_state(script):
    rows = [dict(r, old_us=1.0, kernel_us=2.0, kernel_2k_us=3.0, sdpa_filled_us=4.0,
                 floor_us=0.5) for r in _rows()]
    best = script.best_points(rows)
    report = {"device": "H200", "torch": "2", "context": 1024, "rows": rows,
              "points": ["a", "b", "c"], "best": best, "tuned_literal": script.tuned_literal(best)}
    md = script.markdown(report)
    assert "| b | 7.0 (150.0) | skipped (time limit) |" in md
    assert "| c | WRONG (reference) | 12.5 (2700.0) |" in md
    assert report["tuned_literal"] in md
