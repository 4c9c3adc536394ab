"""Fuzz of bad and unusual inputs on 2 ranks: every call ends in a clear error, a fallback or a
correct result, the Communicator stays usable afterwards, and no memory is corrupted."""
import random

import pytest
import torch
import torch.distributed as dist

import tpcomm
from _dist import exact_input, init_gloo, run

pytestmark = pytest.mark.cpu


def _bad_calls(comm, rank):
    big = torch.zeros(64)
    return [
        ("non-contiguous", lambda: comm.all_reduce(torch.ones(8, 8).t())),
        ("bool dtype", lambda: comm.all_reduce(torch.ones(4, dtype=torch.bool))),
        ("complex dtype", lambda: comm.all_gather(torch.ones(4, dtype=torch.complex64))),
        ("not a tensor", lambda: comm.reduce_scatter(3.0)),
        ("out wrong shape", lambda: comm.all_reduce(torch.ones(4), out=torch.empty(3))),
        ("out wrong dtype", lambda: comm.all_gather(torch.ones(4), out=torch.empty(8, dtype=torch.float64))),
        ("out strided", lambda: comm.all_reduce(torch.ones(4), out=torch.empty(8)[::2])),
        ("all_gather out aliases input", lambda: comm.all_gather(big[:32], out=big)),
        ("reduce_scatter out aliases input", lambda: comm.reduce_scatter(big, out=big[:32])),
        ("reduce_scatter indivisible", lambda: comm.reduce_scatter(torch.ones(5))),
        ("unknown algorithm", lambda: comm.all_reduce(torch.ones(4), algorithm="tree")),
        ("algorithm for wrong op", lambda: comm.all_gather(torch.ones(4), algorithm="two_shot")),
        ("meta device", lambda: comm.all_reduce(torch.ones(4, device="meta"))),
        ("coalesced not a list", lambda: comm.all_reduce_coalesced(torch.ones(4))),
        ("coalesced bad member", lambda: comm.all_reduce_coalesced([torch.ones(4), "x"])),
    ]


def _fuzz(rank, world):
    init_gloo()
    outcomes = {}
    with tpcomm.Communicator(max_bytes=8192, timeout_s=10) as comm:
        guard = torch.full((1024,), 7.0)  # memory next to nothing: must stay untouched
        for name, call in _bad_calls(comm, rank):
            try:
                call()
                outcomes[name] = "no error"
            except (ValueError, TypeError) as e:
                outcomes[name] = f"{type(e).__name__}"
            # a collective right after each bad call proves the ranks are still in step
            x = exact_input(33, rank, torch.float32)
            ref = x.clone()
            dist.all_reduce(ref)
            assert torch.equal(comm.all_reduce(x), ref), name
        # unusual but valid: zero size, odd offsets, larger than the buffer, in place
        rng = random.Random(0)
        for _ in range(40):
            dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
            n = rng.choice([0, 1, 3, 4097, 20000])
            off = rng.choice([0, 1, 3])
            storage = torch.full((n + off + 5,), float("nan"), dtype=dtype)
            x = storage[off:off + n]
            x.copy_(exact_input(n, rank, dtype))
            ref = x.clone()
            dist.all_reduce(ref)
            comm.all_reduce_(x)
            assert torch.equal(x, ref), (dtype, n, off)
            assert storage[:off].isnan().all() and storage[off + n:].isnan().all(), "guard bytes"
        assert (guard == 7.0).all()
    try:
        comm.all_reduce(torch.ones(4))
        outcomes["use after close"] = "no error"
    except tpcomm.CommunicatorClosedError:
        outcomes["use after close"] = "CommunicatorClosedError"
    return outcomes


def test_bad_inputs_get_clear_errors_and_leave_the_communicator_usable():
    a, b = run(_fuzz, 2)
    assert a == b
    no_error = [k for k, v in a.items() if v == "no error"]
    assert not no_error, f"accepted without error: {no_error}"
    assert a["use after close"] == "CommunicatorClosedError"
