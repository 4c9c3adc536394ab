"""The GPU backend on 2 and 4 GPUs: every op, dtype and algorithm against NCCL.

Inputs are small integers (``tpcomm.testing.exact``), so every sum is exact and the comparison
with NCCL is bitwise. Outputs are poisoned first and sit between guard bytes that must stay
untouched; results are compared bitwise across ranks; graphs are replayed with new inputs;
two Communicators on two groups run at once; a stalled peer raises instead of hanging.

Skipped, visibly, without enough GPUs. Multicast (NVLS) stays off in every rank.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import tpcomm
from tpcomm.groups.launch import spawn
from tpcomm.testing import exact, expected_all_reduce

pytestmark = pytest.mark.gpu

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
       "NVSHMEM_DISABLE_NVLS": "1", "PYTHONUNBUFFERED": "1"}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ALGORITHMS = ["one_shot", "two_shot", "ring"]            # through the Communicator
MECHANISMS = ["one_shot/push", "one_shot/pull"]          # one_shot's mechanism forced
# bytes: 4 B and 8196 B (odd element counts in 16-bit types), 16-byte multiples around the
# small/large switch points, and sizes over the 32 MiB buffer (chunked)
NBYTES = [4, 8196, 2 << 10, (32 << 10) + 6, 256 << 10, (1 << 20) + 2, 8 << 20, (40 << 20) + 2]
GUARD = 64
SEED = 0x5A


def _needs(n):
    return pytest.mark.skipif(torch.cuda.device_count() < n,
                              reason=f"needs {n} GPUs, found {torch.cuda.device_count()}")


def _init(rank):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    return torch.device("cuda", rank)


def _bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _same_on_all_ranks(t, world):
    """Gather ``t``'s bits from every rank (NCCL) and check they are identical."""
    b = t.contiguous().view(torch.uint8).reshape(-1)   # NCCL gathers bytes, not int16
    every = torch.empty(world * b.numel(), dtype=b.dtype, device=b.device)
    dist.all_gather_into_tensor(every, b)
    rows = every.view(world, -1)
    return all(torch.equal(rows[0], rows[r]) for r in range(1, world))


def _guarded(numel, dtype, device, offset):
    """(whole buffer, view): the view of ``numel`` elements at ``GUARD + offset`` elements,
    the rest filled with a byte pattern that must survive."""
    whole = torch.empty(numel + 2 * GUARD + offset, dtype=dtype, device=device)
    whole.view(torch.uint8).fill_(SEED)
    return whole, whole[GUARD + offset:GUARD + offset + numel]


def _guards_ok(whole, numel, offset):
    b = whole.view(torch.uint8)
    item = whole.element_size()
    head = b[:(GUARD + offset) * item]
    tail = b[(GUARD + offset + numel) * item:]
    return bool((head == SEED).all()) and bool((tail == SEED).all())


# ---------------------------------------------------------------- all_reduce, every combination
def _all_reduce_matrix(rank, world):
    dev = _init(rank)
    comm = tpcomm.Communicator()
    assert comm.backend_name == "p2p", comm.disabled_reason
    back = comm._backend
    failures, checked, salt = [], 0, 0
    for dtype in DTYPES:
        item = dtype.itemsize
        for nbytes in NBYTES:
            n = max(1, nbytes // item)
            for algo in ALGORITHMS + MECHANISMS:
                if algo == "one_shot/pull" and nbytes > (8 << 20):
                    continue  # pull reads R x S per rank: slow, and covered by 8 MiB
                salt += 1
                offset = salt % 3                     # 0: aligned, 1-2: unaligned views
                x_whole, x = _guarded(n, dtype, dev, offset)
                x.copy_(exact(n, rank, dtype, salt, device=dev))
                ref = x.clone()
                dist.all_reduce(ref)
                out_whole, out = _guarded(n, dtype, dev, (offset + 1) % 3)
                out.fill_(float("nan"))
                comm.all_reduce(x, out=out, algorithm=algo)
                # in place as well
                y = x.clone()
                comm.all_reduce_(y, algorithm=algo)
                torch.cuda.synchronize()
                ok = (torch.equal(_bits(out), _bits(ref)) and torch.equal(_bits(y), _bits(ref))
                      and _guards_ok(out_whole, n, (offset + 1) % 3)
                      and _guards_ok(x_whole, n, offset)
                      and torch.equal(x, exact(n, rank, dtype, salt, device=dev)))
                same = _same_on_all_ranks(out, world)
                if not (ok and same):
                    bad = (out != ref).nonzero()[:5].flatten().tolist()
                    failures.append(f"{dtype} {nbytes}B {algo} offset {offset}: ok={ok} "
                                    f"same={same} first bad {bad}")
                checked += 1
    back.check(sync=True)
    stats = comm.stats()
    comm.close()
    dist.destroy_process_group()
    return checked, failures, stats


@pytest.mark.parametrize("world", [pytest.param(2, marks=_needs(2)),
                                   pytest.param(4, marks=_needs(4))])
def test_all_reduce_every_dtype_algorithm_and_size_matches_nccl(world):
    results = spawn(_all_reduce_matrix, world, env=ENV, timeout_s=420)
    for rank, (checked, failures, stats) in enumerate(results):
        assert not failures, f"rank {rank}: {failures[:10]}"
        assert checked > 100
        assert stats["fallbacks"] == {}, stats["fallbacks"]


# ---------------------------------------------------------------- reduce_scatter / all_gather
def _rs_ag(rank, world):
    dev = _init(rank)
    comm = tpcomm.Communicator(max_bytes=1 << 20)   # 1 MiB: the large sizes go in chunks
    failures = []
    salt = 0
    for dtype in DTYPES:
        for m in (1, 3, 1000, 4099, 300_000):
            salt += 1
            for cols in (1, 5):
                x = exact(world * m * cols, rank, dtype, salt, device=dev).view(world * m, cols)
                rs_ref = torch.empty(m, cols, dtype=dtype, device=dev)
                dist.reduce_scatter_tensor(rs_ref, x)
                whole, rs = _guarded(m * cols, dtype, dev, 1)
                rs.fill_(float("nan"))
                comm.reduce_scatter(x, out=rs.view(m, cols))
                xg = exact(m * cols, rank, dtype, salt + 1000, device=dev).view(m, cols)
                ag_ref = torch.empty(world * m, cols, dtype=dtype, device=dev)
                dist.all_gather_into_tensor(ag_ref, xg)
                gwhole, ag = _guarded(world * m * cols, dtype, dev, 2)
                ag.fill_(float("nan"))
                comm.all_gather(xg, out=ag.view(world * m, cols))
                torch.cuda.synchronize()
                ok_rs = (torch.equal(_bits(rs.view(m, cols)), _bits(rs_ref))
                         and _guards_ok(whole, m * cols, 1))
                ok_ag = (torch.equal(_bits(ag.view(world * m, cols)), _bits(ag_ref))
                         and _guards_ok(gwhole, world * m * cols, 2)
                         and _same_on_all_ranks(ag, world))
                if not (ok_rs and ok_ag):
                    failures.append(f"{dtype} m={m} cols={cols}: rs {ok_rs} ag {ok_ag}")
    comm.close()
    dist.destroy_process_group()
    return failures


@pytest.mark.parametrize("world", [pytest.param(2, marks=_needs(2)),
                                   pytest.param(4, marks=_needs(4))])
def test_reduce_scatter_and_all_gather_match_nccl(world):
    for rank, failures in enumerate(spawn(_rs_ag, world, env=ENV, timeout_s=300)):
        assert not failures, f"rank {rank}: {failures[:10]}"


# ---------------------------------------------------------------- CUDA graphs
def _graph(rank, world):
    dev = _init(rank)
    comm = tpcomm.Communicator()
    sizes = [(torch.bfloat16, 1024, "one_shot"), (torch.bfloat16, 65536 + 8, "two_shot"),
             (torch.float16, 4099, "ring"), (torch.float32, 300_000, "auto"),
             (torch.bfloat16, 1 << 20, "two_shot")]
    xs = [torch.empty(n, dtype=d, device=dev) for d, n, _ in sizes]
    outs = [torch.empty_like(x) for x in xs]
    rs_in = torch.empty(world * 2048, dtype=torch.bfloat16, device=dev)
    rs_out = torch.empty(2048, dtype=torch.bfloat16, device=dev)
    ag_in = torch.empty(777, dtype=torch.float32, device=dev)
    ag_out = torch.empty(world * 777, dtype=torch.float32, device=dev)

    def step():
        for (d, n, algo), x, o in zip(sizes, xs, outs):
            comm.all_reduce(x, out=o, algorithm=algo)
        comm.reduce_scatter(rs_in, out=rs_out)
        comm.all_gather(ag_in, out=ag_out)

    def fill(salt):
        for (d, n, _), x in zip(sizes, xs):
            x.copy_(exact(n, rank, d, salt, device=dev))
        rs_in.copy_(exact(world * 2048, rank, torch.bfloat16, salt, device=dev))
        ag_in.copy_(exact(777, rank, torch.float32, salt, device=dev))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    fill(0)
    with torch.cuda.stream(s):
        step()                                   # warm-up: compiles every kernel
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    failures = []
    for replay in range(6):
        salt = 100 + replay
        fill(salt)
        g.replay()
        if replay == 3:
            step()                               # an eager call between replays
        torch.cuda.synchronize()
        for (d, n, algo), o in zip(sizes, outs):
            want = torch.zeros(n, dtype=torch.float64, device=dev)
            for r in range(world):
                want += exact(n, r, torch.float64, salt, device=dev)
            if not torch.equal(o, want.to(d)):
                failures.append(f"replay {replay}: {d} {n} {algo}")
        full = sum(exact(world * 2048, r, torch.float64, salt, device=dev) for r in range(world))
        if not torch.equal(rs_out, full.view(world, 2048)[rank].to(torch.bfloat16)):
            failures.append(f"replay {replay}: reduce_scatter")
        agw = torch.cat([exact(777, r, torch.float32, salt, device=dev) for r in range(world)])
        if not torch.equal(ag_out, agw):
            failures.append(f"replay {replay}: all_gather")
    comm._backend.check(sync=True)
    comm.close()
    dist.destroy_process_group()
    return failures


@pytest.mark.parametrize("world", [pytest.param(2, marks=_needs(2)),
                                   pytest.param(4, marks=_needs(4))])
def test_graph_capture_then_replays_with_new_inputs(world):
    for rank, failures in enumerate(spawn(_graph, world, env=ENV, timeout_s=300)):
        assert not failures, f"rank {rank}: {failures}"


# ---------------------------------------------------------------- two groups at once
def _two_groups(rank, world):
    dev = _init(rank)
    half = world // 2
    # world 4: {0,1} and {2,3} plus the world group; world 2: the world group twice over
    if world >= 4:
        groups = [dist.new_group(list(range(half))), dist.new_group(list(range(half, world)))]
        mine = groups[0] if rank < half else groups[1]
        members = list(range(half)) if rank < half else list(range(half, world))
    else:
        mine = dist.new_group(list(range(world)))
        members = list(range(world))
    a = tpcomm.Communicator(mine)
    b = tpcomm.Communicator()
    assert a.backend_name == "p2p" and b.backend_name == "p2p", (a.disabled_reason,
                                                                  b.disabled_reason)
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    failures = []
    for it in range(20):
        n = 1000 + 4097 * it
        xa = exact(n, rank, torch.bfloat16, it, device=dev)
        xb = exact(n, rank, torch.float32, it + 50, device=dev)
        torch.cuda.synchronize()
        with torch.cuda.stream(sa):
            ya = a.all_reduce(xa, algorithm=ALGORITHMS[it % 3])
        with torch.cuda.stream(sb):
            yb = b.all_reduce(xb, algorithm=ALGORITHMS[(it + 1) % 3])
        torch.cuda.synchronize()
        wa = sum(exact(n, r, torch.float64, it, device=dev) for r in members).to(torch.bfloat16)
        wb = sum(exact(n, r, torch.float64, it + 50, device=dev)
                 for r in range(world)).to(torch.float32)
        if not (torch.equal(ya, wa) and torch.equal(yb, wb)):
            failures.append(f"iteration {it} n={n}")
    a.close()
    b.close()
    dist.destroy_process_group()
    return failures


@pytest.mark.parametrize("world", [pytest.param(2, marks=_needs(2)),
                                   pytest.param(4, marks=_needs(4))])
def test_two_communicators_on_two_groups_at_once(world):
    for rank, failures in enumerate(spawn(_two_groups, world, env=ENV, timeout_s=300)):
        assert not failures, f"rank {rank}: {failures}"


# ---------------------------------------------------------------- zero-copy
def _zero_copy(rank, world):
    dev = _init(rank)
    comm = tpcomm.Communicator(max_bytes=32 << 20)   # the user region holds all of them
    failures = []
    for dtype in DTYPES:
        for n in (1, 4097, 1 << 20):
            x = comm.empty((n,), dtype)
            x.copy_(exact(n, rank, dtype, n, device=dev))
            want = sum(exact(n, r, torch.float64, n, device=dev) for r in range(world)).to(dtype)
            out = torch.empty_like(x)
            comm.all_reduce(x, out=out, algorithm="one_shot/pull")  # reads x where it is
            comm.all_reduce_(x, algorithm="one_shot/pull")          # in place
            y = comm.empty((n,), dtype)
            y.copy_(exact(n, rank, dtype, n, device=dev))
            comm.all_reduce_(y)                                    # whatever auto picks
            torch.cuda.synchronize()
            if not (torch.equal(out, want) and torch.equal(x, want) and torch.equal(y, want)):
                failures.append(f"{dtype} n={n}")
    comm.close()
    dist.destroy_process_group()
    return failures


@pytest.mark.parametrize("world", [pytest.param(2, marks=_needs(2)),
                                   pytest.param(4, marks=_needs(4))])
def test_zero_copy_tensors_from_empty(world):
    for rank, failures in enumerate(spawn(_zero_copy, world, env=ENV, timeout_s=300)):
        assert not failures, f"rank {rank}: {failures}"


# ---------------------------------------------------------------- a stalled peer
def _stalled(rank, world):
    dev = _init(rank)
    comm = tpcomm.Communicator(timeout_s=1.0)
    x = exact(4096, rank, torch.bfloat16, device=dev)
    comm.all_reduce(x, algorithm="one_shot")           # both ranks: fine
    torch.cuda.synchronize()
    dist.barrier()
    outcome = "no error"
    if rank == 0:
        t0 = time.monotonic()
        for algo in ("one_shot", "two_shot"):          # rank 1 never joins these
            comm.all_reduce(x, algorithm=algo)
        torch.cuda.synchronize()                       # returns: the kernels gave up
        waited = time.monotonic() - t0
        try:
            comm.all_reduce(x)
        except tpcomm.PeerTimeoutError as e:
            outcome = f"raised after {waited:.1f}s: {e}"
            assert e.rank == 0 and e.peers == [1], (e.rank, e.peers)
        try:
            comm.all_reduce(x)
        except tpcomm.CommunicatorBrokenError:
            outcome += " | then broken"
    dist.barrier()
    comm.close()
    dist.destroy_process_group()
    return outcome


@_needs(2)
def test_stalled_peer_raises_peer_timeout_instead_of_hanging():
    results = spawn(_stalled, 2, env=ENV, timeout_s=120)
    assert results[0].startswith("raised after"), results[0]
    assert "then broken" in results[0], results[0]
    assert "peer(s) [1]" in results[0]


# ---------------------------------------------------------------- a call mismatch
def _mismatch(rank, world):
    """Rank world-1 calls another size (in place). Every rank's next call raises MismatchError
    (the ranks reset their engines through the store), the mismatched call wrote nothing, and
    100 eager calls and replays of a graph captured before the mismatch are exact."""
    dev = _init(rank)
    comm = tpcomm.Communicator(timeout_s=10.0)
    bf16, n = torch.bfloat16, 4096
    algos = ("one_shot", "two_shot", "ring")
    xin, xout = exact(n, rank, bf16, device=dev), torch.empty(n, dtype=bf16, device=dev)
    for m in (n, 2 * n):                               # warm-up: every kernel compiled
        comm.all_reduce(exact(m, rank, bf16, device=dev), algorithm="one_shot")
    for a in algos:
        comm.all_reduce(xin, out=xout, algorithm=a)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for a in algos:
            comm.all_reduce(xin, out=xout, algorithm=a)
    torch.cuda.synchronize()
    dist.barrier()
    x = exact(2 * n if rank == world - 1 else n, rank, bf16, device=dev)
    keep = x.clone()
    comm.all_reduce_(x, algorithm="one_shot")         # the mismatched call
    torch.cuda.synchronize()
    outcome = {"kept": torch.equal(x, keep), "raised": "nothing", "wrong": 0}
    try:
        comm.all_reduce(xin, out=xout, algorithm="one_shot")
    except tpcomm.MismatchError as e:
        outcome["raised"] = str(e)
    for i in range(100):
        xin.copy_(exact(n, rank, bf16, i, device=dev))
        comm.all_reduce(xin, out=xout, algorithm=algos[i % 3])
        outcome["wrong"] += int((xout != expected_all_reduce(n, world, bf16, i, dev)).sum())
    for i in range(10):
        xin.copy_(exact(n, rank, bf16, 500 + i, device=dev))
        g.replay()
        outcome["wrong"] += int((xout != expected_all_reduce(n, world, bf16, 500 + i,
                                                             dev)).sum())
    comm._backend.check(sync=True)
    dist.barrier()
    comm.close()
    dist.destroy_process_group()
    return outcome


@pytest.mark.parametrize("world", [pytest.param(2, marks=_needs(2)),
                                   pytest.param(4, marks=_needs(4))])
def test_a_call_mismatch_raises_on_every_rank_and_the_communicator_stays_usable(world):
    for rank, out in enumerate(spawn(_mismatch, world, env=ENV, timeout_s=300)):
        assert out["raised"] != "nothing" and "numel=" in out["raised"], (rank, out)
        assert f"rank {rank} called" in out["raised"] and "stays usable" in out["raised"]
        assert out["kept"] and out["wrong"] == 0, (rank, out)
