"""Failures on the CPU backend: a stalled rank, a killed rank, mismatched calls, bad use.

Each must end in a clear exception within about timeout_s, never a hang, and leave nothing in
/dev/shm.
"""
import glob
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

import tpcomm
from _dist import exact_input, init_gloo, run

pytestmark = pytest.mark.cpu
TIMEOUT_S = 2.0


def _segments():
    return glob.glob("/dev/shm/tpcomm-*")


def _stalled(rank, world, stall_s):
    init_gloo()
    comm = tpcomm.Communicator(timeout_s=TIMEOUT_S)
    x = exact_input(256, rank, torch.float32)
    comm.all_reduce(x)  # everyone arrives once
    if rank == world - 1:
        time.sleep(stall_s)  # the straggler
    t0 = time.monotonic()
    try:
        comm.all_reduce(x)
        return ("ok", time.monotonic() - t0, None)
    except tpcomm.PeerTimeoutError as e:
        waited = time.monotonic() - t0
        later = None
        try:
            comm.all_reduce(x)
        except tpcomm.CommunicatorBrokenError as e2:
            later = str(e2)
        dump = comm.dump()
        assert "failed" in dump and "broken" in dump and "all_reduce" in dump, dump
        return (type(e).__name__, waited, (str(e), e.op, e.seq, e.rank, e.peers, later))
    finally:
        comm.close()


def test_stalled_peer_raises_within_timeout():
    results = run(_stalled, 3, TIMEOUT_S * 3)
    for rank in (0, 1):
        kind, waited, (msg, op, seq, r, peers, later) = results[rank]
        assert kind in ("PeerTimeoutError", "PeerDiedError"), results[rank]
        # the first rank to time out tells the others (they raise at once); bounded by timeout
        assert waited < TIMEOUT_S + 1.5, waited
        assert op == "all_reduce" and seq == 2 and r == rank
        assert 2 in peers or "aborted" in msg
        assert "broken" in later
    assert any(results[r][0] == "PeerTimeoutError" and results[r][1] >= TIMEOUT_S - 0.1
               for r in (0, 1))
    # the straggler arrives after the others gave up: it must not return data as if all were well
    kind, waited, (msg, *_rest) = results[2]
    assert kind == "PeerDiedError" and "aborted" in msg, results[2]
    assert not _segments()


def test_straggler_within_timeout_succeeds():
    results = run(_stalled, 2, TIMEOUT_S / 4)
    assert [r[0] for r in results] == ["ok", "ok"]


def _killed(rank, world):
    init_gloo()
    comm = tpcomm.Communicator(timeout_s=30.0)
    x = exact_input(256, rank, torch.float32)
    comm.all_reduce(x)
    if rank == 1:
        os._exit(9)  # dies without closing anything
    t0 = time.monotonic()
    try:
        comm.all_reduce(x)
        return ("ok", 0.0, "")
    except tpcomm.PeerDiedError as e:
        return ("PeerDiedError", time.monotonic() - t0, str(e))
    finally:
        comm.close()


def test_killed_peer_is_noticed_long_before_the_timeout():
    results = run(_killed, 2, allow_failure=True)
    status, value = results[0]
    assert status == "ok", results
    kind, waited, msg = value
    assert kind == "PeerDiedError" and waited < 5.0, value
    assert "peer 1" in msg and "exited" in msg
    assert results[1][0] == "died"
    assert not _segments()


def _mismatch(rank, world):
    init_gloo()
    with tpcomm.Communicator(timeout_s=10.0) as comm:
        x = exact_input(100 + rank, rank, torch.float32)
        try:
            comm.all_reduce(x)
            first = "no error"
        except tpcomm.MismatchError as e:
            first = str(e)
        # the Communicator stays usable after a mismatch every rank saw
        y = exact_input(64, rank, torch.float32)
        ref = y.clone()
        dist.all_reduce(ref)
        assert torch.equal(comm.all_reduce(y), ref)
        try:
            comm.all_gather(exact_input(8, rank, torch.float16 if rank else torch.float32))
            second = "no error"
        except tpcomm.MismatchError as e:
            second = str(e)
        return first, second


def test_sizes_that_differ_across_ranks_raise_on_every_rank():
    for first, second in run(_mismatch, 2):
        assert "numel=100" in first and "numel=101" in first
        assert "float16" in second and "float32" in second


def _debug_mismatch(rank, world):
    init_gloo()
    with tpcomm.Communicator(timeout_s=10.0) as comm:
        x = torch.ones(10 + rank, dtype=torch.float64)  # a fallback dtype: gloo path
        try:
            comm.all_reduce(x)
            return "no error"
        except tpcomm.MismatchError as e:
            return str(e)


def test_debug_mode_catches_mismatch_on_the_fallback_path():
    for msg in run(_debug_mismatch, 2, env={"TPCOMM_DEBUG": "1"}):
        assert "TPCOMM_DEBUG" in msg and "elements" in msg


def _threads(rank, world):
    init_gloo()
    with tpcomm.Communicator(timeout_s=5.0) as comm:
        x = exact_input(64, rank, torch.float32)
        errors = []
        started = threading.Event()

        def slow_call():
            started.set()
            comm.all_reduce(x)  # rank 1 joins late: this call is in flight a while

        if rank == 0:
            t = threading.Thread(target=slow_call)
            t.start()
            started.wait()
            time.sleep(0.3)
            try:
                comm.all_reduce(x)
            except tpcomm.TpcommError as e:
                errors.append(str(e))
            t.join()
        else:
            time.sleep(1.0)
            comm.all_reduce(x)
        return errors


def test_same_communicator_from_two_threads_is_refused_not_deadlocked():
    errors, _ = run(_threads, 2)
    assert len(errors) == 1 and "another thread" in errors[0]


def _setup_failure(rank, world):
    init_gloo()
    # the ranks disagree on max_bytes: rank 1 cannot map rank 0's segment (wrong size), and
    # every rank falls back together rather than leaving some on each path
    with tpcomm.Communicator(max_bytes=8192 * (rank + 1), timeout_s=10.0) as comm:
        x = exact_input(32, rank, torch.float32)
        ref = x.clone()
        dist.all_reduce(ref)
        assert torch.equal(comm.all_reduce(x), ref)
        return comm.backend_name, comm.disabled_reason


def test_a_rank_that_cannot_set_up_makes_all_ranks_fall_back():
    results = run(_setup_failure, 2)
    assert [r[0] for r in results] == ["torch", "torch"]
    assert all("disagree on max_bytes" in r[1] for r in results), results
    assert not _segments()
