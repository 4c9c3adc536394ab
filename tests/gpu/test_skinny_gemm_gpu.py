"""The skinny GEMM (tpcomm/kernels/skinny_gemm.py) on one GPU, bfloat16 (the dot path the
interpreter cannot check): against F.linear on Llama-like shapes and odd ones, the folded
split-K deterministic over many runs (arrival order varies on a GPU) and equal to the split-K
sum as a second kernel, counters back to 0 after CUDA-graph replays, and the registered op
under torch.compile. Skipped, visibly, without CUDA."""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [  # M, N_out, K, (block_n, block_k, split_k, warps, stages, use_dot), swiglu
    (1, 4096, 4096, (64, 256, 4, 4, 3, True), False),
    (8, 4096, 14336, (64, 256, 8, 4, 3, True), False),
    (1, 6144, 4096, (32, 256, 2, 4, 4, False), False),
    (16, 1000, 3000, (64, 128, 3, 4, 3, True), False),
    (3, 777, 1000, (32, 256, 2, 4, 3, True), True),
    # the sum path with SwiGLU: two accumulators of block_n x block_k float32 within the
    # kernel's register budget (check_config; 64 x 256 failed it on the H200, 2026-12-03)
    (1, 2048, 4096, (32, 256, 2, 4, 3, False), True),
]


def test_cases_are_runnable_configs():
    """Every case above passes the kernel's own config check (runs without a GPU)."""
    from tpcomm.kernels.skinny_gemm import SkinnyConfig, check_config
    for M, _, _, cfg, swiglu in CASES:
        check_config(SkinnyConfig(*cfg), M, swiglu)


def _rel(got, ref):
    return float((got.float() - ref).abs().max() / ref.abs().max())


@needs_cuda
@pytest.mark.parametrize("M, N, K, cfg, swiglu", CASES)
def test_skinny_gemm_matches_linear_and_is_deterministic(M, N, K, cfg, swiglu):
    from tpcomm.kernels.skinny_gemm import SkinnyConfig, counters_for, skinny_gemm
    cfg = SkinnyConfig(*cfg)
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(M, K, device="cuda", dtype=dt, generator=g)
    w = torch.randn(N * (2 if swiglu else 1), K, device="cuda", dtype=dt, generator=g) / K ** .5
    y = F.linear(x, w)
    ref = (x.float() @ w.float().t())
    if swiglu:
        ref = F.silu(ref[:, :N].to(dt).float()) * ref[:, N:].to(dt).float()
        y = F.silu(y[:, :N].float()) * y[:, N:].float()
    counters = counters_for(N, "cuda")
    outs = [skinny_gemm(x, w, torch.empty(M, N, device="cuda", dtype=dt), cfg, swiglu=swiglu,
                        counters=counters) for _ in range(20)]
    two = skinny_gemm(x, w, torch.empty(M, N, device="cuda", dtype=dt), cfg, swiglu=swiglu,
                      fold=False)
    assert not counters.any()
    assert all(torch.equal(o, outs[0]) for o in outs[1:]), "folded split-K differs run to run"
    assert torch.equal(two, outs[0]), "folded != the split-K sum as a second kernel"
    assert _rel(outs[0], ref) <= max(1e-2, 2 * _rel(y, ref)), (_rel(outs[0], ref), _rel(y, ref))


@needs_cuda
def test_skinny_gemm_in_a_cuda_graph_leaves_counters_zero():
    from tpcomm.kernels.skinny_gemm import SkinnyConfig, counters_for, skinny_gemm
    cfg = SkinnyConfig(64, 256, 4, 4, 3, True)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    out = torch.empty(8, 4096, device="cuda", dtype=torch.bfloat16)
    counters = counters_for(4096, "cuda")
    skinny_gemm(x, w, out, cfg, counters=counters)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(3):
            skinny_gemm(x, w, out, cfg, counters=counters)
    for _ in range(5):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert not counters.any()
        want = skinny_gemm(x, w, torch.empty_like(out), cfg, counters=counters)
        assert torch.equal(out, want)


@needs_cuda
def test_registered_op_compiles_without_a_graph_break(monkeypatch):
    """The model's routing with a table entry: torch.compile(fullgraph=True) runs the kernel
    through torch.ops.tpcomm.skinny_linear, with the eager bits, counters left zero."""
    from tpcomm.models import skinny_linear as sl
    monkeypatch.setattr(sl, "TUNED", {(2048, 1024, ""): ((16, (64, 128, 4, 4, 3, True)),),
                                      (4096, 1024, "swiglu"): ((16, (32, 128, 2, 4, 3, True)),)})
    x = torch.randn(2, 1, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16) / 32
    wg = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16) / 32
    c, cg = sl.counters_for(2048, "cuda"), sl.counters_for(4096, "cuda")

    def fn(x):
        return sl.maybe_linear(x, w, c), sl.maybe_linear(x, wg, cg, swiglu=True)

    eager = fn(x)
    compiled = torch.compile(fn, fullgraph=True)(x)
    assert eager[0].shape == (2, 1, 2048) and eager[1].shape == (2, 1, 2048)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert not c.any() and not cg.any()
    assert _rel(eager[0], x.float() @ w.float().t()) <= 1e-2
