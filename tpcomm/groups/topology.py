"""Where the ranks are: nodes and local ranks, taken from the launch, for a given group.

A node is a contiguous block of ``local_world_size`` global ranks: global rank ``g`` lives on node
``g // local_world_size`` with local rank ``g % local_world_size``. That is how torchrun numbers
its workers (``RANK = GROUP_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK`` with ``--nproc-per-node``
workers on each of ``--nnodes`` agents), and it is checked against torchrun's variables whenever
they are there.

Where ``local_world_size`` comes from, first match wins:

1. the ``local_world_size`` argument of the object being built (tests, tools);
2. ``TPCOMM_LOCAL_WORLD_SIZE`` (through :func:`tpcomm.settings.get_settings`): emulate several
   nodes on one host, e.g. 4 processes as 2 "nodes" x 2. Emulated nodes must nest inside real
   ones (the value must divide torchrun's ``LOCAL_WORLD_SIZE``), so an intra-node kernel can never
   be asked to reach a process on another machine;
3. torchrun's ``LOCAL_WORLD_SIZE``;
4. nothing set: every rank on one node (and :func:`verify_layout` refuses a "node" whose ranks
   report different host names).

The hostname is never used to *decide* the layout, only to check it: emulated nodes share one.

The pure helpers (:func:`resolve_launch_layout`, :func:`group_layout`) take everything as
arguments and are tested without processes; :func:`launch_layout_from_env` and
:func:`verify_layout` are the two places that look at the process and its peers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Mapping

from ..errors import TpcommError


class TopologyError(TpcommError, ValueError):
    """The launch describes a layout of ranks on nodes that tpcomm cannot use or trust."""


@dataclasses.dataclass(frozen=True)
class LaunchLayout:
    """The nodes of the whole job (the default process group)."""
    world_size: int
    local_world_size: int        # ranks per node (emulated or real)
    source: str                  # where local_world_size came from, for messages

    @property
    def nnodes(self) -> int:
        return self.world_size // self.local_world_size

    def node_of(self, global_rank: int) -> int:
        return global_rank // self.local_world_size

    def local_rank_of(self, global_rank: int) -> int:
        return global_rank % self.local_world_size


def _env_int(environ: Mapping, name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or str(raw).strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise TopologyError(f"{name}={raw!r} (set by the launcher) is not an integer") from None


def resolve_launch_layout(rank: int, world_size: int, environ: Mapping, *,
                          override: int | None = None,
                          argument: int | None = None) -> LaunchLayout:
    """The job's node layout from torchrun's variables in ``environ`` and the overrides.

    rank, world_size: this process in the default group. ``override`` is
    TPCOMM_LOCAL_WORLD_SIZE, ``argument`` an explicit value; both may be None.
    Raises :class:`TopologyError` with the variable to fix for any inconsistent layout.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise TopologyError(f"rank {rank} is not in a world of {world_size}")
    launch_lws = _env_int(environ, "LOCAL_WORLD_SIZE")
    local_rank = _env_int(environ, "LOCAL_RANK")
    node_rank = _env_int(environ, "GROUP_RANK")            # torchrun: this agent's node index
    nnodes = _env_int(environ, "GROUP_WORLD_SIZE")         # torchrun: number of agents (nodes)
    if argument is not None:
        lws, source = argument, f"local_world_size={argument}"
    elif override is not None:
        lws, source = override, f"TPCOMM_LOCAL_WORLD_SIZE={override}"
    elif launch_lws is not None:
        lws, source = launch_lws, f"LOCAL_WORLD_SIZE={launch_lws} (torchrun)"
    else:
        lws, source = world_size, "default (no LOCAL_WORLD_SIZE: one node)"
    if lws < 1:
        raise TopologyError(f"{source}: ranks per node must be >= 1")
    if lws > world_size or world_size % lws:
        raise TopologyError(
            f"{source} does not divide the world size {world_size}: nodes are contiguous blocks "
            f"of the same number of ranks, so it must be one of "
            f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}")
    # torchrun's own variables must agree with contiguous blocks, or the launch is not torchrun's
    if launch_lws is not None:
        if launch_lws < 1 or world_size % launch_lws:
            raise TopologyError(f"LOCAL_WORLD_SIZE={launch_lws} (torchrun) does not divide the "
                                f"world size {world_size}; nodes with different numbers of ranks "
                                f"are not supported")
        if local_rank is not None and local_rank != rank % launch_lws:
            raise TopologyError(
                f"rank {rank} has LOCAL_RANK={local_rank} but LOCAL_WORLD_SIZE={launch_lws} "
                f"puts it at local rank {rank % launch_lws}: the launcher did not number ranks "
                f"node by node (RANK = node * LOCAL_WORLD_SIZE + LOCAL_RANK), which tpcomm needs")
        if node_rank is not None and node_rank != rank // launch_lws:
            raise TopologyError(
                f"rank {rank} has GROUP_RANK={node_rank} (its node) but LOCAL_WORLD_SIZE="
                f"{launch_lws} puts it on node {rank // launch_lws}: ranks are not numbered node "
                f"by node")
        if nnodes is not None and nnodes * launch_lws != world_size:
            raise TopologyError(f"GROUP_WORLD_SIZE={nnodes} nodes x LOCAL_WORLD_SIZE={launch_lws} "
                                f"!= world size {world_size}")
        if lws != launch_lws and launch_lws % lws:
            raise TopologyError(
                f"{source} does not divide torchrun's LOCAL_WORLD_SIZE={launch_lws}: an emulated "
                f"node would span two real nodes, and intra-node kernels cannot reach across "
                f"machines. Use a divisor of {launch_lws}")
    return LaunchLayout(world_size=world_size, local_world_size=lws, source=source)


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """How one group's ranks sit on nodes.

    ``nodes[k]`` lists the group ranks on the k-th node the group touches (nodes in ascending
    launch order, ranks ascending within a node); ``node_ids[k]`` is that node's launch index.
    """
    global_ranks: tuple[int, ...]       # group rank -> global rank
    nodes: tuple[tuple[int, ...], ...]
    node_ids: tuple[int, ...]
    local_world_size: int               # of the launch (a node may hold fewer of this group)
    source: str

    @property
    def world_size(self) -> int:
        return len(self.global_ranks)

    @property
    def nnodes(self) -> int:
        return len(self.nodes)

    @property
    def uniform(self) -> bool:
        """Every node holds the same number of the group's ranks."""
        return len({len(n) for n in self.nodes}) == 1

    @property
    def ranks_per_node(self) -> int:
        self.require_uniform()
        return len(self.nodes[0])

    def node_index(self, group_rank: int) -> int:
        """Which of ``nodes`` holds this group rank."""
        for k, members in enumerate(self.nodes):
            if group_rank in members:
                return k
        raise ValueError(f"group rank {group_rank} is not in a group of {self.world_size}")

    def local_index(self, group_rank: int) -> int:
        """Position of the group rank among the group's ranks on its node."""
        return self.nodes[self.node_index(group_rank)].index(group_rank)

    def intra_node_ranks(self) -> tuple[tuple[int, ...], ...]:
        """Group ranks of each node: the sub-groups the intra-node collectives run on."""
        return self.nodes

    def inter_node_ranks(self) -> tuple[tuple[int, ...], ...]:
        """For each local index j, the j-th rank of every node: the cross-node sub-groups."""
        L = self.ranks_per_node
        return tuple(tuple(node[j] for node in self.nodes) for j in range(L))

    def require_uniform(self) -> None:
        if not self.uniform:
            counts = ", ".join(f"node {i}: {len(n)}" for i, n in zip(self.node_ids, self.nodes))
            raise TopologyError(
                f"the group's ranks are spread unevenly over nodes ({counts}; {self.source}); "
                f"the two-level all-reduce needs the same number of the group's ranks on every "
                f"node")

    def describe(self) -> str:
        g = self.global_ranks
        parts = [f"node {i}: ranks {[g[r] for r in n]}" for i, n in zip(self.node_ids, self.nodes)]
        return f"{self.nnodes} node(s) ({self.source}): " + "; ".join(parts)


def group_layout(global_ranks, launch: LaunchLayout) -> GroupLayout:
    """Nodes of a group given its members' global ranks (in group-rank order)."""
    global_ranks = tuple(int(g) for g in global_ranks)
    if not global_ranks:
        raise TopologyError("a group has no ranks")
    if len(set(global_ranks)) != len(global_ranks):
        raise TopologyError(f"a group lists a rank twice: {global_ranks}")
    bad = [g for g in global_ranks if not 0 <= g < launch.world_size]
    if bad:
        raise TopologyError(f"ranks {bad} are outside the world of {launch.world_size}")
    by_node: dict[int, list[int]] = {}
    for r, g in enumerate(global_ranks):
        by_node.setdefault(launch.node_of(g), []).append(r)
    ids = tuple(sorted(by_node))
    return GroupLayout(global_ranks=global_ranks,
                       nodes=tuple(tuple(sorted(by_node[i], key=lambda r: global_ranks[r]))
                                   for i in ids),
                       node_ids=ids, local_world_size=launch.local_world_size,
                       source=launch.source)


# ---------------------------------------------------------------------- the process and its peers
def launch_layout_from_env(local_world_size: int | None = None) -> LaunchLayout:
    """:func:`resolve_launch_layout` for this process (torch.distributed must be initialized)."""
    import torch.distributed as dist

    from ..settings import get_settings
    return resolve_launch_layout(dist.get_rank(), dist.get_world_size(), os.environ,
                                 override=get_settings().local_world_size,
                                 argument=local_world_size)


def layout_of(info, local_world_size: int | None = None) -> GroupLayout:
    """The node layout of a group (``info``: a :class:`tpcomm.groups.group.GroupInfo`). Not collective:
    every rank computes it from its own environment; :func:`verify_layout` checks they agree."""
    return group_layout(info.global_ranks, launch_layout_from_env(local_world_size))


def verify_layout(info, layout: GroupLayout, timeout_s: float) -> None:
    """Collective over ``info``'s group: every rank must see the same layout, and the ranks of
    one node must run on one host. Every rank reaches the same verdict from the same gathered
    data, so all raise (or none does): nobody is left waiting in a later collective."""
    from .group import GroupStore
    store = GroupStore(info, "topology", timeout_s)
    mine = {"lws": layout.local_world_size, "source": layout.source, "host": socket.gethostname()}
    seen = [json.loads(v) for v in store.all_gather("layout", json.dumps(mine))]
    problems = check_gathered_layouts(layout, seen)
    if problems:
        raise TopologyError("inconsistent node layout of the group: " + "; ".join(problems))


def check_gathered_layouts(layout: GroupLayout, seen: list[dict]) -> list[str]:
    """What is wrong with the layouts every group rank reported (pure; empty list: fine).

    ``seen[r]`` = {"lws", "source", "host"} of group rank r.
    """
    problems = []
    lws = {(s["lws"], s["source"]) for s in seen}
    if len({s["lws"] for s in seen}) > 1:
        by = ", ".join(f"rank {layout.global_ranks[r]}: {s['source']}" for r, s in enumerate(seen))
        problems.append(f"ranks disagree on the ranks per node ({by}); set "
                        f"TPCOMM_LOCAL_WORLD_SIZE to the same value on every rank")
    elif len(lws) == 1:
        for node_id, members in zip(layout.node_ids, layout.nodes):
            hosts = {seen[r]["host"] for r in members}
            if len(hosts) > 1:
                problems.append(
                    f"node {node_id} ({layout.source}) holds ranks "
                    f"{[layout.global_ranks[r] for r in members]} that run on different hosts "
                    f"{sorted(hosts)}; launch with torchrun (it sets LOCAL_WORLD_SIZE) or set "
                    f"TPCOMM_LOCAL_WORLD_SIZE to the processes per host")
    return problems
