"""The Communicator's GPU all_reduce hot path (``_all_reduce_hot``, issue 16) on the CPU.

The path runs only for a CUDA Communicator; here it is called directly, on CPU tensors, with a
stand-in engine and the device index of a CPU tensor (-1): which calls it takes and which it
leaves to the general path (returning None, having done nothing), its bookkeeping, and that it
allocates nothing per call.
"""
import os
import tracemalloc
import types

import pytest
import torch
import torch.distributed as dist

import tpcomm
from tpcomm.algorithms import choice
from tpcomm.groups.launch import free_port


class Engine:
    name, device_type, broken, capacity, p2p_check = "p2p", "cuda", None, 1 << 20, None

    def __init__(self):
        self.calls = []

    @staticmethod
    def supports(op):
        return op == "all_reduce"

    def round_limit(self, op, name, dtype):
        return self.capacity // dtype.itemsize

    def all_reduce(self, x, out, algorithm, *, total=-1, offset=0):
        self.calls.append((x.data_ptr(), out.data_ptr(), algorithm))
        if len(self.calls) > 8:
            del self.calls[:4]

    def close(self):
        pass


@pytest.fixture()
def comm(monkeypatch):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    c = tpcomm.Communicator()
    c._backend = Engine()
    c.device = types.SimpleNamespace(index=-1, type="cuda")   # what x.get_device() says
    c._hot_cuda = True     # the hot path's CUDA checks (device index, capture state)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tpcomm.communicator, "_capturing", lambda: False)
    try:
        yield c
    finally:
        c._backend = None
        c.close()
        dist.destroy_process_group()


def _decide(comm, x, algo="one_shot/push", requested="one_shot"):
    """What the general path leaves behind after one such call: its decision (Choice, stats
    row, on the engine, in one round), its stats row."""
    on_engine = algo not in ("torch", "local", "two_level")
    chunk = comm._backend.round_limit("all_reduce", algo, x.dtype) if on_engine else 0
    c = choice(*algo.split("/"), chunk=chunk) if "/" in algo else choice(algo, chunk=chunk)
    comm._decisions[("all_reduce", x.numel() * x.element_size(), x.dtype, requested, False)] = \
        (c, comm._stats[("all_reduce", c.name)], on_engine, on_engine and x.numel() <= chunk)


def test_takes_a_decided_call_and_keeps_the_books(comm):
    x, out = torch.ones(64), torch.empty(64)
    assert comm._all_reduce_hot(x, out, "one_shot") is None      # not decided yet
    assert comm._backend.calls == []
    _decide(comm, x)
    assert comm._all_reduce_hot(x, out, "one_shot") is out
    assert comm._backend.calls[-1] == (x.data_ptr(), out.data_ptr(), "one_shot/push")
    assert comm._all_reduce_hot(x, x, "one_shot") is x          # in place
    y = comm._all_reduce_hot(x, None, "one_shot")               # a new output
    assert y.shape == x.shape and y.data_ptr() not in (x.data_ptr(), out.data_ptr())
    st = comm.stats()["ops"]["all_reduce"]["one_shot/push"]
    assert st["calls"] == 3 and st["bytes"] == 3 * 256      # (the stand-in decision: 0 before)
    recs = comm._recorder.records()
    assert [r["state"] for r in recs[-3:]] == ["done"] * 3 and recs[-1]["bytes"] == 256


@pytest.mark.parametrize("case", ["subclass", "strided", "out shape", "out dtype",
                                  "out strided", "torch decision", "local wrong dtype",
                                  "chunked", "broken", "closed", "busy"])
def test_leaves_the_unusual_to_the_general_path(comm, case):
    x, out = torch.ones(64), torch.empty(64)
    _decide(comm, x)
    if case == "subclass":
        x = torch.nn.Parameter(x, requires_grad=False)
    elif case == "strided":
        x = torch.ones(128)[::2]
    elif case == "out shape":
        out = torch.empty(8, 8)
    elif case == "out dtype":
        out = torch.empty(64, dtype=torch.float16)
    elif case == "out strided":
        out = torch.empty(128)[::2]
    elif case == "torch decision":
        _decide(comm, x, algo="torch")
    elif case == "local wrong dtype":   # world 1 copies only what the kernels would take
        x, out = torch.ones(64, dtype=torch.float64), torch.empty(64, dtype=torch.float64)
        _decide(comm, x, algo="local")
    elif case == "chunked":   # more than one engine round: the general path's loop
        comm._backend.capacity = 128
        _decide(comm, x)
    elif case == "broken":
        comm._backend.broken = "a peer timed out"
    elif case == "closed":
        comm._closed = True
    elif case == "busy":
        comm._free.pop()
    try:
        assert comm._all_reduce_hot(x, out, "one_shot") is None
    finally:
        comm._closed = False
        if case == "busy":
            comm._free.append(None)
    assert comm._backend.calls == []
    assert all(v["calls"] == 0 for v in comm.stats()["ops"]["all_reduce"].values())


def test_world_one_copy_on_the_hot_path(comm):
    """World 1 (no engine): the general path's 'local' decision is one copy into out (nothing in
    place), with its books; the engine is never called (2026-12-03 on an H200: the general path
    took 22.5-23.1 us per call for that copy)."""
    comm._backend = None
    x, out = torch.arange(64, dtype=torch.float32), torch.full((64,), float("nan"))
    _decide(comm, x, algo="local")
    assert comm._all_reduce_hot(x, out, "one_shot") is out
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert comm._all_reduce_hot(x, x, "one_shot") is x
    y = comm._all_reduce_hot(x, None, "one_shot")
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    st = comm.stats()["ops"]["all_reduce"]["local"]
    assert st["calls"] == 3 and st["bytes"] == 3 * 256
    # a world-2 group without an engine sends everything to torch.distributed: not here
    comm.world_size = 2
    try:
        assert comm._all_reduce_hot(x, out, "one_shot") is None
    finally:
        comm.world_size = 1


def _grown_over_calls(comm, x, out) -> int:
    """Bytes still traced after 2000 hot-path calls, measured past 200 warm-up calls (past the
    flight recorder's ring of 64 records: every record in it traced)."""
    tracemalloc.start()
    try:
        for _ in range(200):
            comm._all_reduce_hot(x, out, "one_shot")
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            comm._all_reduce_hot(x, out, "one_shot")
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_no_allocation_per_call(comm):
    x, out = torch.ones(64), torch.empty(64)
    _decide(comm, x)
    grown = _grown_over_calls(comm, x, out)
    # a per-call leak would keep at least 32 B x 2000 = 64 KB; allocator noise stays below
    assert grown < 16384, f"the GPU hot path kept {grown} bytes over 2000 calls"


def test_debug_mode_stays_on_the_general_path(monkeypatch):
    """TPCOMM_DEBUG=1 (read at construction) keeps every call, on either device, off the hot
    path; without it a decided call takes it."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        for debug in ("0", "1"):
            monkeypatch.setenv("TPCOMM_DEBUG", debug)
            tpcomm.settings.reload_settings()
            with tpcomm.Communicator() as c:
                x = c.all_reduce(torch.ones(64))          # decided by the general path
                assert c._hot is (debug == "0")
                _debug_call_stays_general(c, x, taken=debug == "0")
    finally:
        monkeypatch.delenv("TPCOMM_DEBUG")
        tpcomm.settings.reload_settings()
        dist.destroy_process_group()


def _debug_call_stays_general(comm, x, taken):
    calls = []
    comm._all_reduce_hot = lambda *a: calls.append(a) or x
    comm._check_tensor = lambda *a: (_ for _ in ()).throw(RuntimeError("general path"))
    if taken:
        assert comm.all_reduce(x) is x and len(calls) == 1
    else:
        with pytest.raises(RuntimeError, match="general path"):
            comm.all_reduce(x)
        assert calls == []


def test_a_plain_one_shot_is_decided_once_and_chunked_once(comm):
    """The Communicator makes the whole choice (mechanism, rounds) and the engine gets one round
    per call by the choice's name: a plain one_shot larger than a push round is pulled, in
    rounds of the engine's limit, and the stats name the mechanism (issue 12 item 2)."""
    eng = comm._backend
    eng.capacity = 4096                          # rounds of 1024 float32
    x = torch.ones(2500)
    comm.all_reduce(x, out=torch.empty(2500), algorithm="one_shot")
    assert [c[2] for c in eng.calls] == ["one_shot/pull"] * 3
    comm.all_reduce(torch.ones(1000), algorithm="one_shot")           # fits one push round
    comm.all_reduce(torch.ones(2500), algorithm="one_shot/push")      # forced: push rounds
    assert [c[2] for c in eng.calls[3:]] == ["one_shot/push"] * 4
    ops = comm.stats()["ops"]["all_reduce"]
    assert ops["one_shot/pull"]["calls"] == 1 and ops["one_shot/push"]["calls"] == 2
    assert "one_shot" not in ops


class HotEngine(Engine):
    """An engine with ``hot_all_reduce`` (as the GPU engine): one call per (algorithm, dtype,
    numel), cached by the Communicator's hot path."""

    def __init__(self):
        super().__init__()
        self.made = []

    def hot_all_reduce(self, algorithm, dtype, numel):
        self.made.append((algorithm, dtype, numel))
        tag = len(self.made)

        def go(x, out):
            self.calls.append((x.data_ptr(), out.data_ptr(), algorithm, "hot", tag))
        return go


def test_engine_call_cached_per_shape_and_never_reused_wrongly(comm, monkeypatch):
    """The hot path takes the engine's call for the shape (``hot_all_reduce``) once per (dtype,
    numel, requested algorithm, capture state where it decides) and the engine it was made for:
    a call of another dtype or size gets an entry of its own (made once), a swapped engine makes
    the entry again; per call only the tensors change."""
    eng = comm._backend = HotEngine()
    x, out = torch.ones(64), torch.empty(64)
    _decide(comm, x)
    assert comm._all_reduce_hot(x, out, "one_shot") is out
    assert comm._all_reduce_hot(x, x, "one_shot") is x
    assert eng.made == [("one_shot/push", torch.float32, 64)]
    assert eng.calls == [(x.data_ptr(), out.data_ptr(), "one_shot/push", "hot", 1),
                         (x.data_ptr(), x.data_ptr(), "one_shot/push", "hot", 1)]
    # another size, another dtype: entries of their own
    x2 = torch.ones(128)
    _decide(comm, x2)
    comm._all_reduce_hot(x2, x2, "one_shot")
    xh = torch.ones(64, dtype=torch.bfloat16)
    _decide(comm, xh)
    comm._all_reduce_hot(xh, xh, "one_shot")
    assert eng.made[1:] == [("one_shot/push", torch.float32, 128),
                            ("one_shot/push", torch.bfloat16, 64)]
    assert [c[4] for c in eng.calls[2:]] == [2, 3]
    # a forced algorithm decides the same captured or not: its entry serves both states and
    # its calls do not ask for the capture state
    monkeypatch.setattr(comm, "_capture", lambda: (_ for _ in ()).throw(AssertionError("asked")))
    assert comm._all_reduce_hot(x, x, "one_shot") is x
    assert len(eng.made) == 3 and eng.calls[-1][4] == 1
    monkeypatch.setattr(comm, "_capture", lambda: False)
    # a swapped engine: the entry is made again for it, the old engine is not called
    new = comm._backend = HotEngine()
    n_old = len(eng.calls)
    comm._all_reduce_hot(x, x, "one_shot")
    assert len(eng.calls) == n_old and new.made == [("one_shot/push", torch.float32, 64)]
    assert new.calls[-1][2:4] == ("one_shot/push", "hot")


def test_engine_without_hot_call_is_called_per_call(comm):
    """An engine without ``hot_all_reduce`` (the CPU engine, the stand-in) gets ``all_reduce``
    per call, as before."""
    x = torch.ones(64)
    _decide(comm, x)
    comm._all_reduce_hot(x, x, "one_shot")
    assert comm._backend.calls == [(x.data_ptr(), x.data_ptr(), "one_shot/push")]


def test_no_allocation_per_call_with_the_engines_call(comm):
    eng = comm._backend = HotEngine()
    eng.calls = _Last()
    x, out = torch.ones(64), torch.empty(64)
    _decide(comm, x)
    grown = _grown_over_calls(comm, x, out)
    assert len(eng.made) == 1 and eng.calls[-1][3] == "hot"
    assert grown < 16384, f"the GPU hot path kept {grown} bytes over 2000 calls"


class _Last(list):
    """Keeps only the last call."""
    def append(self, v):
        self[:] = [v]


def test_capture_state_asked_only_where_it_decides(comm, monkeypatch):
    """On "auto" the capture state picks the algorithm (eager: torch.distributed; captured:
    the kernels): such an entry is per capture state and every call asks for the state. A forced
    algorithm's entry serves both states (the other state's Choice is checked to be the same)."""
    import tpcomm.communicator as communicator
    comm.world_size = 2
    monkeypatch.setattr(communicator, "select_algorithm",
                        lambda op, nbytes, dtype, world, topo, graph: "one_shot" if graph
                        else "torch")
    x = torch.ones(64)
    state = {"capturing": True, "asked": 0}

    def capture():
        state["asked"] += 1
        return state["capturing"]
    monkeypatch.setattr(comm, "_capture", capture)
    comm._decisions[("all_reduce", 256, torch.float32, "auto", True)] = comm._decision(
        "all_reduce", 256, torch.float32, "auto", "all_reduce", True)
    try:
        assert comm._all_reduce_hot(x, x, "auto") is x             # captured: the kernels
        assert comm._all_reduce_hot(x, x, "auto") is x
        assert state["asked"] == 2 and not comm._fast_any
        state["capturing"] = False                                 # eager: not this entry
        assert comm._all_reduce_hot(x, x, "auto") is None and state["asked"] == 3
        # forced: one entry for both states, no query per call
        _decide(comm, x)
        asked = state["asked"]
        assert comm._all_reduce_hot(x, x, "one_shot") is x
        assert state["asked"] == asked + 1                         # the first call asks
        state["capturing"] = True
        for _ in range(3):
            assert comm._all_reduce_hot(x, x, "one_shot") is x
        assert state["asked"] == asked + 1
        assert list(comm._fast_any) == [(torch.float32, 64, "one_shot")]
    finally:
        comm.world_size = 1
