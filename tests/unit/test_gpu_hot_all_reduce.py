"""The GPU engine's per-shape call (``P2PCollectives.hot_all_reduce``, issue 16) on the CPU:
an engine over emulated buffers (no kernel runs: the plan's launch is replaced by a recorder).
It must launch exactly what ``all_reduce`` launches for that shape (same numel, same call
hash), keep reading the error word / broken state per call, and follow a dropped plan."""
import pytest
import torch

from tpcomm.cuda.emulated import make_emulated_group
from tpcomm.errors import CommunicatorBrokenError, TpcommError
from tpcomm.kernels import barrier as k_barrier


@pytest.fixture()
def eng():
    (e,), _ = make_emulated_group(1, 64 << 10, 4, device="cpu", timeout_s=1.0)
    yield e
    e.close()


def _record(e, algorithm, dtype):
    """Replace the plan's launch of (algorithm, dtype) by a recorder of (inp, out, n, h)."""
    e._plans.pop((algorithm, dtype), None)
    limit, _, hbase, _, split = e._plan_all_reduce(algorithm, dtype)
    seen = []
    e._plans[(algorithm, dtype)] = (limit, lambda i, o, n, h: seen.append((i, o, n, h)), hbase,
                                    None, split)
    return seen


@pytest.mark.parametrize("algorithm", ["one_shot/push", "two_shot", "ring", "one_shot/pull"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_launch_as_all_reduce(eng, algorithm, dtype):
    seen = _record(eng, algorithm, dtype)
    x, out = torch.ones(2, 50, dtype=dtype), torch.empty(2, 50, dtype=dtype)
    go = eng.hot_all_reduce(algorithm, dtype, 100)
    go(x, out)
    eng.all_reduce(x, out, algorithm)
    want = k_barrier.call_hash("all_reduce", str(dtype)[6:], 100)
    assert [(i is x, o is out, n, h) for i, o, n, h in seen] == [(True, True, 100, want)] * 2


def test_not_one_round_or_empty_is_none(eng):
    limit = eng.round_limit("all_reduce", "one_shot/push", torch.float32)
    assert eng.hot_all_reduce("one_shot/push", torch.float32, limit) is not None
    assert eng.hot_all_reduce("one_shot/push", torch.float32, limit + 1) is None
    assert eng.hot_all_reduce("one_shot/push", torch.float32, 0) is None
    assert eng.hot_all_reduce("one_shot", torch.float32, 16) is None   # the caller picks


def test_a_dropped_plan_is_made_again(eng):
    go = eng.hot_all_reduce("two_shot", torch.float32, 64)
    eng.vecs["two_shot"] = 2          # a tuning change drops every plan
    assert eng._plans == {}
    seen = []
    real = eng._plan_all_reduce

    def plan(algorithm, dtype):
        limit, _, hbase, _, split = real(algorithm, dtype)
        p = (limit, lambda i, o, n, h: seen.append((n, h)), hbase, None, split)
        eng._plans[(algorithm, dtype)] = p
        return p
    eng._plan_all_reduce = plan
    x = torch.ones(64)
    go(x, x)         # through all_reduce: the new plan (vecs 2)
    go(x, x)         # the new plan, found by the cached call
    h = k_barrier.call_hash("all_reduce", "float32", 64)
    assert seen == [(64, h), (64, h)]


def test_errors_still_checked_per_call(eng):
    _record(eng, "one_shot/push", torch.float32)
    go = eng.hot_all_reduce("one_shot/push", torch.float32, 64)
    x = torch.ones(64)
    eng.broken = "a peer timed out"
    with pytest.raises(CommunicatorBrokenError, match="a peer timed out"):
        go(x, x)
    eng.broken = None
    eng._closed = True
    with pytest.raises(TpcommError, match="closed"):
        go(x, x)
    eng._closed = False


def test_error_word_read_per_call(eng):
    """A peer timeout the kernels wrote after the call was cached raises on the next call (the
    error word is read by every call, as ``all_reduce``'s ``_begin`` does)."""
    import ctypes

    from tpcomm.errors import PeerTimeoutError
    seen = _record(eng, "one_shot/push", torch.float32)
    go = eng.hot_all_reduce("one_shot/push", torch.float32, 64)
    x = torch.ones(64)
    eng._err_word = ctypes.c_int64(0)
    go(x, x)
    eng._err_word.value = (7 << 24) | (k_barrier.OP_ONE_SHOT_PUSH << 16) | (1 << 20) | (1 << 8)
    with pytest.raises(PeerTimeoutError):
        go(x, x)
    assert len(seen) == 1 and eng.broken


class _Site:
    """A bound kernel's surface for ``hot_all_reduce``: ``pinned`` records its spec and returns
    a launch that records (stream, inp, out)."""

    def __init__(self, calls, refuse=False):
        self.calls, self.refuse, self.spec = calls, refuse, None

    def pinned(self, *spec):
        self.spec = spec
        if self.refuse:
            return None
        return lambda stream, i, o: self.calls.append((stream, i, o))


def _as_cuda(eng, monkeypatch, state):
    """The engine's CUDA-only reads faked: the current stream and device come from ``state``;
    ``_order_streams`` records its calls."""
    monkeypatch.setattr(eng, "_is_cuda", True)
    monkeypatch.setattr(eng, "_dev_index", 0)
    monkeypatch.setattr(eng, "_raw_stream", lambda idx: state["stream"])
    monkeypatch.setattr(eng, "_get_device", lambda: 0)
    orders = []

    def order():
        orders.append(state["stream"])
        eng._last_raw = state["stream"]
    monkeypatch.setattr(eng, "_order_streams", order)
    return orders


@pytest.mark.parametrize("algorithm, split", [("one_shot/push", False), ("two_shot", True),
                                              ("ring", True)])
def test_cuda_call_launches_pinned_on_the_stream_it_read(eng, monkeypatch, algorithm, split):
    """On a GPU the per-shape call pins the kernel's call arguments once (dtypes, numel, the
    split of two_shot / ring, the call hash: what all_reduce passes) and per call reads the
    current stream once: ordering after another stream when it changed, the launch on it."""
    state = {"stream": 11}
    orders = _as_cuda(eng, monkeypatch, state)
    calls = []
    limit, run, hbase, _, sp = eng._plan_all_reduce(algorithm, torch.bfloat16)
    site = _Site(calls)
    eng._plans[(algorithm, torch.bfloat16)] = (limit, run, hbase, site, sp)
    go = eng.hot_all_reduce(algorithm, torch.bfloat16, 100)
    h = k_barrier.call_hash("all_reduce", "bfloat16", 100)
    from tpcomm.cuda.p2p_collectives import _split
    assert site.spec == ((torch.bfloat16, torch.bfloat16, 100, _split(100, 1), h) if split
                         else (torch.bfloat16, torch.bfloat16, 100, h))
    x, y = torch.ones(100, dtype=torch.bfloat16), torch.empty(100, dtype=torch.bfloat16)
    go(x, y)
    go(x, x)
    state["stream"] = 12
    go(x, y)
    assert orders == [11, 12]
    assert [(s, i is x, o is y) for s, i, o in calls] == [(11, True, True), (11, True, False),
                                                          (12, True, True)]


def test_cuda_call_without_a_pinned_launch_uses_the_plan(eng, monkeypatch):
    state = {"stream": 3}
    _as_cuda(eng, monkeypatch, state)
    seen = []
    limit, _, hbase, _, sp = eng._plan_all_reduce("one_shot/push", torch.float32)
    eng._plans[("one_shot/push", torch.float32)] = (
        limit, lambda i, o, n, h: seen.append((n, h)), hbase, _Site([], refuse=True), sp)
    go = eng.hot_all_reduce("one_shot/push", torch.float32, 64)
    go(torch.ones(64), torch.ones(64))
    assert seen == [(64, k_barrier.call_hash("all_reduce", "float32", 64))]
    # a dropped plan: the call goes through all_reduce (which makes the plan again)
    eng.vecs["one_shot/push"] = 1
    called = []
    monkeypatch.setattr(eng, "all_reduce", lambda *a: called.append(a))
    go = eng.hot_all_reduce("one_shot/push", torch.float32, 64)   # a plan made again
    eng.vecs["one_shot/push"] = 1
    x = torch.ones(64)
    go(x, x)
    assert len(called) == 1 and called[0][2] == "one_shot/push"


def test_cuda_call_raises_on_the_error_word(eng, monkeypatch):
    import ctypes

    from tpcomm.errors import PeerTimeoutError
    _as_cuda(eng, monkeypatch, {"stream": 1})
    calls = []
    limit, run, hbase, _, sp = eng._plan_all_reduce("one_shot/push", torch.float32)
    eng._plans[("one_shot/push", torch.float32)] = (limit, run, hbase, _Site(calls), sp)
    go = eng.hot_all_reduce("one_shot/push", torch.float32, 64)
    x = torch.ones(64)
    eng._err_word = ctypes.c_int64(0)
    go(x, x)
    eng._err_word.value = (3 << 24) | (k_barrier.OP_ONE_SHOT_PUSH << 16) | (1 << 20) | (1 << 8)
    with pytest.raises(PeerTimeoutError):
        go(x, x)
    with pytest.raises(CommunicatorBrokenError):   # broken by it: every later call raises
        go(x, x)
    assert len(calls) == 1
