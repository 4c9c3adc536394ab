"""The TP Llama model on 2 GPUs: tpcomm and NCCL, eager and CUDA-graph decode, against the
unsharded model; and ``tpcomm bench model`` end to end. Skipped, visibly, without 2 GPUs."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

needs_2_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason=f"needs 2 CUDA GPUs, found "
           f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")

BATCH, PROMPT, NEW = 2, 12, 8


def _prompt(vocab):
    return torch.randint(0, vocab, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))


def _ranks(rank, world, dtype_name):
    import torch.distributed as dist

    from tpcomm.models.comm import make_comm
    from tpcomm.models.generate import Generator
    from tpcomm.models.llama import get_config
    from tpcomm.models.weights import build_model
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=dev)
    cfg = get_config("tiny")
    comms = {"tpcomm": make_comm("tpcomm", dev), "nccl": make_comm("nccl", dev)}
    out = {}
    try:
        model = build_model(cfg, comms["tpcomm"], seed=3, dtype=getattr(torch, dtype_name),
                            device=dev)
        for name, comm in comms.items():
            model.set_comm(comm)
            for graph in (False, True):
                gen = Generator(model, BATCH, PROMPT + NEW, graph=graph)
                tokens = gen.generate(_prompt(cfg.vocab_size), NEW)
                gen.prefill(_prompt(cfg.vocab_size))
                first_logits = gen.logits.float().cpu().numpy()
                gen.close()
                out[(name, graph)] = (tokens.cpu().numpy(), first_logits)
        torch.cuda.synchronize()
    finally:
        for c in comms.values():
            c.close()
        dist.destroy_process_group()
    return out


@needs_2_gpus
def test_tp_model_on_2_gpus_float32_matches_unsharded_cpu_model():
    from tpcomm.groups.launch import spawn
    from tpcomm.models.comm import TorchDistComm
    from tpcomm.models.generate import Generator
    from tpcomm.models.llama import get_config
    from tpcomm.models.weights import build_model
    cfg = get_config("tiny")
    ref_model = build_model(cfg, TorchDistComm(), seed=3)
    gen = Generator(ref_model, BATCH, PROMPT + NEW)
    ref_tokens = gen.generate(_prompt(cfg.vocab_size), NEW).numpy()
    results = spawn(_ranks, 2, "float32", timeout_s=600)
    for r in results:
        for key, (tokens, _) in r.items():
            assert (tokens == ref_tokens).all(), key
    # eager and graph decode agree exactly for each backend
    for name in ("tpcomm", "nccl"):
        assert (results[0][(name, False)][0] == results[0][(name, True)][0]).all()


@needs_2_gpus
def test_tp_model_on_2_gpus_bfloat16_backends_agree():
    from tpcomm.groups.launch import spawn
    from tpcomm.bench.model import compare
    r = spawn(_ranks, 2, "bfloat16", timeout_s=600)[0]
    tokens = {k[0]: torch.from_numpy(v[0]) for k, v in r.items() if k[1]}
    logits = {k[0]: torch.from_numpy(v[1]) for k, v in r.items() if k[1]}
    verdict = compare(tokens, logits, "tpcomm", "nccl", "bfloat16")
    assert verdict["ok"], verdict["verdict"]
    assert np.array_equal(r[("nccl", False)][0], r[("nccl", True)][0])


@needs_2_gpus
def test_bench_model_end_to_end_on_2_gpus(tmp_path, monkeypatch):
    import argparse
    import json

    from tpcomm.bench.model_cli import add_model_bench_args, run_model_bench
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    argv = ["--device", "cuda", "-n", "2", "--model", "tiny", "--batch", "1,8",
            "--context", "64", "--decode-tokens", "8", "--prompt-lens", "128",
            "--json", str(tmp_path / "m.json"), "--no-progress"]
    args = add_model_bench_args(argparse.ArgumentParser()).parse_args(argv)
    args.argv = ["bench", "model", *argv]
    assert run_model_bench(args) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["meta"]["graph"] is True
    assert {r["comm"] for r in data["rows"]} == {"tpcomm", "nccl"}
    assert all(c["ok"] for c in data["checks"])
