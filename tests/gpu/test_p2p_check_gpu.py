"""The data-moving P2P check on real GPUs: it runs when a Communicator starts and passes on a
machine whose P2P works; a cached failure for this machine sends every rank to torch.distributed
with the cache file named.

Skipped, visibly, without 2 GPUs. Each test has its own TPCOMM_CACHE_DIR.
"""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist

import tpcomm
from tpcomm.cuda import p2p_check
from tpcomm.groups.launch import init_rank, spawn

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2,
                                 reason=f"needs 2 GPUs, found {torch.cuda.device_count()}")]

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
       "NVSHMEM_DISABLE_NVLS": "1", "PYTHONUNBUFFERED": "1"}


def _start(rank, world):
    device = init_rank("cuda", rank)
    try:
        with tpcomm.Communicator(device=device, timeout_s=30) as comm:
            x = torch.full((4096,), float(rank + 1), device=device)
            out = comm.all_reduce(x)
            right = bool((out == world * (world + 1) / 2).all())
            v = p2p_check.last_verdict()
            return {"backend": comm.backend_name, "disabled": comm.disabled_reason,
                    "verdict": None if v is None else (v.ok, v.source, v.reason, v.seconds),
                    "right": right}
    finally:
        dist.destroy_process_group()


def test_p2p_check_runs_and_passes_at_communicator_start(tmp_path):
    out = spawn(_start, 2, env=dict(ENV, TPCOMM_CACHE_DIR=str(tmp_path)), timeout_s=240)
    for r, res in enumerate(out):
        assert res["verdict"] is not None, f"rank {r}: the P2P check did not run: {res}"
        ok, source, reason, seconds = res["verdict"]
        assert ok and source == "probe" and reason is None, (r, res)
        assert res["backend"] == "p2p" and res["disabled"] is None and res["right"], (r, res)
        print(f"rank {r}: P2P check passed in {seconds * 1e3:.1f} ms")
    [(path, entry)] = p2p_check.cached_verdicts(str(tmp_path))
    assert entry["ok"] is True and entry["key"]["host"] == socket.gethostname()


def test_cached_failure_sends_every_rank_to_torch_distributed(tmp_path):
    ids = [p2p_check.device_id(torch.device("cuda", i)) for i in range(2)]
    key = p2p_check.cache_key(socket.gethostname(), ids, p2p_check.driver_version())
    path = p2p_check.cache_path(str(tmp_path), key)
    p2p_check.write_cached(path, key, False, "rank 1 read 2048 wrong words (forged by a test)")
    with open(path) as f:
        assert json.load(f)["ok"] is False
    out = spawn(_start, 2, env=dict(ENV, TPCOMM_CACHE_DIR=str(tmp_path)), timeout_s=240)
    for r, res in enumerate(out):
        assert res["backend"] == "torch" and res["right"], (r, res)
        assert "forged by a test" in res["disabled"] and path in res["disabled"], (r, res)
        assert res["verdict"][1] == "cache", (r, res)
    # TPCOMM_P2P_CHECK=0 ignores the cached failure
    out = spawn(_start, 2, env=dict(ENV, TPCOMM_CACHE_DIR=str(tmp_path), TPCOMM_P2P_CHECK="0"),
                timeout_s=240)
    for r, res in enumerate(out):
        assert res["backend"] == "p2p" and res["right"] and res["verdict"][1] == "skipped"
    assert os.path.exists(path)
