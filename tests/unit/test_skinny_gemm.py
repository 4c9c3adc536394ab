"""The skinny GEMM (decode GEMV) kernel: the interpreted checks (skinny_gemm_sim.py) and the
host side (configs, the tuned table's lookup)."""
import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="needs triton (pip install --no-deps triton) to interpret the kernels")
@pytest.mark.parametrize("script", ["skinny_gemm_sim.py", "skinny_sweep_sim.py"])
def test_skinny_gemm_under_the_triton_interpreter(script):
    """skinny_gemm_sim.py: the kernel and the model's use of it; skinny_sweep_sim.py: the GPU
    sweep's steps on tiny shapes (everything but the CUDA graph)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, os.path.join(HERE, script)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "ALL OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]


def _sweep_script():
    import importlib.util as u
    spec = u.spec_from_file_location("gpu_skinny_gemm",
                                     os.path.join(HERE, "..", "..", "scripts", "gpu_skinny_gemm.py"))
    mod = u.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_sweep_candidates_fill_the_sms_and_stay_small():
    g = _sweep_script()
    from tpcomm.kernels.skinny_gemm import check_config
    for name, (N, K, swiglu) in g.SHAPES.items():
        n_out = N // 2 if swiglu else N
        for M in (1, 8):
            cands = g.candidates(n_out, K, M, 132, swiglu)
            assert 7 <= len(cands) <= 20, (name, M, len(cands))
            assert len(set(cands)) == len(cands)
            for c in cands:
                programs = -(-n_out // c.block_n) * c.split_k
                assert programs >= 132, (name, M, c)
                assert K // c.split_k >= c.block_k
                assert c.use_dot or M == 1
                check_config(c, M, swiglu)      # registers, blocks
                assert g.smem_bytes(c.block_n, c.block_k, c.num_stages, swiglu) <= g.SMEM_BYTES
    # what Triton asked for in the first sweep's two configs that did not fit
    assert g.smem_bytes(128, 256, 3, True) == 417792 and g.smem_bytes(64, 512, 2, True) == 294912


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_sweep_winners_literal_keeps_only_winners():
    g = _sweep_script()
    res = [{"N": 4096, "K": 4096, "swiglu": False, "M": 8,
            "best": {"cfg": [64, 256, 4, 4, 3, 1], "speedup": 1.2}},
           {"N": 4096, "K": 4096, "swiglu": False, "M": 1,
            "best": {"cfg": [64, 256, 4, 4, 3, 1], "speedup": 1.01}},    # below the margin
           {"N": 4096, "K": 14336, "swiglu": False, "M": 1,
            "best": {"cfg": [64, 256, 4, 4, 3, 1], "speedup": 0.95}},
           {"N": 28672, "K": 4096, "swiglu": True, "M": 1,
            "best": {"cfg": [32, 256, 1, 4, 3, 0], "speedup": 1.1}}]
    ns: dict = {}
    exec(g.winners_literal(res), ns)
    assert ns["TUNED"] == {
        (4096, 4096, ""): ((1, None), (8, (64, 256, 4, 4, 3, True))),
        (28672, 4096, "swiglu"): ((1, (32, 256, 1, 4, 3, False)),)}


def test_sweep_script_skips_without_cuda(tmp_path):
    pytest.importorskip("triton")
    import torch
    if torch.cuda.is_available():
        pytest.skip("has CUDA: the GPU run is the lead's step")
    p = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "scripts",
                                                     "gpu_skinny_gemm.py"), "--budget-s", "5"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OUT=str(tmp_path)))
    assert p.returncode == 0 and "SKIP: no CUDA device" in p.stdout, p.stdout + p.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_routing_constants_match_the_kernel():
    from tpcomm.kernels import skinny_gemm as kernel
    from tpcomm.models import skinny_linear
    assert skinny_linear.MAX_ROWS == kernel.MAX_M
    assert skinny_linear.COUNTER_BLOCK == kernel.MIN_BLOCK_N
    # a linear's counters cover every config, its SwiGLU form included
    assert skinny_linear.counters_for(100, "cpu").numel() == -(-100 // kernel.MIN_BLOCK_N)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_tuned_entries_are_valid_configs():
    """Every entry: int keys, an epilogue the model uses, bounds increasing within 1..16, and
    configs the kernel takes for every M they serve."""
    from tpcomm.kernels.skinny_gemm import SkinnyConfig, check_config
    from tpcomm.models import skinny_linear as sl
    for (n, k, epilogue), entries in sl.TUNED.items():
        assert isinstance(n, int) and isinstance(k, int) and epilogue in ("", "swiglu")
        bounds = [m for m, _ in entries]
        assert bounds == sorted(set(bounds)) and 1 <= bounds[0] and bounds[-1] <= sl.MAX_ROWS
        lo = 1
        for m_max, cfg in entries:
            if cfg is not None:
                assert len(cfg) == 6, cfg
                for m in range(lo, m_max + 1):
                    check_config(SkinnyConfig.from_list(cfg), m, epilogue == "swiglu")
            lo = m_max + 1


def test_lookup_takes_the_first_bound(monkeypatch):
    import torch

    from tpcomm.models import skinny_linear as sl
    a, b = object(), object()
    monkeypatch.setattr(sl, "TUNED", {(64, 32, ""): ((1, a), (8, None), (16, b))})
    assert sl.lookup(64, 32, 1) is a
    assert sl.lookup(64, 32, 5) is None and sl.lookup(64, 32, 8) is None
    assert sl.lookup(64, 32, 9) is b and sl.lookup(64, 32, 17) is None
    assert sl.lookup(64, 32, 1, "swiglu") is None and sl.lookup(32, 64, 1) is None
    # routing: CPU tensors outside the interpreter, fp32, too many rows, no counters -> None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = torch.ones(1, 32, dtype=torch.float16), torch.ones(64, 32, dtype=torch.float16)
    c = sl.counters_for(64, "cpu")
    assert sl.maybe_linear(x, w, c) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sl._config(x, w, "") is a
    assert sl._config(x.float(), w.float(), "") is None
    assert sl._config(torch.ones(17, 32, dtype=torch.float16), w, "") is None
    assert sl._config(x, w.t().contiguous().t(), "") is None      # weight not row-major
    assert sl.maybe_linear(x, w, None) is None


def test_switch_off_makes_layers_without_counters(monkeypatch):
    """TPCOMM_SKINNY_GEMM=0: a layer made then has no counters, so it never takes the kernel."""
    from tpcomm.models.layers import ColumnParallelLinear, RowParallelLinear
    from tpcomm.settings import reload_settings
    try:
        monkeypatch.setenv("TPCOMM_SKINNY_GEMM", "0")
        reload_settings()
        off = [ColumnParallelLinear(32, 64, rank=0, world=1),
               RowParallelLinear(32, 64, None, rank=0, world=1)]
        assert all(layer.skinny_counters is None for layer in off)
        monkeypatch.delenv("TPCOMM_SKINNY_GEMM")
        reload_settings()
        on = ColumnParallelLinear(32, 64, rank=0, world=1)
        assert on.skinny_counters is not None and not on.skinny_counters.any()
    finally:
        monkeypatch.delenv("TPCOMM_SKINNY_GEMM", raising=False)
        reload_settings()
