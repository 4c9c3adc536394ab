"""Unit tests, no processes: node layouts from torchrun's variables, overrides, group layouts,
the checks on what peers report, and the pure chunking helpers of the two-level all-reduce."""
import pytest

from tpcomm.multinode.hierarchical import (ALIGN_ELEMS, chunk_numel_for, default_chunk_bytes,
                                 plan_chunks)
from tpcomm.groups.topology import (TopologyError, check_gathered_layouts, group_layout,
                             resolve_launch_layout)


def torchrun_env(rank, nnodes, nproc):
    """What torchrun --nnodes nnodes --nproc-per-node nproc gives worker ``rank``."""
    return {"RANK": str(rank), "WORLD_SIZE": str(nnodes * nproc), "LOCAL_RANK": str(rank % nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": str(rank // nproc),
            "GROUP_WORLD_SIZE": str(nnodes)}


def test_torchrun_layout():
    for rank in range(16):
        lay = resolve_launch_layout(rank, 16, torchrun_env(rank, 2, 8))
        assert (lay.local_world_size, lay.nnodes) == (8, 2)
        assert lay.node_of(rank) == rank // 8 and lay.local_rank_of(rank) == rank % 8
        assert "torchrun" in lay.source


def test_no_launcher_variables_means_one_node():
    lay = resolve_launch_layout(3, 4, {})
    assert (lay.local_world_size, lay.nnodes) == (4, 1) and "one node" in lay.source


def test_override_emulates_nodes_inside_a_real_one():
    env = torchrun_env(3, 1, 4)               # torchrun --nproc-per-node 4 on one host
    lay = resolve_launch_layout(3, 4, env, override=2)
    assert (lay.local_world_size, lay.nnodes, lay.node_of(3)) == (2, 2, 1)
    assert lay.source == "TPCOMM_LOCAL_WORLD_SIZE=2"
    # the argument beats the variable
    assert resolve_launch_layout(3, 4, env, override=2, argument=1).local_world_size == 1
    # emulated nodes inside real multi-node jobs: 2 real nodes of 4 -> 4 emulated nodes of 2
    lay = resolve_launch_layout(5, 8, torchrun_env(5, 2, 4), override=2)
    assert (lay.nnodes, lay.node_of(5)) == (4, 2)


@pytest.mark.parametrize("rank,world,env,kw,match", [
    # 3 ranks per node do not tile 4 ranks
    (0, 4, {}, {"override": 3}, r"does not divide the world size 4.*\[1, 2, 4\]"),
    (0, 4, {}, {"argument": 8}, "does not divide the world size"),
    (0, 4, {}, {"argument": 0}, "must be >= 1"),
    # an emulated node of 4 would span the two real nodes of 2
    (0, 4, torchrun_env(0, 2, 2), {"override": 4}, "span two real nodes"),
    # 6 per node tiles the world of 12 but not the real nodes of 4
    (0, 12, torchrun_env(0, 3, 4), {"override": 6}, "span two real nodes"),
    # a launcher that did not number ranks node by node
    (1, 4, {**torchrun_env(1, 2, 2), "LOCAL_RANK": "0"}, {}, "LOCAL_RANK=0"),
    (2, 4, {**torchrun_env(2, 2, 2), "GROUP_RANK": "0"}, {}, "GROUP_RANK=0"),
    (0, 4, {**torchrun_env(0, 2, 2), "GROUP_WORLD_SIZE": "3"}, {}, "GROUP_WORLD_SIZE=3"),
    (0, 6, {"LOCAL_WORLD_SIZE": "4"}, {}, "LOCAL_WORLD_SIZE=4"),
    (0, 4, {"LOCAL_WORLD_SIZE": "two"}, {}, "not an integer"),
    (4, 4, {}, {}, "not in a world"),
])
def test_inconsistent_launch_layouts_are_refused_clearly(rank, world, env, kw, match):
    with pytest.raises(TopologyError, match=match):
        resolve_launch_layout(rank, world, env, **kw)


def test_group_layout_of_the_world():
    lay = group_layout(range(8), resolve_launch_layout(0, 8, {}, argument=4))
    assert lay.nodes == ((0, 1, 2, 3), (4, 5, 6, 7)) and lay.node_ids == (0, 1)
    assert lay.uniform and lay.ranks_per_node == 4 and lay.nnodes == 2
    assert lay.inter_node_ranks() == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert lay.node_index(6) == 1 and lay.local_index(6) == 2
    assert "node 1: ranks [4, 5, 6, 7]" in lay.describe()


def test_group_layout_of_a_sub_group_uses_group_ranks():
    launch = resolve_launch_layout(0, 8, {}, argument=4)
    # a TP group of global ranks 2, 3, 6, 7: two per node; group ranks 0..3
    lay = group_layout([2, 3, 6, 7], launch)
    assert lay.nodes == ((0, 1), (2, 3)) and lay.node_ids == (0, 1)
    assert lay.inter_node_ranks() == ((0, 2), (1, 3))
    # unsorted group order (new_group(sort_ranks=False)): nodes still by global rank
    lay = group_layout([6, 2, 7, 3], launch)
    assert lay.nodes == ((1, 3), (0, 2))
    assert [lay.global_ranks[r] for r in lay.nodes[1]] == [6, 7]
    # a group inside one node: one node, no network
    assert group_layout([4, 5], launch).nnodes == 1


def test_uneven_group_is_refused_with_the_counts():
    launch = resolve_launch_layout(0, 8, {}, argument=4)
    lay = group_layout([3, 4, 5], launch)
    assert not lay.uniform
    with pytest.raises(TopologyError, match="node 0: 1, node 1: 2"):
        lay.require_uniform()
    with pytest.raises(TopologyError, match="twice"):
        group_layout([1, 1], launch)
    with pytest.raises(TopologyError, match="outside the world"):
        group_layout([1, 9], launch)


def test_checks_on_what_the_peers_report():
    launch = resolve_launch_layout(0, 4, {}, argument=2)
    lay = group_layout(range(4), launch)
    same = [{"lws": 2, "source": lay.source, "host": "h"} for _ in range(4)]
    assert check_gathered_layouts(lay, same) == []          # emulation: one host, fine
    real = [{"lws": 2, "source": lay.source, "host": f"h{r // 2}"} for r in range(4)]
    assert check_gathered_layouts(lay, real) == []
    split = [{"lws": 2, "source": lay.source, "host": f"h{r % 2}"} for r in range(4)]
    msgs = check_gathered_layouts(lay, split)
    assert len(msgs) == 2 and "node 0" in msgs[0] and "different hosts" in msgs[0]
    differ = [dict(s, lws=4 if r == 3 else 2) for r, s in enumerate(same)]
    (msg,) = check_gathered_layouts(lay, differ)
    assert "disagree on the ranks per node" in msg


def test_plan_chunks_cover_the_message_and_pad_only_the_tail():
    for numel, L, c in [(1, 2, 32), (7, 4, 64), (64, 2, 32), (1000, 3, 48), (100003, 8, 1024)]:
        chunks = plan_chunks(numel, L, c)
        assert chunks[0][0] == 0 and chunks[-1][1] == numel
        for (lo, hi, padded), nxt in zip(chunks, chunks[1:] + [None]):
            assert padded % L == 0 and padded - (hi - lo) < L
            if nxt is not None:
                assert nxt[0] == hi and hi - lo == c == padded
    assert plan_chunks(0, 2, 32) == []
    with pytest.raises(ValueError):
        plan_chunks(10, 3, 32)


def test_chunk_sizes():
    assert chunk_numel_for(4096, 4, 2) == 1024
    assert chunk_numel_for(1, 2, 3) == 3 * ALIGN_ELEMS         # at least one aligned block
    assert chunk_numel_for(1 << 20, 2, 8) % (8 * ALIGN_ELEMS) == 0
    # CPU rule: one chunk below 2 MiB, then about four of 1-16 MiB
    assert default_chunk_bytes(4096) == 4096
    assert default_chunk_bytes(8 << 20) == 2 << 20
    assert default_chunk_bytes(256 << 20) == 16 << 20
    assert default_chunk_bytes(3 << 20) == 1 << 20
    # GPU: the cost model's pick: small messages whole, large ones in a few chunks
    assert default_chunk_bytes(64 << 10, 2, 8, "cuda") == 64 << 10
    big = default_chunk_bytes(256 << 20, 2, 8, "cuda")
    assert 1 << 20 <= big < 256 << 20 and (256 << 20) % big == 0
