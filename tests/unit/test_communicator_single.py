"""The Communicator on a world of one process: argument checking and the local path."""
import logging

import pytest
import torch
import torch.distributed as dist

import tpcomm
from tpcomm.algorithms import choice
from tpcomm.groups.launch import free_port


@pytest.fixture(scope="module")
def comm():
    import os
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    c = tpcomm.Communicator()
    yield c
    c.close()
    dist.destroy_process_group()


def test_local_ops(comm):
    x = torch.arange(10, dtype=torch.float32)
    assert comm.backend_name == "local"
    assert torch.equal(comm.all_reduce(x), x)
    assert torch.equal(comm.all_gather(x), x)
    assert torch.equal(comm.reduce_scatter(x), x)
    y = x.clone()
    assert comm.all_reduce_(y) is y
    a, b = torch.ones(3), torch.ones(2, 2, dtype=torch.bfloat16)
    assert comm.all_reduce_coalesced([a, b]) == [a, b]
    st = comm.stats()
    assert st["ops"]["all_reduce"]["local"]["calls"] >= 2
    assert st["ops"]["all_reduce_coalesced"]["local"]["calls"] == 2  # one per dtype


def test_zero_size(comm):
    x = torch.empty(0, 5)
    assert comm.all_reduce(x).shape == (0, 5)
    assert comm.all_gather(x).shape == (0, 5)


@pytest.mark.parametrize("call,match", [
    (lambda c: c.all_reduce(torch.ones(4, 4).t()), "contiguous.*strides"),
    (lambda c: c.all_reduce(torch.ones(4, dtype=torch.bool)), "dtype"),
    (lambda c: c.all_reduce(torch.ones(4, dtype=torch.complex64)), "dtype"),
    # no backend reduces int16 (gloo said "Invalid scalar type" mid-collective): refused first
    (lambda c: c.all_reduce(torch.ones(4, dtype=torch.int16)),
     r"torch.int16 \(gloo and NCCL have no int16.*cast to int32\).*int32"),
    (lambda c: c.all_gather(torch.ones(4, dtype=torch.int16)), "int16"),
    (lambda c: c.all_reduce([1.0, 2.0]), "torch.Tensor"),
    (lambda c: c.all_reduce(torch.ones(4), out=torch.empty(5)), "out must be"),
    (lambda c: c.all_reduce(torch.ones(4), out=torch.empty(4, dtype=torch.float16)), "out must be"),
    (lambda c: c.all_reduce(torch.ones(4), out=torch.empty(8)[::2]), "out must be contiguous"),
    (lambda c: c.all_reduce(torch.ones(4), algorithm="ring"), "no algorithm 'ring'"),
    (lambda c: c.all_reduce(torch.ones(4), algorithm="fastest"), "no algorithm"),
    (lambda c: c.reduce_scatter(torch.tensor(1.0)), "divisible"),
    (lambda c: c.all_gather(torch.ones(4), out=torch.ones(8)), "out must be"),
    (lambda c: c.all_reduce_coalesced(torch.ones(3)), "list of tensors"),
    (lambda c: c.all_reduce(torch.ones(4), algorithm="two_level"), "spans nodes"),
    (lambda c: c.all_reduce(torch.ones(4, dtype=torch.float64), algorithm="one_shot"), "float32"),
])
def test_bad_input_raises_clear_error(comm, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(comm)


def test_all_gather_and_reduce_scatter_out_may_not_overlap_input(comm):
    buf = torch.zeros(8)
    with pytest.raises(ValueError, match="^all_gather: out must not overlap the input$"):
        comm.all_gather(buf[:8], out=buf)
    with pytest.raises(ValueError, match="^reduce_scatter: out must not overlap the input$"):
        comm.reduce_scatter(buf, out=buf)


def test_world_one_needs_no_fallback(comm):
    x = torch.arange(5, dtype=torch.float64)
    assert torch.equal(comm.all_reduce(x), x)  # a local copy, whatever the dtype
    assert comm.stats()["fallbacks"] == {}


def test_constructor_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        tpcomm.Communicator(timeout_s=0)
    with pytest.raises(ValueError, match="max_bytes"):
        tpcomm.Communicator(max_bytes=16)
    with pytest.raises(ValueError, match="cpu and cuda"):
        tpcomm.Communicator(device="meta")


def test_use_after_close():
    c = tpcomm.Communicator()
    c.close()
    c.close()  # twice is fine
    with pytest.raises(tpcomm.CommunicatorClosedError):
        c.all_reduce(torch.ones(2))


def test_context_manager_and_repr():
    with tpcomm.Communicator() as c:
        assert "world_size=1" in repr(c)
    with pytest.raises(tpcomm.CommunicatorClosedError):
        c.all_gather(torch.ones(2))


def test_needs_initialized_torch_distributed(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(tpcomm.TpcommError, match="init_process_group"):
        tpcomm.Communicator()


class _FusedNormBackend:
    """Stands in for the GPU engine: records the fused call instead of launching a kernel."""
    broken = p2p_check = None

    @staticmethod
    def supports(op):
        return op == "all_reduce_add_rms_norm"

    def __init__(self):
        self.calls = []

    def fused_norm_max_hidden(self):
        return 16384

    def all_reduce_add_rms_norm(self, x, residual, weight, eps, normed):
        self.calls.append(tuple(x.shape))
        normed.fill_(7.0)


class _CoreOnlyEngine:
    """An engine with the three collectives only (as the CPU's)."""
    broken = p2p_check = None

    @staticmethod
    def supports(op):
        return op in ("all_reduce", "reduce_scatter", "all_gather")


def test_fused_norm_routing_is_opt_in_and_limited_to_gpu_kernel_algorithms(comm):
    x = torch.ones(2, 8)
    w = torch.ones(8)
    epi = (torch.zeros(2, 8), w, 1e-6)
    saved = comm._backend, comm._fused_norm
    try:
        comm._backend = _FusedNormBackend()
        comm._fused_norm = False                  # TPCOMM_FUSED_NORM unset: never fused
        assert not comm._should_fuse_norm(choice("one_shot"), x, epi)
        comm._fused_norm = True
        assert comm._should_fuse_norm(choice("one_shot"), x, epi)
        assert comm._should_fuse_norm(choice("two_shot"), x, epi)
        for algo in ("torch", "two_level", "local"):   # NCCL / gloo, across nodes, world 1
            assert not comm._should_fuse_norm(choice(algo), x, epi)
        assert not comm._should_fuse_norm(choice("one_shot"), torch.ones(2, 16385),
                                          (torch.zeros(2, 16385), torch.ones(16385), 1e-6))
        assert not comm._should_fuse_norm(choice("one_shot"), x, (epi[0], torch.ones(16)[::2], 1e-6))
        comm._backend = _CoreOnlyEngine()         # an engine without the fused kernel (CPU)
        assert not comm._should_fuse_norm(choice("one_shot"), x, epi)
    finally:
        comm._backend, comm._fused_norm = saved


class _FusedGemmBackend:
    """Stands in for the GPU engine's fused GEMM ops: records each call, writes a marker."""
    broken = p2p_check = None

    @staticmethod
    def supports(op):
        return op in ("matmul_reduce_scatter", "all_gather_matmul", "matmul_all_reduce")

    def __init__(self):
        self.calls = []

    def _record(self, op, a, b, out):
        self.calls.append((op, tuple(a.shape), tuple(out.shape)))
        out.fill_(3.0)

    def matmul_reduce_scatter(self, a, b, out):
        self._record("matmul_reduce_scatter", a, b, out)

    def all_gather_matmul(self, a, b, out):
        self._record("all_gather_matmul", a, b, out)

    def matmul_all_reduce(self, a, b, out):
        self._record("matmul_all_reduce", a, b, out)


def test_fused_gemm_ops_route_to_the_engine_or_report_why_not(comm):
    """method="fused": the engine's kernel where it has one (stats name it "fused"); else
    False, the fallback counted with its reason, and the overlap op takes the pipeline."""
    a, b = torch.ones(4, 3), torch.ones(3, 5)
    for name in ("matmul_reduce_scatter_fused", "all_gather_matmul_fused",
                 "matmul_all_reduce_fused"):
        assert getattr(comm, name)(a, b, torch.empty(4, 5)) is False   # world 1: no engine
    fallbacks = comm.stats()["fallbacks"]
    for op in ("matmul_reduce_scatter", "all_gather_matmul", "matmul_all_reduce"):
        assert any(why.startswith(f"{op}(method='fused') needs the GPU backend")
                   for why in fallbacks), fallbacks
    assert torch.equal(tpcomm.matmul_all_reduce(a, b, comm, method="fused"), a @ b)
    assert torch.equal(tpcomm.all_gather_matmul(a, b, comm, method="fused"), a @ b)
    saved = comm._backend
    try:
        comm._backend = fake = _FusedGemmBackend()
        assert torch.equal(tpcomm.matmul_reduce_scatter(a, b, comm, method="fused"),
                           torch.full((4, 5), 3.0))
        assert torch.equal(tpcomm.all_gather_matmul(a, b, comm, method="fused"),
                           torch.full((4, 5), 3.0))
        out = torch.empty(4, 5)
        assert tpcomm.matmul_all_reduce(a, b, comm, method="fused", out=out) is out
        assert torch.equal(out, torch.full((4, 5), 3.0))
        # the gathered rows are not kept by the fused kernel: return_gathered takes the pipeline
        got, gathered = tpcomm.all_gather_matmul(a, b, comm, method="fused",
                                                 return_gathered=True)
        assert torch.equal(got, a @ b) and torch.equal(gathered, a)
        assert [c[0] for c in fake.calls] == ["matmul_reduce_scatter", "all_gather_matmul",
                                              "matmul_all_reduce"]
        ops = comm.stats()["ops"]
        for op in ("matmul_reduce_scatter", "all_gather_matmul", "matmul_all_reduce"):
            assert ops[op]["fused"]["calls"] == 1, ops
        with pytest.raises(ValueError, match="method must be 'pipeline' or 'fused', got 'x'"):
            tpcomm.all_gather_matmul(a, b, comm, method="x")
    finally:
        comm._backend = saved


def test_engines_state_what_they_support():
    """The engine contract: supports(op) instead of attribute probes; the CPU engine runs the
    three collectives only, the GPU engine every op of the contract (checked on the class:
    no GPU here)."""
    from tpcomm.cpu.shm_collectives import ShmCollectives
    from tpcomm.cuda.p2p_collectives import P2PCollectives
    from tpcomm.engine import CORE_OPS, EXTRA_OPS
    for op in CORE_OPS:
        assert ShmCollectives.supports(op)
    for op in EXTRA_OPS + ("no_such_op",):
        assert not ShmCollectives.supports(op)
    gpu = P2PCollectives.__new__(P2PCollectives)     # no buffer: supports() reads the class
    assert all(gpu.supports(op) for op in CORE_OPS + EXTRA_OPS)
    assert not gpu.supports("no_such_op")
    for op in EXTRA_OPS:                              # every extra op is a method of the engine
        assert callable(getattr(P2PCollectives, op))


def test_cpu_hot_path_takes_a_decided_call_and_leaves_bad_ones_to_the_checks(comm):
    """A CPU Communicator's repeated all_reduce takes the hot path (issue 16: answered from the
    decision cache, no capture query) with the same books; an ``out`` that does not fit still
    gets the general path's error, not a silent hot-path call."""
    x, y = torch.arange(12, dtype=torch.float32).view(3, 4), torch.empty(3, 4)
    assert comm._hot
    before = comm.stats()["ops"].get("all_reduce", {}).get("local", {}).get("calls", 0)
    comm.all_reduce(x, out=y)                                 # decided by the general path
    assert comm._all_reduce_hot(x, y, "auto") is y            # then on the hot path
    assert torch.equal(comm.all_reduce(x, out=y), x) and torch.equal(y, x)
    assert comm.stats()["ops"]["all_reduce"]["local"]["calls"] == before + 3
    assert comm._recorder.records()[-1]["algorithm"] == "local"
    for bad, match in ((torch.empty(4, 3), "out must be"), (torch.empty(12), "out must be"),
                       (torch.empty(3, 4, dtype=torch.float16), "out must be"),
                       (torch.empty(3, 8)[:, ::2], "contiguous")):
        assert comm._all_reduce_hot(x, bad, "auto") is None
        with pytest.raises(ValueError, match=match):
            comm.all_reduce(x, out=bad)


def test_cpu_hot_path_refuses_other_devices_and_a_busy_communicator(comm):
    """The CPU hot path's device check is ``is_cpu``, not ``get_device()`` (which says -1 of a
    meta tensor as of a CPU one): a meta ``x`` or ``out`` goes to the general path and gets its
    error, as before the hot path existed. A thread already inside (the busy flag taken) is
    refused there too, with the general path's message; the flag is back after each call."""
    x, y = torch.ones(3, 4), torch.empty(3, 4)
    comm.all_reduce(x, out=y)
    comm.all_reduce_(x)
    assert comm._all_reduce_hot(x, y, "auto") is y
    meta = torch.empty(3, 4, device="meta")
    for a, o in ((x, meta), (meta, y), (meta, None)):
        assert comm._all_reduce_hot(a, o, "auto") is None
        with pytest.raises(ValueError, match="on meta|out must be"):
            comm.all_reduce(a, out=o)
    with pytest.raises(ValueError, match="on meta"):
        comm.all_reduce_(meta)
    assert comm._free == [None]                # every call above gave the flag back
    comm._free.pop()                           # as a thread inside a call holds it
    try:
        assert comm._all_reduce_hot(x, y, "auto") is None
        assert comm._all_reduce_hot(x, x, "auto") is None
        for call in (lambda: comm.all_reduce(x, out=y), lambda: comm.all_reduce_(x)):
            with pytest.raises(tpcomm.TpcommError, match="another thread"):
                call()
    finally:
        comm._free.append(None)
    assert comm.all_reduce(x, out=y) is y


def test_cpu_hot_path_allocates_nothing_per_call(comm):
    import tracemalloc
    x, y = torch.ones(256), torch.empty(256)
    comm.all_reduce(x, out=y)
    tracemalloc.start()
    try:
        for _ in range(200):     # past the flight recorder's ring: every record in it traced
            comm.all_reduce(x, out=y)
            comm.all_reduce_(x)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            comm.all_reduce(x, out=y)
            comm.all_reduce_(x)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16384, f"the CPU hot path kept {grown} bytes over 4000 calls"
