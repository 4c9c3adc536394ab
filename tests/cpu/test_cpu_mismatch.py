"""Calls that differ across ranks raise MismatchError on every rank, in the first round, on the
CPU engine; the Communicator stays usable and the next matched call is exact on every rank.

The sizes that matter are whole numbers of rounds (the engine works in 1 MiB rounds): before
the call's total size travelled with every round, 1 MiB against 2 MiB of float32 matched in the
first round, both ranks returned wrong data and the next call on one rank did too.

Both implementations of the engine's protocol are tested: the native core
(``TPCOMM_CPU_NATIVE=1``, total and offset are its meta words 5 and 6) and the Python path.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import tpcomm
from _dist import exact_input, init_gloo, run

MIB_F32 = (1 << 20) // 4   # float32 elements in one 1 MiB round

# (what, rank 0's call, rank 1's call); a call is (op, numel, dtype)
CASES = [
    ("1 MiB vs 2 MiB", ("all_reduce", MIB_F32, "float32"), ("all_reduce", 2 * MIB_F32, "float32")),
    ("2 MiB vs 3 MiB", ("all_reduce", 2 * MIB_F32, "float32"), ("all_reduce", 3 * MIB_F32, "float32")),
    ("a round and 16 more", ("all_reduce", MIB_F32, "float32"),
     ("all_reduce", MIB_F32 + 16, "float32")),
    ("inside a round", ("all_reduce", 4096, "float32"), ("all_reduce", 4100, "float32")),
    ("op", ("all_reduce", 2 * MIB_F32, "float32"), ("reduce_scatter", 2 * MIB_F32, "float32")),
    ("dtype", ("all_reduce", 2 * MIB_F32, "float32"), ("all_reduce", 4 * MIB_F32, "bfloat16")),
    ("reduce_scatter rounds", ("reduce_scatter", 2 * MIB_F32, "float32"),
     ("reduce_scatter", 4 * MIB_F32, "float32")),
    ("all_gather rounds", ("all_gather", MIB_F32, "float32"), ("all_gather", 2 * MIB_F32, "float32")),
]


def _call(comm, op: str, x: torch.Tensor) -> torch.Tensor:
    return getattr(comm, op)(x)


def _expected(op: str, x: torch.Tensor, world: int) -> torch.Tensor:
    if op == "all_reduce":
        ref = x.clone()
        dist.all_reduce(ref)
        return ref
    if op == "reduce_scatter":
        ref = x.clone()
        dist.all_reduce(ref)
        return ref.view(world, -1)[dist.get_rank()]
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x)
    return torch.cat(gathered)


def _mismatches(rank, world):
    init_gloo()
    out = []
    with tpcomm.Communicator(timeout_s=20.0) as comm:
        assert comm.backend_name == "shm", comm.backend_name
        native = comm._backend.native
        assert not (native and os.environ["TPCOMM_CPU_NATIVE"] == "0"), "native core with =0"
        for salt, (what, *calls) in enumerate(CASES):
            op, numel, dtype = calls[rank]
            x = exact_input(numel, rank, getattr(torch, dtype), salt)
            try:
                _call(comm, op, x)
                got = "no error"
            except tpcomm.MismatchError as e:
                got = str(e)
            # the next call, matched, of another size: exact on every rank (no stale data)
            for y in (exact_input(MIB_F32 + 48, rank, torch.float32, salt + 100),
                      exact_input(1000, rank, torch.float32, salt + 200)):
                for check_op in ("all_reduce", "reduce_scatter", "all_gather"):
                    res = _call(comm, check_op, y)
                    want = _expected(check_op, y, world)
                    assert torch.equal(res.view(-1), want.view(-1)), (what, check_op, rank)
            out.append((what, got))
        assert comm.stats()["fallbacks"] == {}, comm.stats()
    return native, out


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("debug", ["0", "1"])
def test_every_mismatch_raises_on_every_rank_and_the_next_call_is_exact(debug, native):
    results = run(_mismatches, 2, env={"TPCOMM_DEBUG": debug, "TPCOMM_CPU_NATIVE": native})
    if native == "1" and not all(r[0] for r in results):
        from tpcomm.cpu import native as native_mod
        pytest.skip(f"the native core is not available here: {native_mod.why_not()}")
    assert all(r[0] == (native == "1") for r in results), [r[0] for r in results]
    for rank, (_, rows) in enumerate(results):
        assert [w for w, _ in rows] == [c[0] for c in CASES]
        for (what, msg), (_, *calls) in zip(rows, CASES):
            assert msg != "no error", (rank, what)
            if debug == "1":
                assert "TPCOMM_DEBUG" in msg, (rank, what, msg)
                continue
            # the engine's own check names both calls
            for op, numel, dtype in calls:
                assert f"numel={numel}" in msg and dtype in msg and op in msg, (rank, what, msg)
