"""What tpcomm needs from a torch.distributed process group: ranks, and a key-value store.

Rendezvous, tokens and handle exchange go through torch.distributed's own store (the one the
launcher set up), under a prefix unique to the group and to the n-th tpcomm object created on it;
nothing here launches processes or discovers peers by itself.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import threading
import time

import torch.distributed as dist

from ..errors import TpcommError

_instances: collections.Counter = collections.Counter()
_instances_lock = threading.Lock()
_budget = threading.local()   # .deadline: time.monotonic() by which set-up must be done


@contextlib.contextmanager
def setup_budget(timeout_s: float):
    """Every :class:`GroupStore` wait inside draws on ONE budget of ``timeout_s`` seconds.

    A set-up (a Communicator) waits in several rendezvous in a row (buffers, P2P verdicts, the
    fast-path verdict); each bounded by the full timeout, a peer that never came cost one
    timeout per rendezvous before anyone raised. With one deadline the first wait that runs
    out spends the budget and the later ones give up at once. Nested budgets keep the outer
    deadline."""
    outer = getattr(_budget, "deadline", None)
    mine = time.monotonic() + timeout_s
    _budget.deadline = mine if outer is None else min(outer, mine)
    try:
        yield
    finally:
        _budget.deadline = outer


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
        """Wait for the peers' ``keys``, at most the store's timeout or what is left of the
        set-up budget (:func:`setup_budget`), whichever is shorter."""
        timeout = self.timeout
        deadline = getattr(_budget, "deadline", None)
        spent = ""
        if deadline is not None:
            left = datetime.timedelta(seconds=max(0.001, deadline - time.monotonic()))
            if left < timeout:
                timeout = left
                spent = (f" (the rest of the set-up budget of "
                         f"{self.timeout.total_seconds():g} s)")
        try:
            if timeout.total_seconds() <= 0.001:   # spent: look once, do not wait
                if not self._store.check([self.prefix + k for k in keys]):
                    raise TimeoutError("no time left")
            else:
                self._store.wait([self.prefix + k for k in keys], timeout)
        except Exception as e:  # torch raises DistStoreError / RuntimeError on timeout
            missing = [k for k in keys if not self._store.check([self.prefix + k])]
            tails = sorted({k.rsplit("/", 1)[-1] for k in missing})
            who = (f"rank(s) {', '.join(tails)} did not arrive" if all(t.isdigit() for t in tails)
                   else "peers did not arrive")
            raise TpcommError(
                f"tpcomm setup ({what or 'rendezvous'}): rank {self.info.rank} waited "
                f"{timeout.total_seconds():g} s{spent} for keys {missing} of the peers ({who}: "
                f"does every rank create its Communicator?): {type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e

    def all_gather(self, name: str, value: bytes | str) -> list[bytes]:
        """Every rank's ``value`` in rank order."""
        self.set(f"{name}/{self.info.rank}", value)
        keys = [f"{name}/{r}" for r in range(self.info.world_size)]
        self.wait(keys, name)
        return [self._store.get(self.prefix + k) for k in keys]

    def barrier(self, name: str) -> None:
        self.all_gather(name, b"1")
