"""Two-level all-reduce on emulated nodes: 4 processes on one host as 2 nodes x 2 ranks
(TPCOMM_LOCAL_WORLD_SIZE=2), and, in the same processes, 4 x 1, 1 x 4, 2 x 1 and 3 x 1 layouts
on the world and on sub-groups. Intra-node legs run through tpcomm's shared-memory Communicator,
the inter-node leg through gloo (TCP over loopback).

Inputs are small integers, so every sum is exact and the comparison with a flat gloo all-reduce
is bitwise; outputs are poisoned first. Four processes on the 2-core CI machine are slow, so one
spawn covers every layout.
"""
import hashlib

import pytest
import torch
import torch.distributed as dist

import tpcomm
from _dist import exact_input, init_gloo, run
from tpcomm.errors import TpcommError
from tpcomm import HierarchicalAllReduce
from tpcomm.groups.topology import TopologyError

pytestmark = pytest.mark.cpu

# int16 is missing: gloo cannot reduce it (flat or not)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int8, torch.uint8]
# odd sizes (1, 3, 7, 2049 elements: never a multiple of 2 ranks x 16), one exact multiple, and
# one of 10-40 chunks of 4 KiB, so the pipeline with two chunks in flight and the padded tail run
NUMELS = [1, 3, 7, 64, 2049, 40001]
CHUNK = 4 << 10


def _digest(t):
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _poison(t):
    return torch.full_like(t, float("nan") if t.is_floating_point() else 99)


def _check_matrix(ar, rank, group=None, salt=0):
    """Every dtype and size against a flat gloo all-reduce over the same ranks; returns count."""
    n_checked = 0
    for dtype in DTYPES:
        for n in NUMELS:
            x = exact_input(n, rank, dtype, salt)
            ref = x.clone()
            dist.all_reduce(ref, group=group)
            out = _poison(x)
            assert ar.all_reduce(x, out=out) is out
            assert torch.equal(out, ref), (dtype, n)
            y = x.clone()
            assert ar.all_reduce_(y) is y and torch.equal(y, ref), (dtype, n, "in place")
            n_checked += 1
    return n_checked


def _random_digests(ar, rank):
    """Inputs whose sums round: every rank must still get bitwise the same bytes."""
    g = torch.Generator().manual_seed(77 + rank)
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(12345, generator=g).to(dtype)
        out.append(_digest(ar.all_reduce(x)))
    return out


def _emulated_nodes(rank, world):
    init_gloo()
    report = {}
    # --- 2 nodes x 2 ranks, from TPCOMM_LOCAL_WORLD_SIZE=2 (set by the test for every rank)
    with HierarchicalAllReduce(max_bytes=64 << 10, chunk_bytes=CHUNK) as ar:
        assert (ar.nnodes, ar.ranks_per_node) == (2, 2)
        assert "TPCOMM_LOCAL_WORLD_SIZE=2" in ar.layout.source
        node = rank // 2
        # the intra-node Communicator never reaches across the node boundary
        assert dist.get_process_group_ranks(ar.intra_group) == [2 * node, 2 * node + 1]
        assert dist.get_process_group_ranks(ar.inter_group) == [rank % 2, rank % 2 + 2]
        assert ar.intra.backend_name == "shm" and ar.transport.name == "torch"
        report["2x2"] = _check_matrix(ar, rank)
        x = exact_input(6 * 35, rank, torch.float32).view(6, 35)   # any shape
        ref = x.clone()
        dist.all_reduce(ref)
        assert torch.equal(ar.all_reduce(x), ref)
        assert torch.equal(ar.all_reduce(x, algorithm="torch"), ref)
        report["digests"] = _random_digests(ar, rank)
        paths = ar.stats()["paths"]
        report["pipelined"] = paths["two_level"]["chunks"] > paths["two_level"]["calls"]
    # --- 4 nodes x 1 (only the network leg) and 1 node x 4 (only the intra-node leg)
    for lws, path in ((1, "inter"), (4, "intra")):
        with HierarchicalAllReduce(local_world_size=lws, chunk_bytes=CHUNK) as ar:
            assert (ar.nnodes, ar.ranks_per_node) == (4 // lws, lws)
            for dtype in (torch.float32, torch.bfloat16, torch.int64):
                x = exact_input(2049, rank, dtype)
                ref = x.clone()
                dist.all_reduce(ref)
                assert torch.equal(ar.all_reduce(x), ref), (lws, dtype)
            assert list(ar.stats()["paths"]) == [path]
    # --- sub-groups: only their members build the object (torch's local-synchronization
    # path). new_group is collective over the world, and each rank joins exactly one group of
    # every partition, so all members have created equally many groups (which that path needs)
    g02, g13 = dist.new_group([0, 2]), dist.new_group([1, 3])
    g012, _ = dist.new_group([0, 1, 2]), dist.new_group([3])
    g123, _ = dist.new_group([1, 2, 3]), dist.new_group([0])
    if rank in (0, 2):                     # 2 nodes x 1 rank
        with HierarchicalAllReduce(g02, local_world_size=2, chunk_bytes=CHUNK) as ar:
            assert (ar.nnodes, ar.ranks_per_node) == (2, 1)
            report["2x1"] = _check_matrix(ar, ar.rank, g02, salt=3)
    else:                                  # the other sub-group at the same time
        with HierarchicalAllReduce(g13, local_world_size=2) as ar:
            assert (ar.nnodes, ar.ranks_per_node) == (2, 1)
    if rank in (0, 1, 2):                  # 3 nodes x 1 rank
        with HierarchicalAllReduce(g012, local_world_size=1, chunk_bytes=CHUNK) as ar:
            assert (ar.nnodes, ar.ranks_per_node) == (3, 1)
            for dtype in (torch.float32, torch.bfloat16):
                x = exact_input(7001, ar.rank, dtype)
                ref = x.clone()
                dist.all_reduce(ref, group=g012)
                assert torch.equal(ar.all_reduce(x), ref)
            report["3x1"] = True
    if rank in (1, 2, 3):                  # rank 1 alone on node 0, ranks 2-3 on node 1: refused
        try:
            HierarchicalAllReduce(g123, local_world_size=2)
            report["uneven"] = "built"
        except TopologyError as e:
            report["uneven"] = str(e)
    # members that created different numbers of groups: refused on both, nobody hangs
    dist.new_group([0, 1])                 # registers on ranks 0 and 1 only
    if rank in (0, 2):
        try:
            HierarchicalAllReduce(g02, local_world_size=1)
            report["counts"] = "built"
        except TpcommError as e:
            report["counts"] = str(e)
    # --- ranks that disagree on the layout: every rank refuses, none hangs
    try:
        HierarchicalAllReduce(local_world_size=2 if rank < 2 else 4)
        report["disagree"] = "built"
    except TopologyError as e:
        report["disagree"] = str(e)
    # --- the Communicator of a group that spans nodes: all_reduce from TWO_LEVEL_MIN_BYTES to _MAX_BYTES
    # through the two-level algorithm, the rest through torch.distributed
    with tpcomm.Communicator() as comm:
        assert comm.backend_name == "two_level", comm.disabled_reason
        for n in (7, (256 << 10) // 4 + 1, (2 << 20) // 4 - 3, (3 << 20) // 4 + 1):
            x = exact_input(n, rank, torch.float32)
            ref = x.clone()
            dist.all_reduce(ref)
            assert torch.equal(comm.all_reduce(x), ref), n
        xs = exact_input(4 * 10, rank, torch.float32)
        ref = torch.empty(10)
        dist.reduce_scatter_tensor(ref, xs)
        assert torch.equal(comm.reduce_scatter(xs), ref)
        ops = comm.stats()["ops"]
        report["communicator"] = (ops["all_reduce"]["two_level"]["calls"],
                                  ops["all_reduce"]["torch"]["calls"])
    dist.barrier()
    return report


def test_emulated_multinode_layouts_match_flat_gloo():
    reports = run(_emulated_nodes, 4, env={"TPCOMM_LOCAL_WORLD_SIZE": "2", "TPCOMM_QUIET": "1"})
    per_layout = len(DTYPES) * len(NUMELS)
    assert [r["2x2"] for r in reports] == [per_layout] * 4
    assert reports[0]["2x1"] == reports[2]["2x1"] == per_layout
    assert all(reports[r]["3x1"] for r in (0, 1, 2))
    assert all(r["pipelined"] for r in reports)
    # bitwise the same on every rank, for inputs whose sums round
    assert reports[0]["digests"] == reports[1]["digests"] == reports[2]["digests"] \
        == reports[3]["digests"]
    for r in (1, 2, 3):
        assert "spread unevenly" in reports[r]["uneven"] and "node 0: 1, node 1: 2" in \
            reports[r]["uneven"], reports[r]["uneven"]
    for r in reports:
        assert "disagree on the ranks per node" in r["disagree"], r["disagree"]
    for r in (0, 2):
        assert "different numbers of torch.distributed groups" in reports[r]["counts"]
    assert [r["communicator"] for r in reports] == [(2, 2)] * 4


def test_transport_not_built_is_said_plainly():
    from tpcomm.multinode.transport import make_transport
    with pytest.raises(NotImplementedError, match="not implemented"):
        make_transport("nvshmem", None)
    with pytest.raises(ValueError, match="unknown inter-node transport"):
        make_transport("carrier-pigeon", None)
    assert issubclass(TopologyError, TpcommError)


def test_benchmark_script_checks_and_times(tmp_path, capsys):
    """python -m tpcomm.bench.two_level end to end, 2 ranks as 2 nodes x 1, tiny sizes (the
    GPU run that produces the timing table uses the same script)."""
    from tpcomm.bench import two_level as hierarchical_bench
    md = tmp_path / "h.md"
    rc = hierarchical_bench.main(["--nproc", "2", "--ranks-per-node", "1", "--device", "cpu",
                                  "-b", "4K", "-e", "64K", "--iters", "2", "--reps", "1",
                                  "--markdown", str(md)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "nodes=2, ranks_per_node=1" in out and "flat / two-level" in out
    table = md.read_text()
    assert table.count("| float32 |") == 3 and "#wrong" in table
