"""What tpcomm needs from a torch.distributed process group: ranks, and a key-value store.

Rendezvous, tokens and handle exchange go through torch.distributed's own store (the one the
launcher set up), under a prefix unique to the group and to the n-th tpcomm object created on it;
nothing here launches processes or discovers peers by itself.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import threading

import torch.distributed as dist

from ..errors import TpcommError

_instances: collections.Counter = collections.Counter()
_instances_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    group: object           # the ProcessGroup
    rank: int               # rank in the group
    world_size: int
    global_ranks: tuple     # group rank -> global rank
    backend: str            # "gloo", "nccl", ...

    @classmethod
    def of(cls, group=None) -> "GroupInfo":
        if not dist.is_available() or not dist.is_initialized():
            raise TpcommError("tpcomm needs torch.distributed initialized first: call "
                              "torch.distributed.init_process_group(...) (or launch with torchrun)")
        group = group if group is not None else dist.group.WORLD
        rank = dist.get_rank(group)
        if rank < 0:
            raise TpcommError("this process is not a member of the group given to tpcomm")
        return cls(group=group, rank=rank, world_size=dist.get_world_size(group),
                   global_ranks=tuple(dist.get_process_group_ranks(group)),
                   backend=str(dist.get_backend(group)))


class GroupStore:
    """The launcher's store, prefixed for one tpcomm object on one group.

    Every member creates its tpcomm objects on a group in the same order (they are collective),
    so the n-th object on ranks (0, 1, 2, 3) gets the same prefix in every process.
    """

    def __init__(self, info: GroupInfo, kind: str, timeout_s: float):
        key = (kind, info.global_ranks)
        with _instances_lock:
            _instances[key] += 1
            n = _instances[key]
        ranks = "-".join(map(str, info.global_ranks))
        self.prefix = f"tpcomm/{kind}/{ranks}/{n}/"
        self.info = info
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._store = dist.distributed_c10d._get_default_store()

    def set(self, key: str, value: bytes | str) -> None:
        self._store.set(self.prefix + key, value)

    def get(self, key: str, what: str = "") -> bytes:
        self.wait([key], what)
        return self._store.get(self.prefix + key)

    def wait(self, keys: list[str], what: str = "") -> None:
        try:
            self._store.wait([self.prefix + k for k in keys], self.timeout)
        except Exception as e:  # torch raises DistStoreError / RuntimeError on timeout
            missing = [k for k in keys if not self._store.check([self.prefix + k])]
            raise TpcommError(
                f"tpcomm setup ({what or 'rendezvous'}): rank {self.info.rank} waited "
                f"{self.timeout.total_seconds():g} s for keys {missing} of the peers: "
                f"{type(e).__name__}: {e}") from e

    def all_gather(self, name: str, value: bytes | str) -> list[bytes]:
        """Every rank's ``value`` in rank order."""
        self.set(f"{name}/{self.info.rank}", value)
        keys = [f"{name}/{r}" for r in range(self.info.world_size)]
        self.wait(keys, name)
        return [self._store.get(self.prefix + k) for k in keys]

    def barrier(self, name: str) -> None:
        self.all_gather(name, b"1")
