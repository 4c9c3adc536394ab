"""The overlap ops (tpcomm.ops.overlap) on GPUs: the streams-and-events pipeline against the
unfused reference (GEMM, then the NCCL collective).

- world 2 and 4: float32 with small-integer inputs (exact, so bitwise equal to the reference
  and across ranks) and bfloat16 with random inputs (within a tolerance), odd M, chunk counts
  that do not divide M, the automatic count on a prefill shape, a caller on its own stream,
  the fused kernels (method="fused", each op; the stats must name them), and a CUDA graph
  capture of the overlapped all-reduce;
- world 1 (one GPU): the side stream does real work there too (the local reduce-scatter and
  all-gather are copies), so a missing event or join shows up as wrong data.

Skipped, visibly, without enough GPUs. Multicast (NVLS) stays off in every rank.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import tpcomm
from tpcomm import reference
from tpcomm.groups.launch import spawn
from tpcomm.ops.overlap import _SIDE_STREAMS
from tpcomm.testing import exact

pytestmark = pytest.mark.gpu

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
       "NVSHMEM_DISABLE_NVLS": "1", "PYTHONUNBUFFERED": "1"}
CHUNKS = [None, 1, 2, 3, 4, 7]
BF16_TOL = 2e-2   # of max|ref|: chunk GEMMs of other M may round differently (bf16: 8 bits)


def _needs(n):
    return pytest.mark.skipif(torch.cuda.device_count() < n,
                              reason=f"needs {n} GPUs, found {torch.cuda.device_count()}")


def _init(rank):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    return torch.device("cuda", rank)


def _inputs(rows, k, n, rank, dtype, dev, salt):
    if dtype == torch.float32:   # small integers, K <= 64: every sum exact
        a = exact(rows * k, rank, dtype, salt, dev).view(rows, k)
        b = exact(k * n, rank, dtype, salt + 1, dev).view(k, n)
    else:
        g = torch.Generator(device=dev).manual_seed(salt * 31 + rank)
        a = torch.randn(rows, k, generator=g, device=dev).div_(k ** 0.5).to(dtype)
        b = torch.randn(k, n, generator=g, device=dev).to(dtype)
    return a, b


def _close(got, ref, dtype):
    if got.shape != ref.shape:
        return False
    if dtype == torch.float32:
        return torch.equal(got, ref)
    scale = float(ref.float().abs().max()) or 1.0
    return float((got.float() - ref.float()).abs().max()) <= BF16_TOL * scale


def _refs(a, b, world, op):
    if op == "all_reduce":
        y = a @ b
        dist.all_reduce(y)
        return y
    if op == "reduce_scatter":
        out = torch.empty(a.shape[0] // world, b.shape[1], dtype=a.dtype, device=a.device)
        return reference.reduce_scatter(a @ b, out)
    g = torch.empty(world * a.shape[0], a.shape[1], dtype=a.dtype, device=a.device)
    return reference.all_gather(a, g) @ b


def _run_op(op, a, b, comm, chunks, method="pipeline"):
    if op == "all_reduce":
        out = torch.full((a.shape[0], b.shape[1]), float("nan"), dtype=a.dtype, device=a.device)
        return tpcomm.matmul_all_reduce(a, b, comm, chunks=chunks, out=out, method=method)
    if op == "reduce_scatter":
        return tpcomm.matmul_reduce_scatter(a, b, comm, chunks=chunks, method=method)
    return tpcomm.all_gather_matmul(a, b, comm, chunks=chunks, method=method)


def _same_on_all_ranks(t, world):
    b = t.contiguous().view(torch.uint8).reshape(-1)
    every = torch.empty(world * b.numel(), dtype=b.dtype, device=b.device)
    dist.all_gather_into_tensor(every, b)
    rows = every.view(world, -1)
    return all(torch.equal(rows[0], rows[r]) for r in range(1, world))


def _matrix(rank, world):
    dev = _init(rank)
    comm = tpcomm.Communicator()
    failures, checked, salt = [], 0, 0
    side = torch.cuda.Stream(dev)   # the caller on a stream of its own, for some cases
    for dtype, k, n in ((torch.float32, 24, 40), (torch.bfloat16, 1024, 768)):
        for op in ("all_reduce", "reduce_scatter", "all_gather"):
            for m in (1, 37, 1000):       # rows per rank's share (odd, not divisible by chunks)
                rows = m * world if op == "reduce_scatter" else (m if op == "all_gather"
                                                                 else 3 * m)
                salt += 1
                a, b = _inputs(rows, k, n, rank, dtype, dev, salt)
                ref = _refs(a, b, world, op)
                for i, c in enumerate(CHUNKS):
                    if i % 2:
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):
                            got = _run_op(op, a, b, comm, c)
                            got = got.clone()   # read on the caller's stream right away
                        torch.cuda.current_stream().wait_stream(side)
                    else:
                        got = _run_op(op, a, b, comm, c)
                    ok = _close(got, ref, dtype)
                    same = op != "all_reduce" or _same_on_all_ranks(got, world)
                    if not (ok and same):
                        failures.append(f"{op} {dtype} rows={rows} chunks={c}: ok={ok} "
                                        f"same={same}")
                    checked += 1
                got = _run_op(op, a, b, comm, None, method="fused")   # the fused kernels
                if not (_close(got, ref, dtype) and (op != "all_reduce"
                                                     or _same_on_all_ranks(got, world))):
                    failures.append(f"fused {op} {dtype} rows={rows}")
                checked += 1
    for op in ("matmul_reduce_scatter", "all_gather_matmul", "matmul_all_reduce"):
        if "fused" not in comm.stats()["ops"].get(op, {}):
            failures.append(f"{op}(method='fused') never ran the fused kernel")
    # a prefill shape where the automatic choice pipelines (Llama-70B TP down projection)
    a, b = _inputs(4096, 7168, 8192, rank, torch.bfloat16, dev, 99)
    auto = tpcomm.overlap_chunks("all_reduce", 4096, 7168, 8192, world)
    if not (auto > 1 and _close(tpcomm.matmul_all_reduce(a, b, comm), _refs(a, b, world,
                                                                               "all_reduce"),
                                torch.bfloat16)):
        failures.append(f"prefill shape, auto chunks {auto}")
    torch.cuda.synchronize()
    comm.close()
    dist.destroy_process_group()
    return checked, failures


@pytest.mark.parametrize("world", [pytest.param(2, marks=_needs(2)),
                                   pytest.param(4, marks=_needs(4))])
def test_overlap_ops_match_unfused_nccl(world):
    for rank, (checked, failures) in enumerate(spawn(_matrix, world, env=ENV, timeout_s=420)):
        assert not failures, f"rank {rank}: {failures[:10]}"
        assert checked == 2 * 3 * 3 * (len(CHUNKS) + 1)   # + the fused kernels


def _graph(rank, world):
    dev = _init(rank)
    comm = tpcomm.Communicator()
    a, b = _inputs(96, 32, 48, rank, torch.float32, dev, 5)
    out = torch.empty(96, 48, device=dev)
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tpcomm.matmul_all_reduce(a, b, comm, chunks=3, out=out)   # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tpcomm.matmul_all_reduce(a, b, comm, chunks=3, out=out)
    ok = []
    for salt in (6, 7):   # new inputs after capture
        a2, b2 = _inputs(96, 32, 48, rank, torch.float32, dev, salt)
        a.copy_(a2)
        b.copy_(b2)
        out.fill_(float("nan"))
        graph.replay()
        ok.append(torch.equal(out, _refs(a2, b2, world, "all_reduce")))
    torch.cuda.synchronize()
    comm.close()
    dist.destroy_process_group()
    return ok


@_needs(2)
def test_overlapped_all_reduce_in_a_cuda_graph():
    for rank, ok in enumerate(spawn(_graph, 2, env=ENV, timeout_s=240)):
        assert all(ok), f"rank {rank}: replays {ok}"


# ---------------------------------------------------------------- one GPU
def _world_one(rank, world):
    dev = _init(rank)
    comm = tpcomm.Communicator()
    failures = []
    # a long GEMM per chunk: a collective that did not wait for its chunk's event would copy
    # rows not yet written (the output starts as NaN), a missing join would be read early
    for dtype, k in ((torch.float32, 64), (torch.bfloat16, 4096)):
        a, b = _inputs(4099, k, 4096, rank, dtype, dev, 11)
        full = a @ b
        for c in (2, 3, 8):
            for op in ("all_reduce", "reduce_scatter", "all_gather"):
                got = _run_op(op, a, b, comm, c)
                if not _close(got, full, dtype):
                    failures.append(f"{op} {dtype} chunks={c}")
            got, g = tpcomm.all_gather_matmul(a, b, comm, chunks=c, return_gathered=True)
            if not (torch.equal(g, a) and _close(got, full, dtype)):
                failures.append(f"all_gather return_gathered {dtype} chunks={c}")
    streams = _SIDE_STREAMS.get(comm, {})
    used_side_stream = bool(streams) and all(s != torch.cuda.current_stream(dev)
                                             for s in streams.values())
    torch.cuda.synchronize()
    comm.close()
    dist.destroy_process_group()
    return failures, used_side_stream


@_needs(1)
def test_world_one_streams_and_events_path():
    failures, used_side_stream = spawn(_world_one, 1, env=ENV, timeout_s=240)[0]
    assert not failures, failures
    assert used_side_stream
