"""Set-up waits share one budget: a peer that never arrives costs one timeout, not one per
rendezvous (``tpcomm.groups.group.setup_budget``)."""
from __future__ import annotations

import time

import pytest

from tpcomm.errors import TpcommError
from tpcomm.groups.group import GroupInfo, GroupStore, setup_budget

from _emulated import init_single_process_group


def _info_with_absent_peer() -> GroupInfo:
    """Rank 0 of a group of two whose rank 1 never comes (the store is the real one)."""
    init_single_process_group()
    import torch.distributed as dist
    return GroupInfo(group=dist.group.WORLD, rank=0, world_size=2, global_ranks=(0, 1),
                     backend="gloo")


def _store(info: GroupInfo, kind: str, timeout_s: float) -> GroupStore:
    """A GroupStore over a fresh TCPStore (what torchrun gives; the FileStore of the test
    process waits in whole seconds)."""
    import torch.distributed as dist
    from tpcomm.groups.launch import free_port
    gs = GroupStore(info, kind, timeout_s)
    gs._store = dist.TCPStore("127.0.0.1", free_port(), 1, True)
    return gs


def _gather_fails(store: GroupStore, name: str) -> tuple[float, str]:
    t0 = time.monotonic()
    with pytest.raises(TpcommError) as e:
        store.all_gather(name, b"x")
    return time.monotonic() - t0, str(e.value)


def test_two_rendezvous_in_one_budget_cost_one_timeout():
    info = _info_with_absent_peer()
    t0 = time.monotonic()
    with setup_budget(1.0):
        first, msg = _gather_fails(_store(info, "budget-a", 1.0), "ok")
        second, msg2 = _gather_fails(_store(info, "budget-b", 1.0), "verdict")
    total = time.monotonic() - t0
    assert 0.9 <= first < 1.6, first
    assert second < 0.3, second          # the budget was spent: no second full timeout
    assert total < 1.9, total
    assert "rank(s) 1 did not arrive" in msg and "Communicator" in msg, msg
    assert "set-up budget" in msg2, msg2


def test_without_a_budget_each_wait_has_its_own_timeout():
    info = _info_with_absent_peer()
    first, _ = _gather_fails(_store(info, "budget-c", 0.5), "ok")
    second, _ = _gather_fails(_store(info, "budget-d", 0.5), "ok")
    assert first >= 0.45 and second >= 0.45, (first, second)


def test_nested_budgets_keep_the_outer_deadline():
    info = _info_with_absent_peer()
    with setup_budget(0.5):
        with setup_budget(30.0):
            waited, _ = _gather_fails(_store(info, "budget-e", 30.0), "ok")
    assert waited < 1.2, waited
