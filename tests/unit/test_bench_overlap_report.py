"""`tpcomm bench overlap`'s speed-ups without processes: every overlapped variant is compared
with the same engine unfused, and a run without overlap says so instead of a ratio."""
from tpcomm.bench import overlap


def _row(times, chunks_auto, chunks_forced=None, op="matmul_reduce_scatter"):
    return {"op": op, "M": 4096, "K": 7168, "N": 8192, "world": 4, "chunks_auto": chunks_auto,
            "chunks_forced": chunks_forced, "times_us": times, "na": {}, "rel_err": {},
            "ok": True}


GPU_TIMES = {"gemm": 600.0, "collective": 200.0, "unfused": 1000.0, "torch_async_tp": 800.0,
             "tpcomm_collective": 100.0, "tpcomm_unfused": 700.0, "tpcomm": 560.0,
             "tpcomm_forced": 875.0, "tpcomm_fused": 500.0}


def test_overlap_is_measured_against_the_same_engine_unfused():
    x = overlap.speedups(_row(GPU_TIMES, 4, 8), "cuda")
    # tpcomm's variants against tpcomm unfused (700), torch's against torch unfused (1000):
    # never tpcomm overlapped against NCCL / gloo unfused (1000 / 560 would read 1.79)
    assert x == {"torch_async_tp": 1000 / 800, "tpcomm": 700 / 560, "tpcomm_forced": 700 / 875,
                 "tpcomm_fused": 700 / 500}


def test_no_overlap_is_said_not_timed_as_a_ratio():
    one_chunk = overlap.speedups(_row(dict(GPU_TIMES, tpcomm=700.0), 1, 1), "cuda")
    assert one_chunk["tpcomm"] == one_chunk["tpcomm_forced"] == "no overlap (1 chunk)"
    cpu = overlap.speedups(_row(dict(GPU_TIMES, tpcomm=700.0), 1, 4), "cpu")
    assert cpu["tpcomm"] == "no overlap (1 chunk)" and cpu["tpcomm_forced"] == "no overlap (cpu)"


def test_table_names_each_baseline_engine():
    row = _row(GPU_TIMES, 4, 8)
    row["speedup"] = overlap.speedups(row, "cuda")
    head, body = overlap._table([row], "matmul_reduce_scatter", 8, "nccl")
    cells = dict(zip([h.strip() for h in head], body[0]))
    assert cells["nccl unfused (us)"] == "1000.0" and cells["x nccl unfused"] == "1.25"
    assert cells["tpcomm unfused (us)"] == "700.0" and cells["tpcomm (us)"] == "560.0"
    assert [body[0][i] for i, h in enumerate(head) if h.strip() == "x tpcomm unfused"] == [
        "1.25", "0.80", "1.40"]   # auto chunks, 8 chunks forced, the fused kernel
    row = _row(dict(GPU_TIMES, tpcomm=700.0), 1, op="matmul_all_reduce")
    row["speedup"] = overlap.speedups(row, "cpu")
    head, body = overlap._table([row], "matmul_all_reduce", None, "gloo")
    assert "no overlap (1 chunk)" in body[0] and "x gloo unfused" in head
