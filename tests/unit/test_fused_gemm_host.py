"""The host side of the fused GEMM + collective ops (``tpcomm/cuda/fused_gemm.py``): which tile
config each op's GEMM runs, the pad's flag area, the refusals, the world-1 table's arithmetic.
No kernel runs here (the kernels: tests/unit/fused_ops_sim.py under Triton's interpreter)."""
import dataclasses
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs triton (pip install --no-deps triton)")


@pytest.fixture(scope="module")
def eng1():
    from tpcomm.cuda.emulated import make_emulated_group
    backs, _ = make_emulated_group(1, 32 << 20, 132)   # the Communicator's default buffer
    return backs[0]


def test_gemm_config_per_op_follows_the_table(eng1):
    """At world 1 the fused reduce-scatter (and all-reduce) runs one launch over all rows
    (schedule "auto" = "single"): a measured SINGLE_CONFIGS entry, else the table's config for M
    with half-tile TMA stores and without flattening (a config or a field given is kept); with
    schedule "rounds" its
    rounds are 1024 rows at N = 8192 in bf16 and take the 1024-row config at every M; all on
    the push grid."""
    from tpcomm.cuda import fused_gemm
    from tpcomm.kernels import _gemm
    bf = torch.bfloat16
    b = torch.empty(7168, 8192, dtype=bf)
    for M in (1024, 4096, 16384):
        a = torch.empty(M, 7168, dtype=bf)
        want = _gemm.pick_config(bf, M, 8192, 7168)
        single = fused_gemm.SINGLE_CONFIGS.get((bf, M, 8192, 7168))
        single = dataclasses.replace(
            single or dataclasses.replace(want, **fused_gemm.SINGLE_DEFAULT), num_sms=132)
        assert single.tma_store
        for op in ("matmul_reduce_scatter", "matmul_all_reduce"):
            for sched in ({}, {"schedule": "auto"}, {"schedule": "single"}):
                cfg = fused_gemm.gemm_config(eng1, op, a, b, **sched)
                assert cfg == single, (op, M, sched, cfg)
            if M != 16384:
                flat = fused_gemm.gemm_config(eng1, op, a, b, flatten=True)
                assert flat == dataclasses.replace(single, flatten=True)
            given = _gemm.GemmConfig(num_stages=4)
            assert fused_gemm.gemm_config(eng1, op, a, b, config=given) == \
                dataclasses.replace(given, num_sms=132)
            cfg = fused_gemm.gemm_config(eng1, op, a, b, schedule="rounds")
            assert cfg == _gemm.GemmConfig(flatten=False, num_sms=132), (op, M, cfg)
        ag = fused_gemm.gemm_config(eng1, "all_gather_matmul", a, b)
        assert ag == single, (M, ag)   # world 1: one launch, the reduce-scatter's config
    # the table differs between the schedules at M = 16384 (4 stages) and 4096 (flattened)
    assert _gemm.pick_config(bf, 16384, 8192, 7168).num_stages == 4
    assert _gemm.pick_config(bf, 4096, 8192, 7168).flatten is True
    # overrides reach the plan; the grid stays the push family's
    a = torch.empty(4096, 7168, dtype=bf)
    cfg = fused_gemm.gemm_config(eng1, "matmul_reduce_scatter", a, b, block_n=128, num_sms=7)
    assert cfg.block_n == 128 and cfg.num_sms == 132


def test_schedule_refusals():
    """"single" runs at world 1 only (beyond it the rounds must fit the push slot); an
    unknown schedule names the choices; at world 1 "single" takes rows wider than a slot."""
    from tpcomm.cuda import fused_gemm
    from tpcomm.cuda.emulated import make_emulated_group
    backs, _ = make_emulated_group(2, 4096, 2)
    a, b = torch.ones(4, 3), torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"schedule='single' runs at world 1 only"):
        backs[0].matmul_reduce_scatter(a, b, torch.empty(2, 4), schedule="single")
    with pytest.raises(ValueError, match=r"schedule='single' runs at world 1 only"):
        backs[0].matmul_all_reduce(a, b, torch.empty(4, 4), schedule="single")
    with pytest.raises(ValueError, match=r"schedule must be one of \('auto', 'rounds', "
                                         r"'single'\), got 'wave'"):
        backs[0].matmul_reduce_scatter(a, b, torch.empty(2, 4), schedule="wave")
    one, _ = make_emulated_group(1, 4096, 2)   # slots of 2048 float32 elements
    wide = torch.empty(3000, 3), torch.empty(3, 3000)   # planned, not run (no kernel here)
    assert fused_gemm.gemm_config(one[0], "matmul_reduce_scatter", *wide).block_m > 0
    with pytest.raises(ValueError, match=r"a row of 3000 elements does not fit the push slot"):
        one[0].matmul_reduce_scatter(torch.ones(4, 3), torch.ones(3, 3000),
                                     torch.empty(4, 3000), schedule="rounds")


def test_pad_holds_the_all_gather_flags():
    """flags[src][row tile] after the barrier slot, world x MAX_T int64 words; then the call
    counters of the call check, one per block; the call headers after the push regions."""
    from tpcomm.cuda.p2p_collectives import MAX_GRID, Layout
    from tpcomm.kernels.all_gather_matmul_fused import MAX_T
    for world in (1, 2, 4, 8):
        L = Layout.make(world, 32 << 20, 132)
        assert L.fused_flags_word == L.flags_word + (L.barrier_slot + 1) * L.rp
        assert L.call_word == L.fused_flags_word + world * MAX_T
        assert L.pad_bytes == 8 * (L.call_word + MAX_GRID)
        assert L.hdr_off == 2 * L.push_buf
        assert L.stage_off >= L.hdr_off + 2 * MAX_GRID * world * 8


def test_refusals_name_the_op_and_the_limit():
    from tpcomm.cuda.emulated import make_emulated_group
    backs, _ = make_emulated_group(2, 4096, 2)
    e = backs[0]
    with pytest.raises(ValueError, match=r"all_gather_matmul: a row of 2000 elements does not "
                                         r"fit the push slot of 1024"):
        e.all_gather_matmul(torch.ones(3, 2000), torch.ones(2000, 4), torch.empty(6, 4))
    with pytest.raises(ValueError, match=r"matmul_reduce_scatter: a row of 2000 elements does "
                                         r"not fit the push slot of 1024"):
        e.matmul_reduce_scatter(torch.ones(4, 3), torch.ones(3, 2000), torch.empty(2, 2000))
    with pytest.raises(ValueError, match=r"matmul_reduce_scatter: M = 5 rows do not split"):
        e.matmul_reduce_scatter(torch.ones(5, 3), torch.ones(3, 4), torch.empty(2, 4))
    with pytest.raises(ValueError, match=r"needs a contiguous out of shape \(6, 4\)"):
        e.all_gather_matmul(torch.ones(3, 8), torch.ones(8, 4), torch.empty(3, 4))
    with pytest.raises(ValueError, match=r"matmul_all_reduce needs one dtype"):
        e.matmul_all_reduce(torch.ones(4, 3), torch.ones(3, 4),
                            torch.empty(4, 4, dtype=torch.bfloat16))


def test_world1_table_ratios():
    from tpcomm.bench.fused_gemm import table_lines
    res = {"torch_mm_us": {1024: 170.0}, "torch_mm_graph_us": {"1024": 160.0},
           "inductor": {1024: {"us": 182.0, "graph_us": 164.0},
                        4096: {"skipped": "past the deadline"}},
           "rows": [{"op": "matmul_reduce_scatter", "M": 1024, "K": 7168, "N": 8192,
                     "fused_us": 175.0, "core_us": 166.0, "fused_graph_us": 162.0,
                     "config": "c", "ok": True},
                    {"op": "all_gather_matmul", "M": 1024, "K": 7168, "N": 8192,
                     "config": "c", "ok": False}]}
    lines = table_lines(res)
    assert lines[2] == ("| matmul_reduce_scatter | 1024 | 7168 | 8192 | 170.0 | 182.0 | 166.0 | "
                        "175.0 | 1.054 | 0.962 | 1.029 | 160.0 | 164.0 | 162.0 | 0.988 | "
                        "1.012 | c |")
    assert "| WRONG |" in lines[3] and lines[-1].startswith("- inductor M=4096: {'skipped'")


def test_world1_launches_per_schedule(eng1, monkeypatch):
    """At world 1 "single" (the default) is one launch over all rows with its config for M
    (at 16384 the measured 3-stage, flattened, TMA-store one); "rounds" is a launch per 1024
    rows (a push slot of N = 8192 bf16 elements) with the 1024-row config. The launcher is
    recorded, not run."""
    from tpcomm.cuda import fused_gemm
    launches = []

    def record(p, out, out_row, lo, rows, m, *args, **kw):
        launches.append((out_row, lo, rows, m, p.config.num_stages, p.config.flatten))
    monkeypatch.setattr(fused_gemm.k_rs, "matmul_reduce_scatter", record)
    bf = torch.bfloat16
    a, b = torch.empty(16384, 7168, dtype=bf), torch.empty(7168, 8192, dtype=bf)
    out = torch.empty(16384, 8192, dtype=bf)
    for kw in ({}, {"schedule": "auto"}, {"schedule": "single"}):
        launches.clear()
        eng1.matmul_reduce_scatter(a, b, out, **kw)
        assert launches == [(0, 0, 16384, 16384, 3, True)], (kw, launches)
    launches.clear()
    eng1.matmul_reduce_scatter(a, b, out, schedule="rounds")
    assert launches == [(lo, lo, 1024, 16384, 3, False) for lo in range(0, 16384, 1024)]
    launches.clear()
    eng1.matmul_all_reduce(a[:4096], b, out[:4096])
    assert launches == [(0, 0, 4096, 4096, 3, False)]
