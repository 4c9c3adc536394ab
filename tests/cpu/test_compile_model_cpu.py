"""Models under torch.compile with inductor on 2 CPU ranks, in one spawn:

- the fusion pass (tpcomm.integrations.compile): the Hugging Face Llama sharded by apply_tp
  (all-reduce in forward hooks, residual add and RMSNorm in the model's own code), compiled: the
  generated code calls torch.ops.tpcomm.all_reduce_add_rms_norm once per sublayer and never the
  bare all-reduce, the Communicator ran the fused op, and the logits equal the eager model's;
- the TP Llama compiled (Generator(compile=True)): the same greedy tokens as eager, prefill
  logits within float32 rounding, no graph break, one compiled graph for all layers per phase.

inductor, because the pass and the generated code are the point. Each rank compiles C++ on
one of the 2 cores; TORCHINDUCTOR_VEC_ISA_OK=0 (scalar C++) halves that compile time and changes
nothing that is checked here. Skipped, visibly, without transformers.
"""
import pytest
import torch

from _dist import init_gloo, run
from tpcomm.models.llama import LlamaConfig, get_config
from tpcomm.models.weights import RandomReader, build_model, hf_shapes

pytestmark = pytest.mark.cpu

HF_CFG = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                     num_heads=8, num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=128)
BATCH, PROMPT, NEW = 2, 12, 8


def _hf(rank, comm):
    import tpcomm.integrations.compile as tpcomm_compile
    from torch._inductor.utils import run_and_get_code
    from tpcomm.integrations.hf import apply_tp, llama_for_causal_lm
    model = llama_for_causal_lm(HF_CFG.to_hf())
    reader = RandomReader(7)
    model.load_state_dict({n: reader.full(n, s) for n, s in hf_shapes(HF_CFG).items()})
    apply_tp(model, comm)
    prompt = torch.randint(0, HF_CFG.vocab_size, (BATCH, 10),
                           generator=torch.Generator().manual_seed(1))
    tpcomm_compile.install()
    try:
        with torch.inference_mode():
            eager = model(prompt, use_cache=False).logits
            before = dict(comm.stats()["ops"].get("all_reduce_add_rms_norm", {}))
            compiled = torch.compile(model, fullgraph=True)
            # no FX graph cache: a cache hit would skip the pass whose run is counted here
            with torch._inductor.config.patch(fx_graph_cache=False):
                got, code = run_and_get_code(lambda: compiled(prompt, use_cache=False).logits)
    finally:
        tpcomm_compile.uninstall()
    code = "\n".join(code)
    after = comm.stats()["ops"].get("all_reduce_add_rms_norm", {})
    return {"eager": eager.numpy(), "compiled": got.numpy(), "stats": tpcomm_compile.stats(),
            "fused_calls_in_code":
                code.count("= torch.ops.tpcomm.all_reduce_add_rms_norm.default("),
            "bare_all_reduce_in_code": code.count("torch.ops.tpcomm.all_reduce.default("),
            "fused_calls_run": sum(v["calls"] for v in after.values())
            - sum(v["calls"] for v in before.values())}


def _tiny(rank, comm):
    from tpcomm.models.generate import Generator
    cfg = get_config("tiny")
    model = build_model(cfg, comm, seed=3)
    prompt = torch.randint(0, cfg.vocab_size, (BATCH, PROMPT),
                           generator=torch.Generator().manual_seed(0))
    out = {}
    for compiled in (False, True):
        gen = Generator(model, BATCH, PROMPT + NEW, compile=compiled)
        tokens = gen.generate(prompt, NEW)
        gen.prefill(prompt)
        out[compiled] = (tokens.numpy(), gen.logits.numpy())
    c = torch._dynamo.utils.counters
    out["graph_breaks"] = sum(c["graph_break"].values())
    out["unique_graphs"] = c["stats"]["unique_graphs"]
    return out


def _ranks(rank, world):
    import os

    import tpcomm
    os.environ["TORCHINDUCTOR_VEC_ISA_OK"] = "0"
    init_gloo()
    torch._dynamo.utils.counters.clear()
    with tpcomm.Communicator() as comm:
        return {"hf": _hf(rank, comm), "tiny": _tiny(rank, comm)}


def test_fusion_pass_on_hf_llama_and_compiled_tp_model():
    pytest.importorskip("transformers", reason="the HF integration tests need transformers "
                        "(pip install transformers)")
    results = run(_ranks, 2)
    for r in results:
        hf = r["hf"]
        sublayers = 2 * HF_CFG.num_layers
        assert hf["stats"]["fused"] == sublayers
        assert hf["fused_calls_in_code"] == sublayers and hf["bare_all_reduce_in_code"] == 0
        assert hf["fused_calls_run"] == sublayers
        torch.testing.assert_close(torch.from_numpy(hf["compiled"]),
                                   torch.from_numpy(hf["eager"]), rtol=1e-5, atol=1e-5)
        tiny = r["tiny"]
        (eager_tokens, eager_logits), (tokens, logits) = tiny[False], tiny[True]
        assert (tokens == eager_tokens).all()
        torch.testing.assert_close(torch.from_numpy(logits), torch.from_numpy(eager_logits),
                                   rtol=1e-4, atol=1e-4)
        assert tiny["graph_breaks"] == 0
        # HF: one graph; the TP model: one for decode and one for prefill, shared by its 4
        # layers, and the decode step's prologue (embedding, first norm, RoPE rows)
        assert tiny["unique_graphs"] == 4, tiny["unique_graphs"]
    assert (results[0]["tiny"][True][0] == results[1]["tiny"][True][0]).all()
