"""The native core of the CPU collectives (tpcomm/cpu/_shm_core.c) against the Python path.

The two implement one protocol with one reduction order, so they must agree bitwise on every
input, not only on exact sums: random floats, every dtype, odd sizes, 2 and 3 ranks, and a group
where one rank runs the core and the other the Python path. Also: a peer that never calls ends
the core's wait in a bounded PeerTimeoutError; the call path allocates nothing after warm-up;
without a compiler the collectives fall back to the Python path and say why once.
"""
import hashlib
import logging
import os
import time
import tracemalloc

import pytest
import torch
import torch.distributed as dist

import tpcomm
from _dist import init_gloo, run
from tpcomm.cpu import native
from tpcomm.cpu.shm_collectives import DTYPES, sum_in_rank_order
from tpcomm.settings import reload_settings

pytestmark = pytest.mark.cpu

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# odd sizes (tails of every vector width), one that straddles the 16-bit kernels' 2048-element
# blocks, and one above the 64 KiB buffer so the chunked path runs
NUMELS = [1, 3, 7, 8, 9, 17, 1000, 2049, 4097, 40001]
MAX_BYTES = 64 << 10


def _core_or_skip():
    core = native.load()
    if core is None:
        pytest.skip(f"the native core cannot be built here: {native.why_not()}")
    return core


def _use_path(path: str) -> None:
    """Make this process's next Communicator use the native core or the Python path."""
    os.environ["TPCOMM_CPU_NATIVE"] = "1" if path == "native" else "0"
    reload_settings()
    native.reset()


def _inputs(rank: int, dtype, n: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + n)
    if kind == "exact":
        return ((torch.arange(n) * 3 + rank * 5) % 17 - 8).to(dtype)
    scale = {"randn": 1.0, "large": 3e3, "tiny": 1e-5}[kind]
    return (torch.randn(n, generator=g) * scale).to(dtype)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _every_op(rank, world, path):
    """Every op, dtype, size and input kind on ``path``; the digests of all outputs."""
    init_gloo()
    _use_path(path)
    comm = tpcomm.Communicator(max_bytes=MAX_BYTES)
    assert comm._backend.native == (path == "native"), native.why_not()
    digests = []
    for dtype in FLOATS:
        for n in NUMELS:
            for kind in ("exact", "randn", "large", "tiny"):
                x = _inputs(rank, dtype, n, kind)
                for algo in ("one_shot", "two_shot"):
                    out = torch.full_like(x, float("nan"))
                    comm.all_reduce(x, out=out, algorithm=algo)
                    digests.append(_digest(out))
                xs = _inputs(rank, dtype, world * n, kind).view(world, n)
                digests.append(_digest(comm.reduce_scatter(xs)))
                digests.append(_digest(comm.all_gather(x)))
            # in place, as a decode loop calls it
            y = _inputs(rank, dtype, n, "randn")
            comm.all_reduce_(y)
            digests.append(_digest(y))
    comm.close()
    return digests


@pytest.mark.parametrize("world", [2, 3])
def test_native_and_python_paths_are_bitwise_equal(world):
    _core_or_skip()
    on_native = run(_every_op, world, "native")
    on_python = run(_every_op, world, "python")
    assert on_native[0] == on_python[0]                 # rank 0: the same bits on both paths
    for r in range(world):
        assert on_native[r] == on_python[r], f"rank {r} differs between the paths"


def _mixed(rank, world):
    return _every_op(rank, world, "native" if rank == 0 else "python")


def test_a_native_rank_and_a_python_rank_interoperate():
    _core_or_skip()
    mixed = run(_mixed, 2)
    alone = run(_every_op, 2, "python")
    assert mixed == alone


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("nsrc", [1, 2, 3, 4])
@pytest.mark.parametrize("f16c", [-1, 0])
def test_reduce_kernels_round_like_torch(dtype, nsrc, f16c):
    """The core's reduction of local tensors against sum_in_rank_order (the Python path's),
    including the portable float16 conversions (f16c=0) on every finite half value."""
    core = _core_or_skip()
    core.use_f16c(f16c)
    try:
        n = 65535 if dtype == torch.float16 else 10007
        g = torch.Generator().manual_seed(nsrc)
        if dtype == torch.float16:   # every half bit pattern, finite ones, shuffled per source
            every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
            finite = every.view(torch.float16)[torch.isfinite(every.view(torch.float16))]
            srcs = [finite[torch.randperm(finite.numel(), generator=g)][:n].contiguous()
                    for _ in range(nsrc)]
        else:
            srcs = [(torch.randn(n, generator=g) * 100).to(dtype) for _ in range(nsrc)]
        n = srcs[0].numel()
        ref = torch.empty(n, dtype=dtype)
        sum_in_rank_order(srcs, ref, torch.empty(n, dtype=torch.float32))
        out = torch.full((n,), float("nan"), dtype=dtype)
        core.reduce(DTYPES[dtype], out.data_ptr(), [s.data_ptr() for s in srcs], n)
        # bitwise, NaNs included (inf - inf among the float16 sums): both round the same
        # float32 value with the same rule
        differ = (out.view(torch.uint8) != ref.view(torch.uint8)).nonzero()
        assert differ.numel() == 0, f"first differing bytes: {differ[:5].flatten().tolist()}"
    finally:
        core.use_f16c(-1)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("nsrc", [1, 2, 3, 4])
def test_reduce_kernels_may_write_over_any_source(dtype, nsrc):
    """An in-place call reduces from its own input into it (out is source ``rank``): every
    position of out among the sources gives the out-of-place result bitwise (n spans several
    of the kernels' 2048-element blocks, with a tail)."""
    core = _core_or_skip()
    n = 3 * 2048 + 37
    g = torch.Generator().manual_seed(7 + nsrc)
    srcs = [(torch.randn(n, generator=g) * 100).to(dtype) for _ in range(nsrc)]
    ref = torch.empty(n, dtype=dtype)
    core.reduce(DTYPES[dtype], ref.data_ptr(), [s.data_ptr() for s in srcs], n)
    for k in range(nsrc):
        bufs = [s.clone() for s in srcs]
        core.reduce(DTYPES[dtype], bufs[k].data_ptr(), [b.data_ptr() for b in bufs], n)
        assert torch.equal(bufs[k].view(torch.uint8), ref.view(torch.uint8)), f"out = source {k}"


def _never_called(rank, world, timeout_s):
    init_gloo()
    comm = tpcomm.Communicator(timeout_s=timeout_s)
    assert comm._backend.native
    x = torch.ones(1024)
    comm.all_reduce_(x)
    t0 = time.monotonic()
    try:
        if rank == 0:
            comm.all_reduce_(x)   # rank 1 never comes
            return ("returned", time.monotonic() - t0, "")
        time.sleep(timeout_s + 3)
        return ("slept", 0.0, "")
    except tpcomm.PeerTimeoutError as e:
        return (type(e).__name__, time.monotonic() - t0, str(e))
    finally:
        comm.close()


def test_native_wait_for_a_peer_that_never_calls_is_bounded():
    _core_or_skip()
    timeout_s = 1.5
    results = run(_never_called, 2, timeout_s)
    kind, waited, msg = results[0]
    assert kind == "PeerTimeoutError", results[0]
    assert timeout_s <= waited < timeout_s + 1.0, waited
    assert "peer" in msg and "1" in msg and "all_reduce" in msg, msg


def _allocations(rank, world):
    init_gloo()
    comm = tpcomm.Communicator()
    x = torch.ones(4096)
    for _ in range(200):        # warm-up: decisions, views, stats entries
        comm.all_reduce_(x)
    tracemalloc.start()
    for _ in range(500):        # the flight recorder's ring (64 records) now holds traced records
        comm.all_reduce_(x)
    before = tracemalloc.take_snapshot()
    for _ in range(2000):
        comm.all_reduce_(x)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if s.size_diff > 0)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(50):
            comm.all_reduce_(x)
    torch_allocs = sum(1 for e in prof.events() if e.name == "[memory]" and e.cpu_memory_usage > 0)
    native_path = comm._backend.native
    comm.close()
    return grown, torch_allocs, native_path


@pytest.mark.parametrize("path", ["native", "python"])
def test_call_path_allocates_nothing_after_warm_up(path):
    if path == "native":
        _core_or_skip()
    results = run(_allocations, 2, env={"TPCOMM_CPU_NATIVE": "1" if path == "native" else "0"})
    for grown, torch_allocs, native_path in results:
        assert native_path == (path == "native")
        # replaced records and tracemalloc's own bookkeeping move a few hundred bytes; 2000
        # calls that each kept one small object would show tens of kilobytes
        assert grown < 4096, f"Python heap grew by {grown} bytes over 2000 calls"
        assert torch_allocs == 0, f"{torch_allocs} torch allocations in 50 calls"


def test_without_a_compiler_the_python_path_runs_and_says_why_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TPCOMM_CACHE_DIR", str(tmp_path))   # no cached build to find
    monkeypatch.setenv("TPCOMM_CPU_NATIVE", "1")
    reload_settings()
    native.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="tpcomm"):
            assert native.load() is None
            assert native.load() is None
        assert "no C compiler" in native.why_not()
        warned = [r for r in caplog.records if "native core is unavailable" in r.getMessage()]
        assert len(warned) == 1
    finally:
        monkeypatch.undo()
        reload_settings()
        native.reset()


def _fallback_ranks(rank, world):
    init_gloo()
    comm = tpcomm.Communicator()
    x = _inputs(rank, torch.float32, 1001, "exact")
    ref = x.clone()
    dist.all_reduce(ref)
    comm.all_reduce_(x)
    out = (comm._backend.native, native.why_not(), torch.equal(x, ref), comm.backend_name)
    comm.close()
    return out


def test_ranks_without_a_compiler_run_the_python_path(tmp_path):
    results = run(_fallback_ranks, 2, env={"CC": str(tmp_path / "no-such-cc"),
                                          "TPCOMM_CACHE_DIR": str(tmp_path)})
    for is_native, why, correct, backend in results:
        assert backend == "shm" and not is_native and correct
        assert "no C compiler" in why


def test_env_switch_chooses_the_python_path(monkeypatch):
    monkeypatch.setenv("TPCOMM_CPU_NATIVE", "0")
    reload_settings()
    native.reset()
    try:
        assert native.load() is None and native.why_not() == "TPCOMM_CPU_NATIVE=0"
    finally:
        monkeypatch.undo()
        reload_settings()
        native.reset()


def test_build_is_cached_by_source_and_compiler(tmp_path, monkeypatch):
    if native.compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("TPCOMM_CACHE_DIR", str(tmp_path))
    reload_settings()
    native.reset()
    try:
        assert native.load() is not None, native.why_not()
        built = list((tmp_path / "native").iterdir())
        assert len(built) == 1 and built[0].name.startswith("_shm_core-")
        mtime = built[0].stat().st_mtime_ns
        native.reset()
        assert native.load() is not None
        assert [p.stat().st_mtime_ns for p in (tmp_path / "native").iterdir()] == [mtime]
    finally:
        monkeypatch.undo()
        reload_settings()
        native.reset()


def _hot_calls(rank, world):
    """Repeated calls of one shape: the hot path caches the native engine's per-shape call
    (``hot_all_reduce``), whose results and books are those of the general path's call."""
    init_gloo()
    _use_path("native")
    comm = tpcomm.Communicator(max_bytes=MAX_BYTES)
    out = []
    for algo in ("one_shot", "two_shot"):
        x = _inputs(rank, torch.float32, 1000, "randn")
        want = torch.full_like(x, float("nan"))
        comm.all_reduce(x, out=want, algorithm=algo)       # the general path decides
        y = torch.full_like(x, float("nan"))
        comm.all_reduce(x, out=y, algorithm=algo)          # the hot path, the engine's call
        entry = comm._fast[(torch.float32, 1000, algo, False)]
        z = x.clone()
        comm.all_reduce_(z, algorithm=algo)                # in place: the same cached call
        out.append((entry[3] is not None, torch.equal(y, want), torch.equal(z, want),
                    comm.stats()["ops"]["all_reduce"][algo]["calls"]))
    # "auto" decides by the capture state on the GPU; a CPU call is never captured, so its
    # entry serves every call without the query (one dict lookup per call)
    x = _inputs(rank, torch.float32, 1000, "randn")
    want, y = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    comm.all_reduce(x, out=want)                           # the general path decides
    comm.all_reduce(x, out=y)                              # the hot path makes the entry

    def asked():
        raise AssertionError("the CPU hot path asked for the capture state")
    comm._capture = asked
    comm.all_reduce(x, out=y)
    out.append(((torch.float32, 1000, "auto") in comm._fast_any, torch.equal(y, want)))
    comm.close()
    return out


def test_hot_path_takes_the_native_engines_call_per_shape():
    _core_or_skip()
    for per_rank in run(_hot_calls, 2):
        assert per_rank == [(True, True, True, 3), (True, True, True, 3), (True, True)]


def _hot_rounds(rank, world):
    """Calls larger than one round (MAX_BYTES 64 KiB: 16384 float32 per round) on the hot path:
    the native engine's call loops over the rounds itself, with the results of the general
    path's run_rounds; a later size mismatch between the ranks, both shapes decided before,
    raises on every rank (the first round carries the whole call's numel)."""
    init_gloo()
    _use_path("native")
    comm = tpcomm.Communicator(max_bytes=MAX_BYTES, timeout_s=20.0)
    limit = comm._backend.round_limit("all_reduce", "one_shot", torch.float32)
    out = []
    for algo, n in (("one_shot", 3 * limit + 77), ("two_shot", 2 * limit + 1), ("auto", 40001)):
        x = _inputs(rank, torch.float32, n, "exact")
        before = sum(v["calls"] for v in comm.stats()["ops"].get("all_reduce", {}).values())
        want = torch.full_like(x, float("nan"))
        comm.all_reduce(x, out=want, algorithm=algo)       # the general path decides, in rounds
        ref = x.clone()
        dist.all_reduce(ref)
        y = torch.full_like(x, float("nan"))
        comm.all_reduce(x, out=y, algorithm=algo)          # the hot path: the engine's loop
        entry = comm._fast[(torch.float32, n, algo, False)]
        z = x.clone()
        comm.all_reduce_(z, algorithm=algo)                # in place
        after = sum(v["calls"] for v in comm.stats()["ops"]["all_reduce"].values())
        out.append((entry[3] is not None, torch.equal(want, ref), torch.equal(y, want),
                    torch.equal(z, want), after - before))
    # both sizes decided on both ranks, then called apart: a mismatch on every rank
    a, b = 2 * limit + 16, 3 * limit
    for n in (a, b):
        comm.all_reduce_(_inputs(rank, torch.float32, n, "exact"), algorithm="one_shot")
    mine = _inputs(rank, torch.float32, a if rank == 0 else b, "exact")
    try:
        comm.all_reduce_(mine, algorithm="one_shot")
        got = "no error"
    except tpcomm.MismatchError as e:
        got = type(e).__name__
    x = _inputs(rank, torch.float32, a, "exact")          # the next call is exact again
    ref = x.clone()
    dist.all_reduce(ref)
    comm.all_reduce_(x, algorithm="one_shot")
    comm.close()
    return out, got, torch.equal(x, ref)


def test_hot_path_runs_the_rounds_of_a_large_call_on_the_native_engine():
    _core_or_skip()
    for rows, got, after in run(_hot_rounds, 2):
        assert rows == [(True, True, True, True, 3)] * 3, rows
        assert got == "MismatchError" and after
