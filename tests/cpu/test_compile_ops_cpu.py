"""Every public op under torch.compile(fullgraph=True) on 2 and 3 CPU ranks (shared-memory
engine): the graph holds the registered op (torch.ops.tpcomm.*), and the compiled function gives
bitwise what the eager one gives, on exact-sum inputs, with poisoned outputs where the caller
passes them. Sizes change without recompiling, and the algorithm is still chosen per call.

backend="aot_eager": what is tested is the tracing (no graph break, fake implementations,
declared mutations, functionalization); inductor's code generation adds nothing to it and costs
tens of seconds of C++ compilation per rank (tests/cpu/test_compile_model_cpu.py runs inductor).
"""
import pytest
import torch

from _dist import exact_input, init_gloo, run

pytestmark = pytest.mark.cpu


def _checks(group):
    """Every op compiled against eager on the ranks of ``group`` (results: see the test)."""
    import tpcomm
    from tpcomm.errors import CommunicatorClosedError
    seen = []

    def backend(gm, example_inputs):     # aot_eager, recording the ops of each graph
        from torch._dynamo.backends.debugging import aot_eager
        seen.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return aot_eager(gm, example_inputs)

    def compiled(fn, **kw):
        return torch.compile(fn, fullgraph=True, backend=backend, **kw)

    out = {"checks": [], "ops_in_graphs": None}

    def check(name, got, want):
        got = got if isinstance(got, (tuple, list)) else (got,)
        want = want if isinstance(want, (tuple, list)) else (want,)
        ok = len(got) == len(want) and all(
            g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)
            for g, w in zip(got, want))
        out["checks"].append((name, ok))

    comm = tpcomm.Communicator(group)
    R, rank = comm.world_size, comm.rank
    for dtype in (torch.float32, torch.bfloat16):
        x = exact_input(6 * R * 5, rank, dtype).view(6 * R, 5)

        def f(x, o_ar, o_rs, o_ag, inplace, inplace_op):
            y = comm.all_reduce(x)
            comm.all_reduce(x, out=o_ar)
            comm.reduce_scatter(x, out=o_rs)
            comm.all_gather(x, out=o_ag)
            comm.all_reduce_(inplace)                      # graph inputs, mutated in place
            torch.ops.tpcomm.all_reduce_(inplace_op, comm.handle, "auto")
            return y, comm.reduce_scatter(y * 2), comm.all_gather(x[:3])

        def args():    # outputs poisoned first
            return [x] + [torch.full(s, float("nan"), dtype=dtype) for s in
                          ((6 * R, 5), (6, 5), (6 * R * R, 5))] + [x.clone(), x.clone()]
        got, want = args(), args()
        got_ret, want_ret = compiled(f)(*got), f(*want)
        check(f"all_reduce, reduce_scatter, all_gather (new, out=, in place) {dtype}",
              list(got_ret) + got[1:], list(want_ret) + want[1:])
        check(f"torch.ops.tpcomm.all_reduce_ {dtype}", got[-1], want[-2])

    # coalesced (two dtypes, in place); the sublayer end through the Communicator (on the CPU:
    # all-reduce op + epilogue) and through the fused op itself (x, residual in place); GEMM +
    # collective, exact in float32 (small integers)
    H = 24
    w = (exact_input(H, 3, torch.float32, 4) / 8 + 1)
    g = torch.Generator().manual_seed(rank)
    a = torch.randint(-3, 4, (4 * R, 16), generator=g).float()
    bm = torch.randint(-3, 4, (16, 8), generator=torch.Generator().manual_seed(9)).float()

    def f2(c1, c2, c3, x1, r1, x2, r2, a, b):
        comm.all_reduce_coalesced([c1, c2, c3])
        n1, _ = comm.all_reduce_add_rms_norm(x1, r1, w, 1e-5)
        n2 = torch.ops.tpcomm.all_reduce_add_rms_norm(x2, r2, w, 1e-5, comm.handle, "auto")
        return (n1, n2, tpcomm.matmul_all_reduce(a, b, comm),
                tpcomm.matmul_reduce_scatter(a, b, comm),
                *tpcomm.all_gather_matmul(a[:4], b, comm, return_gathered=True))

    def args2():
        x0 = exact_input(3 * H, rank, torch.float32, 5).view(3, H)
        r0 = exact_input(3 * H, 9, torch.float32, 6).view(3, H)
        return [exact_input(7, rank, torch.float32, 1), exact_input(5, rank, torch.bfloat16, 2),
                exact_input(3, rank, torch.float32, 3).view(3, 1), x0, r0.clone(), x0.clone(),
                r0.clone(), a, bm]
    got, want = args2(), args2()
    got_ret, want_ret = compiled(f2)(*got), f2(*want)
    check("all_reduce_coalesced", got[:3], want[:3])
    check("all_reduce_add_rms_norm: x, residual", got[3:7], want[3:7])
    check("matmul_all_reduce, matmul_reduce_scatter, all_gather_matmul", got_ret[2:],
          want_ret[2:])
    for n in got_ret[:2]:   # normed: the same arithmetic, another code path (1e-6)
        torch.testing.assert_close(n, want_ret[0], rtol=1e-6, atol=1e-6)

    # sizes change without recompiling, and the op still picks the algorithm per call (at 3
    # ranks the shared-memory engine takes two_shot from 512 KiB)
    def f_dyn(x):
        return comm.all_reduce(x) + 1
    torch._dynamo.utils.counters.clear()
    comm_stats_before = comm.stats()["ops"].get("all_reduce", {})
    fd = compiled(f_dyn)
    for n in (5, 7, 9, 300, 1000, 200_001):
        xi = exact_input(n, rank, torch.float32, n)
        check(f"dynamic size {n}", fd(xi), f_dyn(xi))
    out["recompiles"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    after = comm.stats()["ops"]["all_reduce"]
    out["algorithms"] = sorted(a for a in after if after[a]["calls"] > comm_stats_before.get(
        a, {}).get("calls", 0))
    out["ops_in_graphs"] = sorted(set().union(*seen))
    handle = comm.handle
    comm.close()
    try:
        torch.ops.tpcomm.all_reduce(exact_input(4, rank, torch.float32), handle, "auto")
        out["closed"] = "no error"
    except CommunicatorClosedError as e:
        out["closed"] = str(e)
    return out


def _ranks(rank, world):
    """3 ranks, then ranks 0 and 1 in a group of their own (one spawn: the compile stack's
    start-up is paid once per process)."""
    import torch.distributed as dist
    init_gloo()
    pair = dist.new_group([0, 1])
    out = {3: _checks(None)}
    if rank < 2:
        out[2] = _checks(pair)
    dist.barrier()
    return out


def test_compiled_ops_equal_eager_on_2_and_3_ranks():
    results = run(_ranks, 3)
    for world, r in [(w, res[w]) for res in results for w in (2, 3) if w in res]:
        bad = [name for name, ok in r["checks"] if not ok]
        assert not bad, bad
        assert len(r["checks"]) >= 11
        ops = r["ops_in_graphs"]
        for op in ("all_reduce", "all_reduce_", "reduce_scatter", "all_gather",
                   "all_reduce_coalesced", "all_reduce_add_rms_norm", "matmul_all_reduce",
                   "matmul_reduce_scatter", "all_gather_matmul"):
            assert f"tpcomm.{op}" in ops, (op, ops)
        # the first size compiles a static graph, the second a dynamic one: no more after
        assert r["recompiles"] <= 2, r["recompiles"]
        assert r["algorithms"] == (["one_shot", "two_shot"] if world == 3 else ["one_shot"])
        assert "no open Communicator has the handle" in r["closed"]
    assert sum(2 in res for res in results) == 2
