"""torch.compile on the GPU: the decode attention kernel, the compiled TP model at world 1
(inductor, then one CUDA graph), and the registered ops compiled over 2 GPUs. Skipped, visibly,
without the GPUs they need (graphs with emulated ranks: test_graph_safety_gpu.py)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs 1 CUDA GPU, found 0")
needs_2_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason=f"needs 2 CUDA GPUs, found "
           f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
       "NVSHMEM_DISABLE_NVLS": "1", "PYTHONUNBUFFERED": "1"}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])   # float16: the CPU test
def test_decode_attention_kernel_stops_at_the_length_read_on_the_device(dtype):
    from tpcomm.models.attention import _launch, decode_attention_reference
    dev = torch.device("cuda", 0)
    g = torch.Generator(device=dev).manual_seed(0)

    def case(B, HQ, HK, D, S):
        qkv = torch.randn(B, (HQ + 2 * HK) * D, generator=g, device=dev).to(dtype)
        cos = torch.randn(D, generator=g, device=dev).to(dtype)
        sin = torch.randn(D, generator=g, device=dev).to(dtype)
        k = torch.randn(B + 1, HK, S, D, generator=g, device=dev).to(dtype)
        v = torch.randn(B + 1, HK, S, D, generator=g, device=dev).to(dtype)
        return qkv, cos, sin, k, v

    def check(out, want, what):
        err = float((out.float() - want.float()).abs().max())
        assert err <= TOL[dtype] * max(1.0, float(want.float().abs().max())), (what, err)

    # GQA groups 4, 2, 1 (D 96: a masked tail), 8 (MQA); the cache not a multiple of a block
    for B, HQ, HK, D, S in ((1, 32, 8, 128, 1100), (8, 32, 8, 128, 1100), (3, 6, 3, 64, 77),
                            (2, 4, 4, 96, 300), (5, 8, 1, 128, 513)):
        qkv, cos, sin, k, v = case(B, HQ, HK, D, S)
        for pos in (0, 1, 63, 64, S // 2, S - 1):
            p = torch.tensor([pos], device=dev)
            kr, vr = k.double(), v.double()
            k2, v2 = k.clone(), v.clone()
            k2[:, :, pos + 1:] = float("nan")     # never read: NaN there changes nothing
            v2[:, :, pos + 1:] = float("nan")
            out = _launch(qkv, cos, sin, k2, v2, p)
            want = decode_attention_reference(qkv.double(), cos.double(), sin.double(), kr, vr, p)
            check(out, want, (B, HQ, HK, D, S, pos))
            # the combine folded into the split kernel: bitwise the separate combine kernel's
            assert torch.equal(out, _launch(qkv, cos, sin, k2.clone(), v2.clone(), p,
                                            fold_combine=False)), (B, HQ, HK, D, S, pos)
            check(k2[:B, :, pos], kr[:B, :, pos], "k written at pos")
            assert torch.equal(v2[:B, :, pos], vr[:B, :, pos].to(dtype))
            assert torch.equal(k2[:, :, :pos], k[:, :, :pos])
    # in a CUDA graph: the position is read when the graph replays; the counters of the folded
    # combine (kept zero by every launch, no memset in the graph) stay right replay after replay
    for B in (1, 8):
        qkv, cos, sin, k, v = case(B, 32, 8, 128, 1024)
        p = torch.tensor([10], device=dev)
        counters = torch.zeros(B * 8, dtype=torch.int32, device=dev)
        _launch(qkv, cos, sin, k, v, p, counters)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _launch(qkv, cos, sin, k, v, p, counters)
        for pos in (5, 500, 1023):
            kr, vr = k.double(), v.double()
            p.fill_(pos)
            graph.replay()
            want = decode_attention_reference(qkv.double(), cos.double(), sin.double(), kr, vr,
                                              p)
            check(out, want, ("graph", B, pos))
            two = _launch(qkv, cos, sin, k.clone(), v.clone(), p, fold_combine=False)
            for i in range(200):   # a lost or early combine shows as a different output
                out.fill_(float("nan"))
                graph.replay()
                assert torch.equal(out, two), ("graph replay", B, pos, i)
            assert not counters.any(), counters


def _model_world1(rank, world, dtype_name):
    from torch._dynamo.utils import counters

    from tpcomm.groups.launch import init_rank
    from tpcomm.models.comm import make_comm
    from tpcomm.models.generate import Generator
    from tpcomm.models.llama import get_config
    from tpcomm.models.weights import build_model
    dev = init_rank("cuda", rank)
    comm = make_comm("tpcomm", dev)
    cfg = get_config("tiny")
    out = {}
    try:
        # weights drawn on the CPU (the CUDA generator draws other numbers for the same seed):
        # the CPU model of the test has the same ones
        model = build_model(cfg, comm, seed=3, dtype=getattr(torch, dtype_name), device=dev,
                            random_device="cpu")
        prompt = torch.randint(0, cfg.vocab_size, (2, 12),
                               generator=torch.Generator().manual_seed(0))
        for compiled in (False, True):
            for graph in (False, True):
                gen = Generator(model, 2, 40, graph=graph, compile=compiled)
                tokens = gen.generate(prompt, 16)
                first = gen.prefill(prompt)   # compiled + graph: the length's CUDA graph
                out[(compiled, graph)] = (tokens.cpu().numpy(), gen.logits.float().cpu().numpy())
                if compiled and graph:   # the same compiled prefill outside the graph
                    out["graphed_prefill"] = gen.graphs_prefill()
                    again = gen.prefill(prompt, graph=False)
                    out["ungraphed"] = (bool(torch.equal(first, again)),
                                        gen.logits.float().cpu().numpy())
                gen.close()
        out["graph_breaks"] = sum(counters["graph_break"].values())
        out["unique_graphs"] = counters["stats"]["unique_graphs"]
    finally:
        comm.close()
    return out


@needs_gpu
def test_compiled_model_world1_gives_the_tokens_of_the_eager_model():
    from tpcomm.groups.launch import spawn
    from tpcomm.models.comm import TorchDistComm
    from tpcomm.models.generate import Generator
    from tpcomm.models.llama import get_config
    from tpcomm.models.weights import build_model
    cfg = get_config("tiny")
    ref = Generator(build_model(cfg, TorchDistComm(), seed=3), 2, 40)
    prompt = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ref_tokens = ref.generate(prompt, 16).numpy()
    ref.prefill(prompt)
    ref_logits = ref.logits.float()
    r32 = spawn(_model_world1, 1, "float32", env=ENV, timeout_s=600)[0]
    # the GPU model has the CPU model's weights: its eager prefill logits within float32
    # rounding of the CPU ones (a wrong weight, mask or RoPE is off at the logits' own scale)
    eager = torch.from_numpy(r32[(False, False)][1])
    torch.testing.assert_close(eager, ref_logits, rtol=1e-4, atol=1e-4)
    for key in ((False, False), (False, True), (True, False), (True, True)):
        # float32: the GPU decode kernel and inductor's fusions keep the CPU model's tokens
        assert (r32[key][0] == ref_tokens).all(), (key, r32[key][0], ref_tokens)
    # one graph for decode and one for prefill, shared by the layers; the decode prologue
    assert r32["graph_breaks"] == 0 and r32["unique_graphs"] == 3, r32["unique_graphs"]
    # the compiled prefill replayed from its CUDA graph: bitwise the same prefill outside it
    assert r32["graphed_prefill"] and r32["ungraphed"][0]
    assert (r32[(True, True)][1] == r32["ungraphed"][1]).all()
    # prefill logits of the compiled model within float32 rounding of the eager ones (bfloat16:
    # `tpcomm bench model --compile` compares the compiled llama3_8b with the eager one)
    for graph in (False, True):
        torch.testing.assert_close(torch.from_numpy(r32[(True, graph)][1]), eager,
                                   rtol=1e-4, atol=1e-4)


def _ops_2_gpus(rank, world):
    import tpcomm
    from tpcomm.groups.launch import init_rank
    from tpcomm.testing import exact
    dev = init_rank("cuda", rank)
    out = {"wrong": []}
    with tpcomm.Communicator() as comm:
        H = 4096
        w = (exact(H, 3, torch.float32, 1, device=dev) / 8 + 1).to(torch.bfloat16)
        x = torch.empty(8, H, dtype=torch.bfloat16, device=dev)
        res = torch.empty_like(x)

        def fn(x, res):
            y = comm.all_reduce(x * 1)
            normed, _ = comm.all_reduce_add_rms_norm(x, res, w, 1e-5)
            return y, normed, comm.reduce_scatter(y), comm.all_gather(y[:2])

        compiled = torch.compile(fn, fullgraph=True)

        def fill(salt):
            x.copy_(exact(8 * H, rank, torch.bfloat16, salt, device=dev).view_as(x))
            res.copy_(exact(8 * H, 9, torch.bfloat16, salt + 1, device=dev).view_as(x))

        fill(0)
        compiled(x, res)         # compiles (eager: the ops go to NCCL on "auto")
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=stream):
            outs = compiled(x, res)
        for salt in range(1, 6):
            for mode in ("graph", "eager"):
                fill(salt)
                got = outs if mode == "graph" else None
                if mode == "graph":
                    graph.replay()
                else:
                    got = compiled(x, res)
                torch.cuda.synchronize()
                want_x = sum(exact(8 * H, p, torch.float64, salt, device=dev)
                             for p in range(world)).to(torch.bfloat16).view(8, H)
                full = (want_x.double() * 1).to(torch.bfloat16)
                ok = (torch.equal(got[0], full) and torch.equal(x, want_x)
                      and torch.equal(got[2], (full.view(world, -1, H)[rank].double()
                                               * world).to(torch.bfloat16))
                      and torch.equal(got[3], torch.cat([full[:2]] * world)))
                if not ok:
                    out["wrong"].append((mode, salt))
        out["stats"] = comm.stats()["ops"]
    return out


@needs_2_gpus
def test_compiled_ops_in_a_cuda_graph_on_2_gpus():
    from tpcomm.groups.launch import spawn
    for r in spawn(_ops_2_gpus, 2, env=ENV, timeout_s=600):
        assert not r["wrong"], r["wrong"]
        # captured, the ops ran tpcomm's kernels; eager, NCCL
        assert "one_shot/push" in r["stats"]["all_reduce"] and "torch" in r["stats"]["all_reduce"]
