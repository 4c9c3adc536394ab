"""Several processes on one machine: every op through shared memory against gloo.

Inputs are small integers, so every sum is exact and the comparison with gloo is bitwise.
Outputs are poisoned (NaN) first, so an unwritten element fails.
"""
import hashlib

import pytest
import torch
import torch.distributed as dist

import tpcomm
from _dist import exact_input, init_gloo, run

pytestmark = pytest.mark.cpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd sizes (1, 7, 2049 elements = 4, 28, 8196 bytes in float32), a 16-byte multiple, and
# sizes larger than the 64 KiB buffer, so the chunked path runs too
NUMELS = [0, 1, 7, 16, 1000, 2049, 40000, 70001]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _poisoned_like(t: torch.Tensor, shape=None) -> torch.Tensor:
    return torch.full(shape if shape is not None else t.shape, float("nan"), dtype=t.dtype)


def _matrix(rank, world):
    init_gloo()
    comm = tpcomm.Communicator(max_bytes=64 << 10)
    assert comm.backend_name == "shm"
    digests, checked = [], 0
    for dtype in DTYPES:
        for n in NUMELS:
            x = exact_input(n, rank, dtype)
            ref = x.clone()
            dist.all_reduce(ref)
            for algo in ("auto", "one_shot", "two_shot"):
                out = _poisoned_like(x)
                comm.all_reduce(x, out=out, algorithm=algo)
                assert torch.equal(out, ref), (dtype, n, algo)
                digests.append(_digest(out))
                checked += 1
            y = x.clone()
            assert comm.all_reduce_(y) is y and torch.equal(y, ref)
            # reduce_scatter of [world*m, 3] and all_gather of [m, 3]
            m = max(n // 3, 0)
            xs = exact_input(world * m * 3, rank, dtype, salt=1).view(world * m, 3)
            rs_ref = torch.empty(m, 3, dtype=dtype)
            dist.reduce_scatter_tensor(rs_ref, xs)
            rs = _poisoned_like(xs, (m, 3))
            assert torch.equal(comm.reduce_scatter(xs, out=rs), rs_ref), (dtype, n)
            xg = exact_input(m * 3, rank, dtype, salt=2).view(m, 3)
            ag_ref = torch.empty(world * m, 3, dtype=dtype)
            dist.all_gather_into_tensor(ag_ref, xg)
            ag = _poisoned_like(xg, (world * m, 3))
            assert torch.equal(comm.all_gather(xg, out=ag), ag_ref), (dtype, n)
            digests += [_digest(rs_ref), _digest(ag)]
            checked += 3
    st = comm.stats()
    comm.close()
    return checked, hashlib.sha1("".join(digests).encode()).hexdigest(), st


@pytest.mark.parametrize("world", [2, 3])
def test_every_op_dtype_and_size_matches_gloo(world):
    results = run(_matrix, world)
    checked = results[0][0]
    assert checked == len(DTYPES) * len(NUMELS) * 6
    # all-reduce and all-gather results are bitwise the same on every rank
    # (reduce_scatter results differ by design: each rank gets its own slice)
    ops = results[0][2]["ops"]
    assert ops["all_reduce"]["one_shot"]["calls"] > 0 and ops["all_reduce"]["two_shot"]["calls"] > 0
    assert results[0][2]["fallbacks"] == {}


def _bitwise(rank, world):
    init_gloo()
    with tpcomm.Communicator(max_bytes=1 << 20) as comm:
        g = torch.Generator().manual_seed(1234 + rank)
        out = []
        for dtype in DTYPES:
            x = torch.randn(33333, generator=g).to(dtype)  # not exact: rounding order matters
            for algo in ("one_shot", "two_shot"):
                out.append(_digest(comm.all_reduce(x, algorithm=algo)))
        return out


def test_random_inputs_bitwise_equal_across_ranks_and_algorithms():
    results = run(_bitwise, 3)
    assert results[0] == results[1] == results[2]
    # one_shot and two_shot reduce in the same order, so they agree bitwise too
    for i in range(0, len(results[0]), 2):
        assert results[0][i] == results[0][i + 1]


def _coalesced(rank, world):
    init_gloo()
    with tpcomm.Communicator() as comm:
        ts = [exact_input(n, rank, dt).view(shape) for n, dt, shape in
              [(6, torch.float32, (2, 3)), (5, torch.bfloat16, (5,)), (1, torch.float32, (1,)),
               (0, torch.float16, (0,)), (77, torch.float32, (7, 11))]]
        refs = [t.clone() for t in ts]
        for r in refs:
            dist.all_reduce(r)
        got = comm.all_reduce_coalesced(ts)
        assert got is ts
        for t, r in zip(ts, refs):
            assert torch.equal(t, r)
        calls = comm.stats()["ops"]["all_reduce_coalesced"]
        return sum(v["calls"] for v in calls.values())


def test_all_reduce_coalesced_one_collective_per_dtype():
    assert run(_coalesced, 2) == [3, 3]  # float32, bfloat16, float16


def _fallbacks(rank, world):
    init_gloo()
    with tpcomm.Communicator() as comm:
        x = torch.arange(10, dtype=torch.float64) + rank
        ref = x.clone()
        dist.all_reduce(ref)
        assert torch.equal(comm.all_reduce(x), ref)
        i = torch.arange(6, dtype=torch.int32) + rank
        assert torch.equal(comm.all_reduce(i, algorithm="torch"), i * 0 + (2 * torch.arange(6) + 1).int())
        return comm.backend_name, comm.stats()["fallbacks"]


def test_unsupported_dtype_goes_to_torch_distributed_and_is_counted():
    (name, fallbacks), _ = run(_fallbacks, 2)
    assert name == "shm"
    assert fallbacks["dtype float64 has no tpcomm kernel"] == 1
    assert sum(fallbacks.values()) == 2


def _disabled(rank, world):
    init_gloo()
    with tpcomm.Communicator() as comm:
        x = exact_input(100, rank, torch.float32)
        ref = x.clone()
        dist.all_reduce(ref)
        assert torch.equal(comm.all_reduce(x), ref)
        return comm.backend_name, comm.disabled_reason, comm.stats()["fallbacks"]


def test_tpcomm_disable_sends_everything_to_torch_distributed():
    (name, reason, fallbacks), _ = run(_disabled, 2, env={"TPCOMM_DISABLE": "1"})
    assert name == "torch" and reason == "TPCOMM_DISABLE=1"
    assert fallbacks == {"TPCOMM_DISABLE=1": 1}


def _two_communicators(rank, world):
    init_gloo()
    sub = dist.new_group([0, 1])
    a = tpcomm.Communicator()
    b = tpcomm.Communicator(sub) if rank in (0, 1) else None
    x = exact_input(500, rank, torch.float32)
    ref = x.clone()
    dist.all_reduce(ref)
    for _ in range(5):
        assert torch.equal(a.all_reduce(x), ref)
        if b is not None:
            ref_sub = x.clone()
            dist.all_reduce(ref_sub, group=sub)
            assert torch.equal(b.all_reduce(x), ref_sub)
    a.close()
    if b is not None:
        b.close()
    return True


def test_two_communicators_on_overlapping_groups():
    assert run(_two_communicators, 3) == [True] * 3


def _fused_norm(rank, world):
    init_gloo()
    from tpcomm import reference
    with tpcomm.Communicator() as comm:
        out = []
        for dtype in DTYPES:
            g = torch.Generator().manual_seed(7)  # same weight and residual on every rank
            h = 96
            x = exact_input(5 * h, rank, dtype).view(5, h)
            residual = torch.randn(5, h, generator=g).to(dtype)
            weight = torch.rand(h, generator=g).to(dtype) + 0.5
            xr, rr = x.clone(), residual.clone()
            dist.all_reduce(xr)
            ref_normed, ref_res = reference.add_rms_norm(xr, rr, weight, 1e-5)
            normed, res = comm.all_reduce_add_rms_norm(x, residual, weight, 1e-5)
            assert res is residual
            assert torch.equal(res, ref_res), dtype
            assert torch.equal(normed, ref_normed), dtype
            out.append(_digest(normed))
        with pytest.raises(ValueError, match="weight"):
            comm.all_reduce_add_rms_norm(x, residual, weight[:-1])
        return out


def test_all_reduce_add_rms_norm_matches_unfused_reference():
    a, b = run(_fused_norm, 2)
    assert a == b
