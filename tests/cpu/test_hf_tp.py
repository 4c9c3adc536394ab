"""tpcomm's Hugging Face integration on 2 CPU ranks: a transformers LlamaForCausalLM built from a
config (no hub), sharded with ``apply_tp``, against the unsharded model.

Skipped, visibly, without transformers (pip install transformers).
"""
import pytest
import torch

from _dist import init_gloo, run
from tpcomm.models.llama import LlamaConfig
from tpcomm.models.weights import RandomReader, hf_shapes

pytestmark = pytest.mark.cpu

# 8 q heads / 2 kv heads (GQA kept at 2 ranks) and a second config with 1 kv head (replicated)
CFGS = {
    "gqa": LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                       num_heads=8, num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=128),
    "mqa": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=1, rope_theta=10000.0, max_position_embeddings=128),
}
PROMPT, NEW = 10, 8


def _model(cfg):
    from tpcomm.integrations.hf import llama_for_causal_lm
    model = llama_for_causal_lm(cfg.to_hf())
    reader = RandomReader(7)
    model.load_state_dict({n: reader.full(n, s) for n, s in hf_shapes(cfg).items()})
    return model


def _greedy(model, prompt):
    with torch.inference_mode():
        logits = model(prompt).logits
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                             do_sample=False, pad_token_id=0)
    return logits.numpy(), out[:, PROMPT:].numpy()


def _ranks(rank, world):
    import tpcomm
    from tpcomm.integrations.hf import apply_tp
    init_gloo()
    out = {}
    with tpcomm.Communicator() as comm:
        for name, cfg in CFGS.items():
            prompt = torch.randint(0, cfg.vocab_size, (2, PROMPT),
                                   generator=torch.Generator().manual_seed(1))
            model = _model(cfg)
            ref = _greedy(model, prompt)
            apply_tp(model, comm)
            attn = model.model.layers[0].self_attn
            out[name] = (ref, _greedy(model, prompt), tuple(attn.q_proj.weight.shape),
                         tuple(attn.o_proj.weight.shape), model.config.num_key_value_heads)
        out["calls"] = comm.stats()["ops"]["all_reduce"]
    return out


def test_apply_tp_matches_unsharded_transformers_model():
    pytest.importorskip("transformers", reason="the HF integration tests need transformers "
                        "(pip install transformers)")
    results = run(_ranks, 2)
    for r in results:
        for name, cfg in CFGS.items():
            (ref_logits, ref_tokens), (logits, tokens), q_shape, o_shape, kv = r[name]
            D = cfg.head_dim
            assert q_shape == (cfg.num_heads * D // 2, cfg.hidden_size)
            assert o_shape == (cfg.hidden_size, cfg.num_heads * D // 2)
            assert kv == max(cfg.num_kv_heads // 2, 1)
            torch.testing.assert_close(torch.from_numpy(logits), torch.from_numpy(ref_logits),
                                       rtol=1e-4, atol=1e-4)
            assert (tokens == ref_tokens).all(), name
        assert sum(v["calls"] for v in r["calls"].values()) > 0   # the all-reduces went through tpcomm
    assert (results[0]["gqa"][1][1] == results[1]["gqa"][1][1]).all()


def test_apply_tp_refuses_a_sharded_model_and_bad_splits():
    pytest.importorskip("transformers", reason="needs transformers (pip install transformers)")
    from tpcomm.integrations.hf import apply_tp

    class FakeComm:
        def __init__(self, rank, world):
            self.rank, self.world_size = rank, world

    model = _model(CFGS["mqa"])
    with pytest.raises(ValueError, match="attention heads"):
        apply_tp(model, FakeComm(0, 3))
    model = _model(CFGS["gqa"])
    apply_tp(model, FakeComm(1, 2))
    with pytest.raises(ValueError, match="already sharded"):
        apply_tp(model, FakeComm(1, 2))
