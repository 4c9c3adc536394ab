"""Two-level all-reduce on emulated nodes of one GPU host.

4 GPUs as 2 "nodes" x 2 GPUs, and 2 GPUs as 2 x 1: each emulated node gets its own
``NCCL_HOSTID``, so NCCL connects the nodes through NET/Socket over loopback
(``NCCL_SOCKET_IFNAME=lo``, InfiniBand off) and keeps P2P inside each; the inter-node leg of the
two-level all-reduce really goes through NCCL's network transport. Layout from
``TPCOMM_LOCAL_WORLD_SIZE``. Multicast (NVLS) stays off in every rank.

Exact-sum inputs (small integers), so the comparison with a flat NCCL all-reduce over the same
emulated topology is bitwise; outputs poisoned first; results compared bitwise across ranks.

Skipped, visibly, without enough GPUs. Written on a CPU-only machine and not run there: the
first GPU run is the first real test of this file (see docs/multinode.md).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tpcomm.groups.launch import spawn
from tpcomm.testing import exact

pytestmark = pytest.mark.gpu

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
       "NVSHMEM_DISABLE_NVLS": "1", "NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1",
       "PYTHONUNBUFFERED": "1"}
FAST = [torch.bfloat16, torch.float16, torch.float32]
# through NCCL on the intra-node group too (tpcomm has no kernel for them)
OTHER = [torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8]
# bytes: 4 B and 8196 B (odd element counts), a 16-byte multiple, sizes around the pipeline
# threshold, and sizes over the 32 MiB intra-node buffer; +2/+6 make the padding path run
NBYTES = [4, 8196, 2 << 10, (256 << 10) + 6, (1 << 20) + 2, 8 << 20, (64 << 20) + 6]


def _needs(n):
    return pytest.mark.skipif(torch.cuda.device_count() < n,
                              reason=f"needs {n} GPUs, found {torch.cuda.device_count()}")


def _init_emulated(rank: int, ranks_per_node: int) -> torch.device:
    """One NCCL "host" per emulated node; must run before NCCL starts."""
    os.environ["NCCL_HOSTID"] = f"tpcomm-fakenode{rank // ranks_per_node}"
    os.environ["TPCOMM_LOCAL_WORLD_SIZE"] = str(ranks_per_node)
    from tpcomm.settings import reload_settings
    reload_settings()
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    return torch.device("cuda", rank)


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _same_on_all_ranks(t, world):
    b = _bits(t).reshape(-1)
    every = torch.empty(world * b.numel(), dtype=b.dtype, device=b.device)
    dist.all_gather_into_tensor(every, b)
    rows = every.view(world, -1)
    return all(torch.equal(rows[0], rows[r]) for r in range(1, world))


def _poison(t):
    return torch.full_like(t, float("nan") if t.is_floating_point() else 99)


def _matrix(rank, world, ranks_per_node, chunk_bytes):
    from tpcomm import HierarchicalAllReduce
    dev = _init_emulated(rank, ranks_per_node)
    ar = HierarchicalAllReduce(chunk_bytes=chunk_bytes)
    info = {"nnodes": ar.nnodes, "ranks_per_node": ar.ranks_per_node,
            "intra": ar.intra.backend_name if ar.intra else None,
            "intra_reason": ar.intra.disabled_reason if ar.intra else None,
            "intra_ranks": dist.get_process_group_ranks(ar.intra_group) if ar.intra else None,
            "inter_ranks": dist.get_process_group_ranks(ar.inter_group)}
    failures, checked, salt = [], 0, 0
    for dtype in FAST + OTHER:
        for nbytes in NBYTES:
            if dtype in OTHER and nbytes > (8 << 20):
                continue
            salt += 1
            n = max(1, nbytes // dtype.itemsize)
            x = exact(n, rank, dtype, salt, device=dev)
            ref = x.clone()
            dist.all_reduce(ref)                      # flat NCCL over the same emulated nodes
            out = _poison(x)
            ar.all_reduce(x, out=out)
            y = x.clone()
            ar.all_reduce_(y)
            torch.cuda.synchronize()
            ok = (torch.equal(_bits(out), _bits(ref)) and torch.equal(_bits(y), _bits(ref))
                  and torch.equal(x, exact(n, rank, dtype, salt, device=dev)))
            same = _same_on_all_ranks(out, world)
            if not (ok and same):
                bad = (out != ref).nonzero()[:5].flatten().tolist()
                failures.append(f"{dtype} {nbytes}B: ok={ok} same={same} first bad {bad}")
            checked += 1
    # random inputs: sums round, results must still be bitwise equal on every rank
    g = torch.Generator(device=dev).manual_seed(11 + rank)
    for dtype in FAST:
        x = torch.randn(3_000_001, generator=g, device=dev).to(dtype)
        if not _same_on_all_ranks(ar.all_reduce(x), world):
            failures.append(f"{dtype} random: results differ across ranks")
    torch.cuda.synchronize()
    stats = ar.stats()
    ar.close()
    dist.destroy_process_group()
    return checked, failures, info, stats


@_needs(4)
@pytest.mark.parametrize("chunk_bytes", [None, 256 << 10])    # cost model's chunks; many small
def test_two_nodes_of_two_gpus_match_flat_nccl(chunk_bytes):
    results = spawn(_matrix, 4, 2, chunk_bytes, env=ENV, timeout_s=540)
    for rank, (checked, failures, info, stats) in enumerate(results):
        assert not failures, f"rank {rank}: {failures[:10]}"
        assert (info["nnodes"], info["ranks_per_node"]) == (2, 2)
        node = rank // 2
        assert info["intra_ranks"] == [2 * node, 2 * node + 1]        # never across nodes
        assert info["inter_ranks"] == [rank % 2, rank % 2 + 2]
        # tpcomm's GPU kernels inside each emulated node (reason printed if not)
        assert info["intra"] == "p2p", info["intra_reason"]
        assert stats["paths"]["two_level"]["chunks"] > stats["paths"]["two_level"]["calls"]


@_needs(2)
def test_two_nodes_of_one_gpu_match_flat_nccl():
    for rank, (checked, failures, info, stats) in enumerate(
            spawn(_matrix, 2, 1, None, env=ENV, timeout_s=540)):
        assert not failures, f"rank {rank}: {failures[:10]}"
        assert (info["nnodes"], info["ranks_per_node"], info["intra"]) == (2, 1, None)
        assert list(stats["paths"]) == ["inter"]


def _graph(rank, world):
    """Capturing a two-level all-reduce raises on every rank, at once, instead of hanging (its
    capture hung on the first GPU run, 2026-11-22); the object stays usable eagerly."""
    from tpcomm.errors import TpcommError
    from tpcomm import HierarchicalAllReduce
    dev = _init_emulated(rank, 2)
    ar = HierarchicalAllReduce(chunk_bytes=1 << 20)
    n = (4 << 20) // 2 + 3
    x = exact(n, rank, torch.bfloat16, 0, device=dev)
    out = torch.empty_like(x)
    ar.all_reduce(x, out=out)
    torch.cuda.synchronize()
    failures = []
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            ar.all_reduce(x, out=out)
        failures.append("capture did not raise")
    except TpcommError as e:
        if "CUDA graph" not in str(e):
            failures.append(f"unclear error: {e}")
    ref = x.clone()
    dist.all_reduce(ref)
    ar.all_reduce(x, out=out)
    torch.cuda.synchronize()
    if not torch.equal(_bits(out), _bits(ref)):
        failures.append("eager call after the refused capture: wrong")
    ar.close()
    dist.destroy_process_group()
    return failures


@_needs(4)
def test_two_level_capture_is_refused_not_hung():
    for rank, failures in enumerate(spawn(_graph, 4, env=ENV, timeout_s=300)):
        assert not failures, f"rank {rank}: {failures}"
