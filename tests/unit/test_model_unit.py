"""The TP Llama model without processes: configs, sharding arithmetic, weight plans, shapes,
prefill/decode consistency, fused = unfused, and the benchmark's argument handling."""
import argparse
import dataclasses

import pytest
import torch

from tpcomm.models.layers import (ColumnParallelLinear, RowParallelLinear, kv_head_range, padded_size,
                           shard_range)
from tpcomm.models.comm import TorchDistComm, make_comm
from tpcomm.models.generate import Generator
from tpcomm.models.llama import CONFIGS, LlamaConfig, LlamaTP, get_config, rope_inv_freq
from tpcomm.models.weights import RandomReader, build_model, hf_shapes, load_weights, weight_plan


class FakeComm:
    """Rank r of W for building shards; no communication."""

    def __init__(self, rank, world):
        self.rank, self.world_size = rank, world


# ---------------------------------------------------------------- configs
def test_llama3_shapes_have_the_published_parameter_counts():
    assert abs(CONFIGS["llama3_8b"].num_params() / 1e9 - 8.03) < 0.01
    assert abs(CONFIGS["llama3_70b"].num_params() / 1e9 - 70.55) < 0.01
    for name in ("llama3_8b", "llama3_70b"):
        cfg = get_config(name)
        assert cfg.head_dim == 128 and cfg.num_kv_heads == 8
        for world in (1, 2, 4, 8):
            cfg.check_tp(world)


def test_hf_config_round_trip_and_rope_spellings():
    cfg = dataclasses.replace(get_config("tiny"), rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024})
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
    old = cfg.to_hf()
    old["rope_scaling"] = {"type": "default"}
    assert LlamaConfig.from_hf(old).rope_scaling is None
    new = get_config("tiny").to_hf()
    del new["rope_theta"], new["head_dim"]
    new["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    got = LlamaConfig.from_hf(new)
    assert got.rope_theta == 1234.0 and got.head_dim == 32
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        dataclasses.replace(cfg, rope_scaling={"rope_type": "yarn"})
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("llama9")


def test_llama3_rope_scaling_slows_only_the_low_frequencies():
    base = get_config("tiny")
    scaled = dataclasses.replace(base, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    a, b = rope_inv_freq(base), rope_inv_freq(scaled)
    assert torch.equal(a[:2], b[:2])                      # high frequencies untouched
    torch.testing.assert_close(b[-1], a[-1] / 8)          # lowest frequency divided by factor
    assert (b <= a).all()


# ---------------------------------------------------------------- sharding arithmetic
def test_shard_and_kv_head_ranges():
    assert [shard_range(12, 3, r) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match=r"intermediate size \(10\).*divisible by 4"):
        shard_range(10, 4, 0, "intermediate size")
    assert [kv_head_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # fewer KV heads than ranks: each head on world/heads consecutive ranks
    assert [kv_head_range(2, 8, r) for r in range(8)] == [(0, 1)] * 4 + [(1, 2)] * 4
    with pytest.raises(ValueError, match="3 key/value heads cannot be spread over 2"):
        kv_head_range(3, 2, 0)
    assert padded_size(128256, 8) == 128256 and padded_size(301, 2) == 302


def test_tp_refuses_indivisible_shapes():
    with pytest.raises(ValueError, match="attention heads"):
        get_config("tiny").check_tp(3)
    with pytest.raises(ValueError, match="intermediate size"):
        dataclasses.replace(get_config("tiny"), intermediate_size=770).check_tp(4)


def test_column_parallel_parts_are_split_one_by_one():
    lin = ColumnParallelLinear(8, [4, 2, 2], rank=1, world=2)
    assert lin.row_ranges == [(2, 4), (1, 2), (1, 2)] and lin.weight.shape == (4, 8)
    row = RowParallelLinear(6, 5, None, rank=2, world=3)
    assert row.col_range == (4, 6) and row.weight.shape == (5, 2)


@pytest.mark.parametrize("world", [2, 4])
def test_shards_of_every_rank_reassemble_the_full_weights(world):
    """Concatenating the ranks' column shards (per part) and row shards gives the full tensors."""
    cfg = LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    reader = RandomReader(5)
    full = {n: reader.full(n, s) for n, s in hf_shapes(cfg).items()}
    shards = [load_weights(LlamaTP(cfg, FakeComm(r, world)), reader) for r in range(world)]
    D = cfg.head_dim
    q_local, kv_local = cfg.num_heads * D // world, max(cfg.num_kv_heads // world, 1) * D
    qkv = [m.layers[0].self_attn.qkv_proj.weight for m in shards]
    q = torch.cat([w[:q_local] for w in qkv])
    assert torch.equal(q, full["model.layers.0.self_attn.q_proj.weight"])
    k_rows = {kv_head_range(cfg.num_kv_heads, world, r): w[q_local:q_local + kv_local]
              for r, w in enumerate(qkv)}
    k = torch.cat([k_rows[key] for key in sorted(k_rows)])
    assert torch.equal(k, full["model.layers.0.self_attn.k_proj.weight"])
    o = torch.cat([m.layers[0].self_attn.o_proj.weight for m in shards], dim=1)
    assert torch.equal(o, full["model.layers.0.self_attn.o_proj.weight"])
    I = cfg.intermediate_size // world
    up = torch.cat([m.layers[0].mlp.gate_up_proj.weight[I:] for m in shards])
    assert torch.equal(up, full["model.layers.0.mlp.up_proj.weight"])
    head = torch.cat([m.lm_head.weight for m in shards])   # vocab 30 padded to a multiple
    assert torch.equal(head[:30], full["lm_head.weight"]) and not head[30:].any()
    for m in shards:
        assert torch.equal(m.embed_tokens, full["model.embed_tokens.weight"])
    plan_names = {p[0] for _, pieces in weight_plan(shards[0]) for p in pieces}
    assert plan_names == set(full)


def test_random_weights_do_not_depend_on_the_world_size():
    r = RandomReader(1)
    a = r.read("model.layers.0.mlp.down_proj.weight", (16, 8), 1, 4, 8)
    assert torch.equal(a, r.full("model.layers.0.mlp.down_proj.weight", (16, 8))[:, 4:8])
    assert not torch.equal(r.full("x.weight", (4, 4)), RandomReader(2).full("x.weight", (4, 4)))


# ---------------------------------------------------------------- the model, world of one
@pytest.fixture(scope="module")
def tiny():
    return build_model(get_config("tiny"), TorchDistComm(), seed=2)


def test_local_shapes_at_tp4():
    m = LlamaTP(get_config("tiny"), FakeComm(3, 4), device="meta")
    a = m.layers[0].self_attn
    assert (a.n_heads, a.n_kv_heads) == (2, 1)
    assert a.qkv_proj.weight.shape == ((2 + 1 + 1) * 32, 256)
    assert m.layers[0].mlp.down_proj.weight.shape == (256, 768 // 4)
    assert m.lm_head.weight.shape == (512 // 4, 256)


def test_prefill_then_decode_equals_one_long_prefill(tiny):
    cfg = tiny.cfg
    prompt = torch.randint(0, cfg.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    gen = Generator(tiny, 3, 16)
    tokens = gen.generate(prompt, 6)
    assert tokens.shape == (3, 6)
    seq = torch.cat([prompt, tokens[:, :-1]], dim=1)
    tiny.setup_cache(3, 16)
    with torch.inference_mode():
        logits = tiny(seq, torch.arange(seq.shape[1]), kv_len=seq.shape[1], fresh=True,
                      last_only=False)
    assert logits.shape == (3, 12, cfg.vocab_size)
    assert torch.equal(logits[:, 6:].argmax(-1), tokens)
    # a decode step attending the whole static cache (as a CUDA graph does) gives the same
    gen = Generator(tiny, 3, 16)
    gen.prefill(prompt)
    with torch.inference_mode():
        full = tiny(gen.tokens, gen.pos, kv_len=16)[:, -1]
    torch.testing.assert_close(full, logits[:, 7], rtol=1e-5, atol=1e-5)


def test_fused_and_unfused_sublayer_ends_are_bitwise_equal(tiny):
    prompt = torch.randint(0, tiny.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    out = []
    for fused in (True, False):
        tiny.fused = fused
        tiny.setup_cache(2, 8)
        with torch.inference_mode():
            out.append(tiny(prompt, torch.arange(5), kv_len=5, fresh=True, last_only=False))
    tiny.fused = True
    assert torch.equal(out[0], out[1])


def test_generator_guards(tiny):
    gen = Generator(tiny, 2, 6)
    with pytest.raises(ValueError, match="batch 2 and fewer than 6"):
        gen.prefill(torch.zeros(2, 6, dtype=torch.long))
    gen.prefill(torch.zeros(2, 5, dtype=torch.long))
    gen.decode_step()
    with pytest.raises(ValueError, match="all are used"):
        gen.decode_step()
    with pytest.raises(ValueError, match="CUDA graphs need"):
        Generator(tiny, 1, 4, graph=True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny.setup_cache(1, 10 ** 6)


def test_graphed_prefill_replays_the_graph_of_each_length_with_the_new_prompt(tiny,
                                                                             monkeypatch):
    """The prefill CUDA graph's bookkeeping (a graph per prompt length, the prompt copied into
    its static input before each replay), with a stand-in for the capture that records the
    function and reruns it on replay: each prompt gets its own logits, never the captured one's.
    The graph itself: tests/gpu/test_compile_gpu.py (bitwise the un-graphed compiled prefill)."""
    import tpcomm.models.generate as generate
    from tpcomm.models.llama import _decode_layer, _prefill_layer, _prologue
    captures, read = [], []

    def fake_graph_of(fn, warmup=2):
        for _ in range(warmup):
            fn()
        out = fn()
        captures.append(out.shape)
        # the tensors the captured function reads from outside (a real graph holds their
        # addresses, not the tensors: the Generator must keep them alive)
        read.append([c.cell_contents for c in fn.__closure__ or ()
                     if isinstance(c.cell_contents, torch.Tensor)])
        return (lambda: out.copy_(fn())), out

    monkeypatch.setattr(generate, "_graph_of", fake_graph_of)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, tiny.cfg.vocab_size, (2, n), generator=g) for n in (7, 7, 9, 7)]
    want = []
    plain = Generator(tiny, 2, 16)
    for p in prompts:
        want.append((plain.prefill(p).clone(), plain.logits.clone()))
    gen = Generator(tiny, 2, 16)
    with pytest.raises(ValueError, match="needs Generator.graph=True. and a compiled model"):
        gen.prefill(prompts[0], graph=True)
    gen.use_graph = True          # (a CUDA device's setting; the capture is the stand-in)
    assert not gen.graphs_prefill()          # an eager model's prefill stays eager
    tiny._compiled_fns, tiny.compiled = (_decode_layer, _prefill_layer, _prologue), True
    try:
        assert gen.graphs_prefill()
        for p, (tok, logits) in zip(prompts, want):
            assert torch.equal(gen.prefill(p), tok)
            assert torch.equal(gen.logits, logits)
        assert captures == [(2, tiny.cfg.vocab_size)] * 2     # lengths 7 and 9, once each
        for P, tensors in zip((7, 9), read):      # prompt and positions kept by the entry
            kept = {id(t) for t in gen._prefills[P] if isinstance(t, torch.Tensor)}
            assert len(tensors) == 2 and {id(t) for t in tensors} <= kept, P
        assert torch.equal(gen.prefill(prompts[2], graph=False), want[2][0])
        assert len(captures) == 2
        gen.close()
        gen.prefill(prompts[0])
        assert len(captures) == 3   # close() dropped the graphs
    finally:
        tiny._compiled_fns, tiny.compiled = None, False


def test_graphed_decode_replays_one_captured_step_from_the_right_tokens(tiny, monkeypatch):
    """The decode CUDA graph's bookkeeping, with a stand-in for the capture (it runs the warm-up
    and ``after_warmup`` as ``_graph_of`` does and reruns the step on replay): the warm-up's
    steps advance the tokens and positions, which must be put back before the capture, so the
    graphed tokens equal the eager ones. The graph itself: tests/gpu/test_model_gpu.py."""
    import tpcomm.models.generate as generate
    captures = []

    def fake_graph_of(fn, warmup=2, after_warmup=None):
        for _ in range(warmup):
            fn()
        after_warmup()
        out = fn()           # a capture records the step without running it: the stand-in
        after_warmup()       # runs it, then undoes that as the put-back does
        captures.append(out)

        def replay():
            for o, new in zip(out, fn()):
                o.copy_(new)
        return replay, out

    monkeypatch.setattr(generate, "_graph_of", fake_graph_of)
    prompt = torch.randint(0, tiny.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(7))
    want = Generator(tiny, 2, 16).generate(prompt, 6)
    gen = Generator(tiny, 2, 16)
    gen.use_graph = True          # (a CUDA device's setting; the capture is the stand-in)
    got = gen.generate(prompt, 6)
    assert len(captures) == 1 and torch.equal(got, want), (got, want)
    gen.close()
    assert gen._replay is None


def test_set_comm_checks_the_rank():
    m = LlamaTP(get_config("tiny"), FakeComm(0, 2), device="meta")
    with pytest.raises(ValueError, match="sharded for rank 0 of 2"):
        m.set_comm(FakeComm(1, 2))


def test_make_comm_names_the_choices():
    with pytest.raises(ValueError, match="not available on cpu"):
        make_comm("nccl", torch.device("cpu"))
    c = make_comm("gloo", torch.device("cpu"))   # no process group: a world of one
    x = torch.arange(4.0)
    assert c.world_size == 1 and torch.equal(c.all_reduce(x), x)
    assert c.all_gather(x[None]).shape == (1, 4)


# ---------------------------------------------------------------- benchmark arguments
def _args(*argv):
    from tpcomm.bench.model_cli import add_model_bench_args
    p = add_model_bench_args(argparse.ArgumentParser())
    args = p.parse_args(list(argv))
    args.argv = ["bench", "model", *argv]
    return args


def test_bench_defaults_on_cpu(monkeypatch):
    from tpcomm.bench.model_cli import config_from_args
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    c = config_from_args(_args("--device", "cpu"))
    assert (c.model, c.world, c.comms, c.dtype, c.graph) == ("tiny", 2, ("tpcomm", "gloo"),
                                                             "float32", False)
    c = config_from_args(_args("--device", "cpu", "--batch", "2,3", "--prompt-lens", "",
                               "--comm", "gloo", "--no-fused"))
    assert c.batches == (2, 3) and c.prompt_lens == () and c.comms == ("gloo",) and not c.fused


@pytest.mark.parametrize("argv,match", [
    (("--comm", "nccl"), "nccl is not a backend on cpu; choose among tpcomm, gloo"),
    (("--comm", "tpcomm,tpcomm"), "name each backend once"),
    (("--model", "tiny", "--checkpoint", "/nonexistent"), "not both"),
    (("--checkpoint", "/nonexistent"), "no config.json"),
])
def test_bench_bad_arguments(argv, match, monkeypatch):
    from tpcomm.cli import UsageError
    from tpcomm.bench.model_cli import config_from_args
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(UsageError, match=match):
        config_from_args(_args("--device", "cpu", *argv))


def test_compare_states_the_reason_when_tokens_differ():
    from tpcomm.bench.model import compare
    logits = {"a": torch.tensor([[10.0, 9.99]]), "b": torch.tensor([[9.99, 10.0]])}
    tokens = {"a": torch.tensor([[0, 1]]), "b": torch.tensor([[0, 2]])}
    ok = compare(tokens, logits, "a", "b", "bfloat16")
    assert ok["ok"] and "near-tie" in ok["verdict"] and ok["first_difference_step"] == 1
    bad = compare(tokens, {"a": logits["a"], "b": logits["a"] * 2}, "a", "b", "bfloat16")
    assert not bad["ok"] and bad["verdict"].startswith("WRONG")
    assert compare(tokens, logits, "a", "a", "float32")["verdict"] == "identical"


# ---------------------------------------------------------------- breakdown, attention tuning
def test_breakdown_counts_each_kernel_once_not_the_cpu_op_around_it():
    """The compiled model's decode attention runs as the registered op tpcomm::decode_attention:
    its CPU event carries its kernels' device time as "self device time" too; counting it read
    the compiled attention at 2x the eager one (one H200, 2026-12-02)."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    from tpcomm.models.breakdown import categorize
    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [E(key="tpcomm::decode_attention", device_type=cpu, self_device_time_total=300.0),
              E(key="_decode_attention_split_kernel", device_type=gpu,
                self_device_time_total=250.0),
              E(key="_decode_attention_combine_kernel", device_type=gpu,
                self_device_time_total=50.0),
              E(key="tpcomm::all_reduce_add_rms_norm", device_type=cpu,
                self_device_time_total=40.0),
              E(key="_all_reduce_add_rms_norm_kernel", device_type=gpu,
                self_device_time_total=40.0),
              E(key="aten::mm", device_type=cpu, self_device_time_total=1000.0),
              E(key="nvjet_tst_128x64_64x8_1x2_h_bz_coopA_NTT", device_type=gpu,
                self_device_time_total=1000.0),
              E(key="triton_poi_fused_mul_silu_0", device_type=gpu, self_device_time_total=9.0)]
    assert categorize(events, cuda=True) == {"gemm": 1.0, "attention": 0.3, "comm": 0.04}
    # the skinny GEMM: its kernels are GEMM time (the CPU op around them not counted), and on
    # the CPU its op is GEMM time, not communication (a tpcomm:: op)
    skinny = [E(key="tpcomm::skinny_linear", device_type=cpu, self_device_time_total=70.0,
                cpu_time_total=70.0, self_cpu_time_total=1.0),
              E(key="_skinny_gemm_kernel", device_type=gpu, self_device_time_total=60.0),
              E(key="_skinny_gemm_reduce_kernel", device_type=gpu, self_device_time_total=10.0)]
    for cats in (categorize(skinny, cuda=True), categorize(skinny[:1], cuda=False)):
        assert abs(cats["gemm"] - 0.07) < 1e-12 and cats["attention"] == cats["comm"] == 0.0


def test_kernel_listing_counts_launches_and_time_per_step_largest_first():
    """The kernel listing of ``--breakdown``: kernels only (not the CPU op around them), per
    step, by device time, the totals first, ``top`` rows after them."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    from tpcomm.models.breakdown import kernel_listing
    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [E(key="tpcomm::decode_attention", device_type=cpu, count=160,
                self_device_time_total=900.0, self_cpu_time_total=50.0),
              E(key="_decode_attention_split_kernel", device_type=gpu, count=160,
                self_device_time_total=800.0, self_cpu_time_total=0.0),
              E(key="triton_red_fused_add_mean_mul_pow_rsqrt_0", device_type=gpu, count=320,
                self_device_time_total=640.0, self_cpu_time_total=0.0),
              E(key="nvjet_tst_128x64_64x8_1x2_h_bz_coopA_NTT", device_type=gpu, count=640,
                self_device_time_total=19000.0, self_cpu_time_total=0.0),
              E(key="triton_poi_fused_mul_silu_1", device_type=gpu, count=160,
                self_device_time_total=160.0, self_cpu_time_total=0.0)]
    rows = kernel_listing(events, cuda=True, steps=5, top=2)
    assert [r["name"] for r in rows] == ["(all kernels)",
                                         "nvjet_tst_128x64_64x8_1x2_h_bz_coopA_NTT",
                                         "_decode_attention_split_kernel"]
    assert rows[0]["per_step"] == 256 and abs(rows[0]["ms_per_step"] - 4.12) < 1e-9
    assert rows[1]["per_step"] == 128 and abs(rows[1]["ms_per_step"] - 3.8) < 1e-9
    assert [r["category"] for r in rows[1:]] == ["gemm", "attention"]
    full = kernel_listing(events, cuda=True, steps=5, top=10)
    assert [r["category"] for r in full[3:]] == ["other", "other"] and len(full) == 5


def test_folded_combine_compiles_to_the_last_block_protocol_for_sm90():
    """The decode attention kernel compiled for an H100/H200 (sm_90, Triton's own ptxas, no
    GPU needed): every thread's partial stores, then a CTA barrier, then ONE thread's
    acq_rel atomic add at GPU scope on the counter, its result shared through a second
    barrier, and the partials read back past L1 (ld.global.cg); the two-kernel form has no
    atomic. This order is what makes the last program's combine see every split's partials."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton cannot compile ahead of time")
    from tpcomm.kernels import decode_attention as da
    names = ["qkv_ptr", "cos_ptr", "sin_ptr", "k_ptr", "v_ptr", "pos_ptr", "part_o_ptr",
             "part_ml_ptr", "out_ptr", "count_ptr", "sm_scale", "split_len", "splits",
             "stride_qkv", "stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh",
             "stride_vs", "stride_ob", "stride_oh"]
    types = ["*bf16"] * 5 + ["*i64", "*fp32", "*fp32", "*bf16", "*i32", "fp32"] + ["i32"] * 11
    ptx = {}
    for combine in (True, False):
        const = dict(HQ=32, HK=8, G=4, G_PAD=16, G_C=4, D=128, BLOCK_D=128, BLOCK_N=64,
                     PRECISION="tf32", CHUNK=8, COMBINE=combine,
                     DIRECT=False)
        src = ASTSource(da._decode_attention_split_kernel, dict(zip(names, types)), const)
        try:
            ptx[combine] = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": 4}).asm["ptx"].splitlines()
        except Exception as e:  # noqa: BLE001 (no CUDA backend / ptxas in this install)
            pytest.skip(f"no sm_90 compile here: {type(e).__name__}: {str(e)[:100]}")
    lines = ptx[True]
    atoms = [i for i, line in enumerate(lines) if "atom." in line]
    assert len(atoms) == 1 and "atom.global.gpu.acq_rel.add" in lines[atoms[0]]
    a = atoms[0]
    assert lines[a].lstrip().startswith("@%p"), lines[a]        # predicated: one thread
    last_store = max(i for i in range(a) if "st.global" in lines[i])
    assert any("bar.sync" in line for line in lines[last_store:a])
    assert any("bar.sync" in line for line in lines[a:a + 12])  # the result, shared
    assert any("ld.global.cg" in line for line in lines[a:])
    assert not any("atom." in line for line in ptx[False])


def test_decode_attention_constants_come_from_the_measured_table_by_batch():
    from tpcomm.kernels.decode_attention import TUNED, plan_splits, tuned_constants
    assert tuned_constants(1) == TUNED[0][1] and tuned_constants(TUNED[-1][0]) == TUNED[-1][1]
    assert tuned_constants(64) == tuned_constants(TUNED[-1][0])
    for (b0, p0), (b1, _) in zip(TUNED, TUNED[1:]):   # batches between entries: the lower one
        assert b0 < b1 and tuned_constants(b1 - 1) == p0
    assert tuned_constants(1, element_size=4) == (64, 2, 4, 3, 1)   # float32: the defaults
    for _, (block_n, programs, warps, stages, chunk) in TUNED:
        assert warps in (1, 2, 4, 8, 16) and stages >= 1 and chunk & (chunk - 1) == 0
        for batch in (1, 8, 32):   # every point splits an 8B layer's cache sanely
            splits, split_len = plan_splits(batch, 8, 1088, 132, block_n=block_n,
                                            programs_per_sm=programs)
            assert split_len % block_n == 0 and splits * split_len >= 1088
            assert (splits - 1) * split_len < 1088
    assert plan_splits(8, 8, 1092, 132, block_n=64, programs_per_sm=0) == (1, 1152)
    with pytest.raises(ValueError):
        plan_splits(8, 8, 1092, 132, programs_per_sm=-1)


def test_compare_past_the_tolerance_measures_both_against_the_float32_logits():
    """32 bf16 layers: compiled and eager prefill logits may differ past LOGITS_TOL (0.125 on
    4.6, one H200); then the one under test must be no further from the float32 logits than
    REF_ERROR_FACTOR x the baseline, and a real bug (logits off at their own scale) still fails."""
    from tpcomm.bench.model import compare
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 50, generator=g) * 2
    eager = ref + 0.08 * torch.randn(2, 50, generator=g).clamp(-1, 1)
    compiled = ref + 0.06 * torch.randn(2, 50, generator=g).clamp(-1, 1)
    tokens = {"c": torch.tensor([[1]]), "e": torch.tensor([[2]])}
    logits = {"c": compiled, "e": eager}
    assert not compare(tokens, logits, "c", "e", "bfloat16")["ok"]   # past 4 roundings
    ok = compare(tokens, logits, "c", "e", "bfloat16", reference=ref)
    assert ok["ok"] and "within 2x" in ok["verdict"], ok["verdict"]
    assert ok["float32_error"]["c"] <= 0.061 < ok["float32_error"]["e"] <= 0.081
    broken = {"c": ref.roll(1, dims=-1), "e": eager}   # e.g. logits of the wrong position
    bad = compare(tokens, broken, "c", "e", "bfloat16", reference=ref)
    assert not bad["ok"] and bad["verdict"].startswith("WRONG"), bad["verdict"]


def test_reference_model_takes_the_weights_of_a_bfloat16_model():
    """``_reference_logits`` copies the state of the model under test into a float32 one."""
    cfg = get_config("tiny")
    bf = build_model(cfg, TorchDistComm(), seed=3, dtype=torch.bfloat16)
    ref = LlamaTP(cfg, TorchDistComm(), dtype=torch.float32)
    ref.load_state_dict(bf.state_dict())
    for (n, a), (_, b) in zip(ref.state_dict().items(), bf.state_dict().items()):
        assert a.dtype == torch.float32 and torch.equal(a, b.float()), n
