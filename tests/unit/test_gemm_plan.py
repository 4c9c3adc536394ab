"""The host side of the fused kernels' GEMM core (``tpcomm/kernels/_gemm.py``): the tile table,
the checks of a config, and which operand goes through TMA. No device and no kernel run (the
kernels themselves: tests/unit/fused_gemm_sim.py under Triton's interpreter)."""
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs triton (pip install --no-deps triton)")


@pytest.fixture(scope="module")
def g():
    from tpcomm.kernels import _gemm
    return _gemm


def test_m_bucket(g):
    assert [g.m_bucket(m) for m in (0, 1, 64, 65, 1000, 1024, 1025, 16384, 10**6)] == \
        [64, 64, 64, 128, 1024, 1024, 2048, 16384, 16384]


def test_pick_config_table_default_unaligned(g, monkeypatch):
    mine = g.GemmConfig(block_n=128, num_stages=5)
    monkeypatch.setitem(g.CONFIGS, (torch.bfloat16, 1024, 8192, 7168), mine)
    assert g.pick_config(torch.bfloat16, 1000, 8192, 7168) is mine      # bucket 1024
    assert g.pick_config(torch.bfloat16, 2048, 8192, 7168) is g.DEFAULTS[torch.bfloat16]
    assert g.pick_config(torch.float16, 1024, 8192, 7168) is g.DEFAULTS[torch.float16]
    assert g.pick_config(torch.bfloat16, 1024, 8192, 7168, aligned=False) is \
        g.UNALIGNED[torch.bfloat16]


def test_check_config_refuses_warp_specialization(g):
    """Triton 3.6's warp specialization hung an H200 (the 2026-12-02 sweep): refused
    everywhere, with the reason, before anything compiles."""
    for ws in (g.GemmConfig(num_warps=4, warp_specialize=True, flatten=False),
               g.GemmConfig(warp_specialize=True)):
        with pytest.raises(ValueError, match="warp_specialize=True is refused: its first launch "
                                             "hung"):
            g.check_config(ws)
        with pytest.raises(ValueError, match="hung the process"):
            g.plan(torch.empty(64, 96, dtype=torch.bfloat16),
                   torch.empty(96, 80, dtype=torch.bfloat16), ws)
    g.check_config(g.GemmConfig())
    with pytest.raises(ValueError, match="tma must be one of"):
        g.check_config(g.GemmConfig(tma="yes"))


def test_table_holds_the_measured_configs(g):
    """The 2026-12-02 sweep's winners: the plain loop at a fused round's 1024 rows and at
    16384 (4 stages), the default at 4096; no entry asks for warp specialization."""
    bf = torch.bfloat16
    assert g.pick_config(bf, 1024, 8192, 7168) == g.GemmConfig(flatten=False)
    assert g.pick_config(bf, 700, 8192, 7168) == g.GemmConfig(flatten=False)      # bucket 1024
    assert g.pick_config(bf, 4096, 8192, 7168) == g.GemmConfig()
    assert g.pick_config(bf, 16384, 8192, 7168) == g.GemmConfig(flatten=False, num_stages=4)
    assert g.pick_config(bf, 2048, 8192, 7168) == g.DEFAULTS[bf]                  # not measured
    for cfg in g.CONFIGS.values():
        g.check_config(cfg)


def _modes(g, a, b, **kw):
    p = g.plan(a, b, **kw)
    return p.modes, p.config, p.meta


def test_plan_operand_modes(g):
    H, D, P = g.HOST_DESC, g.DEVICE_DESC, g.PTR
    bf = torch.bfloat16
    a = torch.empty(64, 96, dtype=bf)
    b = torch.empty(96, 80, dtype=bf)
    modes, cfg, meta = _modes(g, a, b)
    assert modes == (H, H, False) and cfg == g.DEFAULTS[bf]
    assert meta["EVEN_K"] is False and meta["DTYPE"] is g.tl.bfloat16   # 96 % 64
    assert meta["INPUT_PRECISION"] is None
    w = torch.empty(80, 96, dtype=bf)                     # b = w.t(): K contiguous
    assert _modes(g, a, w.t())[0] == (H, H, True)
    assert _modes(g, a, w.t(), tma="device")[0] == (D, D, True)
    assert _modes(g, a, b, tma="off")[0] == (P, P, False)
    # N = 81: b's rows are 162 B apart, so b through pointers and the unaligned tile
    modes, cfg, _ = _modes(g, a, torch.empty(96, 81, dtype=bf))
    assert modes == (H, P, False) and cfg == g.UNALIGNED[bf]
    # a column slice at a 2-byte offset: pointers for a
    wide = torch.empty(64, 100, dtype=bf)
    assert _modes(g, wide[:, 1:97], b)[0][:2] == (P, H)
    # float32: "ieee" dots unless asked; overrides replace the table's fields
    a32, b32 = torch.empty(64, 96), torch.empty(96, 80)
    modes, cfg, meta = _modes(g, a32, b32, block_m=64, num_stages=2)
    assert meta["INPUT_PRECISION"] == "ieee" and (cfg.block_m, cfg.num_stages) == (64, 2)
    assert cfg.block_n == g.DEFAULTS[torch.float32].block_n
    assert _modes(g, a32, b32, input_precision="tf32")[2]["INPUT_PRECISION"] == "tf32"


def test_plan_grid_and_tiles(g):
    a = torch.empty(100, 64, dtype=torch.float16)
    b = torch.empty(64, 300, dtype=torch.float16)
    p = g.plan(a, b, g.GemmConfig(block_m=32, block_n=64, num_sms=5))
    # world 3, 37 rows per owner: 3 owners x 2 row tiles x 5 column tiles
    assert g.num_tiles(37, 300, 3, p.config) == 30
    assert p.grid(30) == (5,) and p.grid(2) == (2,) and p.grid(0) == (1,)
    assert p.meta["NUM_SMS"] == 5 and p.n == 300 and p.item == 2
