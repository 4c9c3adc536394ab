"""The TP Llama model on 2 CPU ranks: equal to the unsharded model, the same greedy tokens with
tpcomm and gloo, fused and unfused, from random weights and from a safetensors checkpoint.

One spawn runs every check (a spawn costs seconds of start-up on a 2-core CI machine); the
tests below assert on its results.
"""
import dataclasses

import pytest
import torch

from _dist import init_gloo, run
from tpcomm.models.comm import TorchDistComm, make_comm
from tpcomm.models.generate import Generator
from tpcomm.models.llama import LlamaConfig, get_config
from tpcomm.models.weights import RandomReader, build_model, hf_shapes, save_checkpoint

pytestmark = pytest.mark.cpu

try:
    import safetensors  # noqa: F401
    HAVE_SAFETENSORS = True
except ImportError:
    HAVE_SAFETENSORS = False
needs_safetensors = pytest.mark.skipif(not HAVE_SAFETENSORS, reason="the checkpoint tests need "
                                       "safetensors (pip install safetensors)")

BATCH, PROMPT, NEW = 2, 12, 8
# a second architecture for the checkpoint: odd vocabulary (the LM head is padded), one KV head
# (replicated on both ranks), tied embeddings, Llama 3 rope scaling
CKPT_CFG = LlamaConfig(vocab_size=301, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=1, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, max_position_embeddings=256,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64})


def _prompt(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (BATCH, PROMPT), generator=g)


def _run_model(model, prompt):
    """(prefill logits [B, P, V], greedy tokens [B, NEW])."""
    model.setup_cache(BATCH, PROMPT + NEW)
    with torch.inference_mode():
        logits = model(prompt, torch.arange(PROMPT), kv_len=PROMPT, fresh=True, last_only=False)
    tokens = Generator(model, BATCH, PROMPT + NEW).generate(prompt, NEW)
    return logits.clone(), tokens


def _unsharded(cfg, checkpoint=None):
    return _run_model(build_model(cfg, TorchDistComm(), checkpoint=checkpoint, seed=3),
                      _prompt(cfg))


def _ranks(rank, world, ckpt_dirs):
    init_gloo()
    out = {}
    cfg = get_config("tiny")
    comms = {"tpcomm": make_comm("tpcomm", torch.device("cpu")),
             "gloo": make_comm("gloo", torch.device("cpu"))}
    try:
        assert comms["tpcomm"].backend_name == "shm"
        model = build_model(cfg, comms["tpcomm"], seed=3)
        for name, comm in comms.items():
            model.set_comm(comm)
            for fused in (True, False):
                model.fused = fused
                out[(name, fused)] = _run_model(model, _prompt(cfg))
        for tag, path in ckpt_dirs.items():
            m = build_model(CKPT_CFG, comms["tpcomm"], checkpoint=path)
            out[("ckpt", tag)] = _run_model(m, _prompt(CKPT_CFG))
        m = build_model(CKPT_CFG, comms["tpcomm"], seed=3)
        out[("ckpt", "random")] = _run_model(m, _prompt(CKPT_CFG))
        out["stats"] = comms["tpcomm"].stats()
    finally:
        for c in comms.values():
            c.close()
    # tensors go back as numpy arrays: a torch tensor in the result queue is passed as a file
    # descriptor that dies with the rank's process
    return {k: tuple(t.numpy() for t in v) if isinstance(v, tuple) else v for k, v in out.items()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Checkpoints written here from the seeded random weights (when safetensors is there),
    then one 2-rank spawn."""
    reader = RandomReader(3)
    full = {n: reader.full(n, s) for n, s in hf_shapes(CKPT_CFG).items()}
    dirs = {}
    for tag, per_file in (("single", None), ("index", 5)) if HAVE_SAFETENSORS else ():
        d = tmp_path_factory.mktemp(f"ckpt-{tag}")
        save_checkpoint(str(d), CKPT_CFG, full, max_file_tensors=per_file)
        dirs[tag] = str(d)
    results = [{k: tuple(torch.from_numpy(a) for a in v) if isinstance(v, tuple) else v
                for k, v in r.items()} for r in run(_ranks, 2, dirs)]
    return results, dirs


def test_tp_model_equals_unsharded_model(two_ranks):
    results, _ = two_ranks
    ref_logits, ref_tokens = _unsharded(get_config("tiny"))
    for r in results:
        logits, tokens = r[("tpcomm", True)]
        # float32: only the order of the sums differs (two partial sums instead of one)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(tokens, ref_tokens)


def test_backends_and_fusion_give_identical_tokens(two_ranks):
    results, _ = two_ranks
    for r in results:
        base_logits, base_tokens = r[("gloo", False)]
        for key in (("tpcomm", True), ("tpcomm", False), ("gloo", True)):
            logits, tokens = r[key]
            # two ranks: a + b in float32 is the same whoever adds it, so bitwise equal
            assert torch.equal(logits, base_logits), key
            assert torch.equal(tokens, base_tokens), key
    assert torch.equal(results[0][("tpcomm", True)][1], results[1][("tpcomm", True)][1])
    ops = results[0]["stats"]["ops"]
    assert "all_reduce_add_rms_norm" in ops and "all_gather" in ops


@needs_safetensors
def test_checkpoint_loading_sharded_per_rank(two_ranks):
    results, dirs = two_ranks
    ref_logits, ref_tokens = _unsharded(CKPT_CFG, checkpoint=dirs["single"])
    rnd_logits, rnd_tokens = _unsharded(CKPT_CFG)
    assert torch.equal(ref_logits, rnd_logits)   # the checkpoint holds exactly those weights
    for r in results:
        for tag in ("single", "index", "random"):
            logits, tokens = r[("ckpt", tag)]
            torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
            assert torch.equal(tokens, ref_tokens), tag
        assert r[("ckpt", "single")][0].shape[-1] == CKPT_CFG.vocab_size  # padding sliced off


@needs_safetensors
def test_checkpoint_shape_mismatch_is_a_clear_error(tmp_path):
    reader = RandomReader(0)
    full = {n: reader.full(n, s) for n, s in hf_shapes(CKPT_CFG).items()}
    save_checkpoint(str(tmp_path), CKPT_CFG, full)
    wrong = dataclasses.replace(CKPT_CFG, intermediate_size=256)
    with pytest.raises(ValueError, match="mlp.gate_proj.weight has shape"):
        build_model(wrong, TorchDistComm(), checkpoint=str(tmp_path))
    del full["model.norm.weight"]
    save_checkpoint(str(tmp_path), CKPT_CFG, full)
    with pytest.raises(KeyError, match="model.norm.weight"):
        build_model(CKPT_CFG, TorchDistComm(), checkpoint=str(tmp_path))


def test_bench_model_cli_end_to_end(tmp_path, monkeypatch, capsys):
    """``tpcomm bench model`` on 2 spawned ranks: tables, JSON, markdown, breakdown, exit 0."""
    import json

    from tpcomm.cli import main
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    js, md = tmp_path / "m.json", tmp_path / "m.md"
    rc = main(["bench", "model", "--device", "cpu", "--batch", "1,2", "--context", "8",
               "--decode-tokens", "4", "--warmup-steps", "1", "--prompt-lens", "16",
               "--reps", "1", "--breakdown", "--json", str(js), "--markdown", str(md),
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tpcomm (ms)" in out and "gloo (ms)" in out and "identical" in out
    data = json.loads(js.read_text())
    assert data["meta"]["model"] == "tiny" and data["meta"]["comm_backends"]["tpcomm"] == "shm"
    phases = [(r["phase"], r["comm"]) for r in data["rows"]]
    assert phases.count(("decode", "tpcomm")) == 2 and phases.count(("prefill", "gloo")) == 1
    assert all(c["ok"] and c["identical_tokens"] for c in data["checks"])
    parts = data["rows"][0]["breakdown_ms"]
    assert set(parts) == {"gemm", "attention", "comm", "other", "step"} and parts["comm"] > 0
    kernels = data["rows"][0]["kernels"]     # on the CPU: the ops of a step by self time
    assert kernels[0]["name"] == "(all ops)" and kernels[0]["per_step"] > 10
    assert any(k["name"] == "aten::mm" for k in kernels[1:])
    ms = [k["ms_per_step"] for k in kernels[1:]]
    assert ms == sorted(ms, reverse=True) and sum(ms) <= kernels[0]["ms_per_step"] + 1e-9
    text = md.read_text()
    assert "| batch | tpcomm (ms) |" in text and "## decode step kernels" in text
    assert "| 1 | tpcomm | " in text.split("## decode step kernels")[1]
