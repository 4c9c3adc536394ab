"""The overlap ops (tpcomm.ops.overlap) on 2 and 3 CPU ranks against torch.distributed.

Inputs are small integers (``tpcomm.testing.exact``) in float32: every product and sum is
exact, so each op must equal the unfused reference (GEMM, then the gloo collective) bitwise,
whatever the chunking. On the CPU the chunks run one after the other; what is checked here is
the row arithmetic (odd M, chunk counts that do not divide M, more chunks than rows).
"""
import json
import os
import signal
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist

import tpcomm
from _dist import init_gloo, run
from tpcomm import reference
from tpcomm.models.layers import ColumnParallelLinear, RowParallelLinear
from tpcomm.models.comm import TorchDistComm
from tpcomm.ops.overlap import chunk_bounds
from tpcomm.testing import exact

pytestmark = pytest.mark.cpu

K, N = 9, 6
CHUNKS = [None, 1, 2, 3, 5, 100]    # 100: more chunks than rows, clamped


def _mat(rows, cols, rank, salt):
    return exact(rows * cols, rank, torch.float32, salt).view(rows, cols)


def _ref_all_reduce(a, b):
    y = a @ b
    dist.all_reduce(y)
    return y


def _ref_reduce_scatter(a, b, world):
    y = a @ b
    out = torch.empty(a.shape[0] // world, b.shape[1])
    reference.reduce_scatter(y, out)
    return out


def _ref_all_gather(a_shard, b, world):
    g = torch.empty(world * a_shard.shape[0], a_shard.shape[1])
    reference.all_gather(a_shard, g)
    return g @ b, g


def _check_ops(comm, rank, world, salt):
    checked = 0
    for M in (1, 7, 13):
        a, b = _mat(M, K, rank, salt), _mat(K, N, rank, salt + 1)
        ref = _ref_all_reduce(a, b)
        for c in CHUNKS:
            out = torch.full((M, N), float("nan"))
            got = tpcomm.matmul_all_reduce(a, b, comm, chunks=c, out=out)
            assert got is out and torch.equal(got, ref), ("all_reduce", M, c)
            checked += 1
        # no fused kernel on the CPU: the pipeline runs (logged once)
        assert torch.equal(tpcomm.matmul_all_reduce(a, b, comm, method="fused"), ref)
    for m in (1, 5, 6):
        a, b = _mat(world * m, K, rank, salt + 2), _mat(K, N, rank, salt + 3)
        ref = _ref_reduce_scatter(a, b, world)
        for c in CHUNKS:
            got = tpcomm.matmul_reduce_scatter(a, b, comm, chunks=c)
            assert got.shape == (m, N) and torch.equal(got, ref), ("reduce_scatter", m, c)
            checked += 1
        # the fused kernel needs the GPU backend: on the CPU the pipeline runs, logged once
        assert torch.equal(tpcomm.matmul_reduce_scatter(a, b, comm, method="fused"), ref)
        a_shard = _mat(m, K, rank, salt + 4)
        ref, ref_g = _ref_all_gather(a_shard, b, world)
        for c in CHUNKS:
            got, g = tpcomm.all_gather_matmul(a_shard, b, comm, chunks=c, return_gathered=True)
            assert torch.equal(got, ref) and torch.equal(g, ref_g), ("all_gather", m, c)
            assert torch.equal(tpcomm.all_gather_matmul(a_shard, b, comm, chunks=c), ref)
            checked += 1
        assert torch.equal(tpcomm.all_gather_matmul(a_shard, b, comm, method="fused"), ref)
    return checked


def _layers(comm, rank, world):
    """RowParallelLinear with overlap forced vs off; ColumnParallelLinear.forward_all_gather."""
    torch.manual_seed(0)
    row = RowParallelLinear(4 * world, 5, comm, rank=rank, world=world)
    row.weight.data = _mat(5, 4, rank, 7)
    x = _mat(11, 4, rank, 8).view(1, 11, 4)
    plain = row(x)
    row.overlap = 3
    assert torch.equal(row(x), plain) and plain.shape == (1, 11, 5)
    col = ColumnParallelLinear(6, 4 * world, rank=rank, world=world, comm=comm)
    col.weight.data = _mat(4, 6, rank, 9)
    x_shard = _mat(7, 6, rank, 10)
    full = torch.empty(world * 7, 6)
    reference.all_gather(x_shard, full)
    for c in (None, 1, 3):
        assert torch.equal(col.forward_all_gather(x_shard, chunks=c), col(full))
    return 1


def _ranks(rank, world):
    init_gloo()
    checked = 0
    with tpcomm.Communicator() as comm:
        checked += _check_ops(comm, rank, world, 0)
        checked += _layers(comm, rank, world)
        fallbacks = comm.stats()["fallbacks"]
        for op in ("matmul_reduce_scatter", "all_gather_matmul", "matmul_all_reduce"):
            assert any(why.startswith(f"{op}(method='fused')") for why in fallbacks), fallbacks
    checked += _check_ops(TorchDistComm(), rank, world, 20)   # the models' gloo backend
    dist.destroy_process_group()
    return checked


@pytest.mark.parametrize("world", [2, 3])
def test_overlap_ops_match_unfused_reference(world):
    per_op = 3 * len(CHUNKS)
    assert run(_ranks, world) == [2 * 3 * per_op + 1] * world


def test_chunk_bounds_cover_rows():
    assert chunk_bounds(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert chunk_bounds(4, 1) == [(0, 4)]
    for rows in range(0, 20):
        for c in range(1, 6):
            b = chunk_bounds(rows, c)
            assert b[0][0] == 0 and b[-1][1] == rows
            assert all(x[1] == y[0] for x, y in zip(b, b[1:]))


# ---------------------------------------------------------------- bad input (no processes)
def _fake_comm(world=2):
    return types.SimpleNamespace(world_size=world, rank=0, device=torch.device("cpu"),
                                 all_reduce_=lambda x: x, all_gather=None)


@pytest.mark.parametrize("call, match", [
    (lambda c: tpcomm.matmul_all_reduce(torch.ones(4, 3), torch.ones(2, 5), c),
     r"matmul_all_reduce: a \(4, 3\) and b \(2, 5\) do not multiply"),
    (lambda c: tpcomm.matmul_all_reduce(torch.ones(4), torch.ones(4, 5), c),
     r"matmul_all_reduce: a must be 2-D, got shape \(4,\)"),
    (lambda c: tpcomm.matmul_all_reduce(torch.ones(4, 3), torch.ones(3, 5, dtype=torch.float64),
                                        c), r"same floating-point dtype"),
    (lambda c: tpcomm.matmul_all_reduce(torch.ones(4, 3), torch.ones(3, 5), c,
                                        out=torch.empty(4, 4)), r"out must be a contiguous"),
    (lambda c: tpcomm.matmul_all_reduce(torch.ones(4, 3), torch.ones(3, 5), c, chunks=0),
     r"chunks must be a positive int"),
    (lambda c: tpcomm.matmul_all_reduce(torch.ones(4, 3), torch.ones(3, 5), c, chunks=2.0),
     r"chunks must be a positive int"),
    (lambda c: tpcomm.matmul_reduce_scatter(torch.ones(5, 3), torch.ones(3, 5), c),
     r"matmul_reduce_scatter: a's rows M=5 \(a \(5, 3\)\) must be divisible by the world size 2"),
    (lambda c: tpcomm.matmul_reduce_scatter(torch.ones(4, 3), torch.ones(3, 5), c,
                                            method="flux"),
     r"matmul_reduce_scatter: method must be 'pipeline' or 'fused', got 'flux'"),
    (lambda c: tpcomm.matmul_all_reduce(torch.ones(4, 3), torch.ones(3, 5), c, method="flux"),
     r"matmul_all_reduce: method must be 'pipeline' or 'fused', got 'flux'"),
    (lambda c: tpcomm.all_gather_matmul(torch.ones(4, 3), torch.ones(3, 5), c, method="flux"),
     r"all_gather_matmul: method must be 'pipeline' or 'fused', got 'flux'"),
    (lambda c: tpcomm.all_gather_matmul(torch.ones(4, 3), torch.ones(4, 5), c),
     r"all_gather_matmul: a_shard \(4, 3\) and b \(4, 5\) do not multiply"),
    (lambda c: tpcomm.all_gather_matmul(torch.ones(4, 3, dtype=torch.int64),
                                        torch.ones(3, 5, dtype=torch.int64), c),
     r"same floating-point dtype"),
])
def test_bad_input_raises_naming_op_and_shapes(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(_fake_comm())


def test_device_mismatch_names_both_devices():
    comm = _fake_comm()
    comm.device = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"on cpu but the communicator is on cuda:0"):
        tpcomm.matmul_all_reduce(torch.ones(4, 3), torch.ones(3, 5), comm)


# ---------------------------------------------------------------- the benchmark CLI
def test_bench_overlap_cli_runs_on_cpu(tmp_path):
    out = tmp_path / "overlap.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK",
                        "LOCAL_WORLD_SIZE")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tpcomm", "bench", "overlap", "-n", "2", "--M", "8,13",
         "--K", "16", "--N", "24", "--chunks", "3", "--iters", "2", "--reps", "2",
         "--json", str(out), "--markdown", str(tmp_path / "overlap.md")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr
    doc = json.loads(out.read_text())
    assert doc["meta"]["world_size"] == 2 and doc["meta"]["benchmark"] == "overlap"
    ops = {r["op"] for r in doc["rows"]}
    assert ops == {"matmul_all_reduce", "matmul_reduce_scatter", "all_gather_matmul"}
    for r in doc["rows"]:
        assert r["ok"] and r["times_us"]["gemm"] > 0 and r["times_us"]["tpcomm"] > 0
        assert r["na"]["torch_async_tp"].startswith("n/a")   # CPU: no symm_mem
        assert r["chunks_auto"] == 1 and r["chunks_forced"] == 3
        assert "tpcomm_forced" in r["times_us"] and r["times_us"]["tpcomm_collective"] > 0
        # one chunk is tpcomm unfused itself; chunks on the CPU run in sequence: no ratio
        assert r["times_us"]["tpcomm"] == r["times_us"]["tpcomm_unfused"]
        assert r["speedup"] == {"tpcomm": "no overlap (1 chunk)",
                                "tpcomm_forced": "no overlap (cpu)"}
    assert "matmul_all_reduce" in stdout and "| M |" in (tmp_path / "overlap.md").read_text()
    assert "no overlap (1 chunk)" in stdout and "x gloo unfused" in stdout
