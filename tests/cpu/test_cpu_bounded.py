"""Every wait is bounded by the Communicator's timeout, on the torch.distributed (gloo) path too:
a peer that never calls makes the other rank raise PeerTimeoutError within about timeout_s
(gloo's own default is 30 minutes), naming the op and the peer; a peer that never creates its
Communicator is noticed within one timeout_s of set-up, not one per rendezvous."""
from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist

import tpcomm
from _dist import exact_input, init_gloo, run

TIMEOUT_S = 2.0

# case -> (env, op, dtype): calls that go to torch.distributed
CASES = {
    "fallback dtype all_reduce": ({}, "all_reduce", torch.int32),
    "fallback dtype all_gather": ({}, "all_gather", torch.float64),
    "TPCOMM_DISABLE reduce_scatter": ({"TPCOMM_DISABLE": "1"}, "reduce_scatter", torch.float32),
    "TPCOMM_DISABLE all_reduce": ({"TPCOMM_DISABLE": "1"}, "all_reduce", torch.float32),
}


def _release(store) -> None:
    store.set("h11/done", b"1")


def _hold(store) -> None:
    """The silent peer stays alive (a crashed peer would be noticed by other means) until the
    other rank is done."""
    store.wait(["h11/done"], datetime.timedelta(seconds=60))


def _peer_never_calls(rank, world, case):
    init_gloo()
    store = dist.distributed_c10d._get_default_store()
    _, op, dtype = CASES[case]
    comm = tpcomm.Communicator(timeout_s=TIMEOUT_S)
    try:
        x = exact_input(4 * world, rank, dtype)
        getattr(comm, op)(x)                        # a matched call first: the path works
        if rank != 0:
            _hold(store)
            return None
        t0 = time.monotonic()
        try:
            getattr(comm, op)(x)
            return ("no error", time.monotonic() - t0, "", "")
        except tpcomm.PeerTimeoutError as e:
            waited = time.monotonic() - t0
            try:
                getattr(comm, op)(x)
                later = "no error"
            except tpcomm.CommunicatorBrokenError as e2:
                later = str(e2)
            return (type(e).__name__, waited, str(e), later, e.op, e.peers)
        finally:
            _release(store)
    finally:
        comm.close()


@pytest.mark.parametrize("case", list(CASES))
def test_a_peer_that_never_calls_is_noticed_within_the_timeout(case):
    env = CASES[case][0]
    r0, r1 = run(_peer_never_calls, 2, case, env=env)
    assert r1 is None
    kind, waited, msg, later, op, peers = r0
    assert kind == "PeerTimeoutError", r0
    assert TIMEOUT_S * 0.9 <= waited < 3 * TIMEOUT_S, r0
    assert op == CASES[case][1] and peers == [1], r0
    assert f"tpcomm {op}" in msg and "[1]" in msg and "torch.distributed" in msg, msg
    assert "broken" in later, later


def _peer_never_sets_up(rank, world):
    init_gloo()
    store = dist.distributed_c10d._get_default_store()
    if rank != 0:
        _hold(store)
        return None
    t0 = time.monotonic()
    try:
        tpcomm.Communicator(timeout_s=TIMEOUT_S)
        return ("no error", time.monotonic() - t0, "")
    except tpcomm.TpcommError as e:
        return (type(e).__name__, time.monotonic() - t0, str(e))
    finally:
        _release(store)


def test_a_peer_that_never_creates_its_communicator_costs_one_timeout():
    (kind, waited, msg), _ = run(_peer_never_sets_up, 2)
    assert kind == "TpcommError", (kind, waited, msg)
    # one set-up budget of TIMEOUT_S for every rendezvous (before: two full timeouts)
    assert TIMEOUT_S * 0.9 <= waited < 1.5 * TIMEOUT_S, (waited, msg)
    assert "rank(s) 1 did not arrive" in msg and "Communicator" in msg, msg
