"""The lean launch path (tpcomm/kernels/launch.py) on the CPU.

The real launch needs a GPU (scripts/gpu_host_path.py checks it bitwise against the
dispatcher); here a stand-in for a JITFunction records what each path is asked to do:
the key covers Triton's own specialization (native_specialize_impl, the function its binder
calls), the first call of a key goes through the dispatcher and later ones straight to the
compiled kernel's launcher with raw pointers and the constexprs in place, nothing is allocated
per call after warm-up, and the interpreter falls back to the dispatcher.
"""
from __future__ import annotations

import itertools
import os
import tracemalloc

import pytest
import torch

triton = pytest.importorskip("triton")
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402

from tpcomm.kernels import launch as lean  # noqa: E402


class _Param:
    def __init__(self, name, constexpr=False, dns=False):
        self.name, self.is_constexpr, self.do_not_specialize = name, constexpr, dns


class _Launcher:
    """Stands for the driver's CudaLauncher: ``launch`` is the C entry point."""
    def __init__(self, calls):
        self.calls = calls
        self.global_scratch_size = self.profile_scratch_size = 0
        self.launch_cooperative_grid, self.launch_pdl = False, False

    def launch(self, *args):
        self.calls.append(args)


class _Compiled:
    def __init__(self, spec, calls):
        self.spec, self.run = spec, _Launcher(calls)
        self.function, self.packed_metadata = 0xF00, (8, 1, 0)


class FakeKernel:
    """A JITFunction's surface: arg_names, params, device_caches, kernel[grid](...)."""
    __name__ = "_fake_kernel"

    def __init__(self, names, constexprs=(), dns=()):
        self.arg_names = list(names)
        self.params = [_Param(n, n in constexprs, n in dns) for n in names]
        self.device_caches = {0: (None, None, None, None, self._binder)}
        self.dispatched, self.launched, self.compiled = [], [], {}

    def _binder(self, *args, **kw):
        spec = [("constexpr", a) if p.is_constexpr else
                native_specialize_impl(BaseBackend, a, False, not p.do_not_specialize, True)
                for a, p in zip(args, self.params)]
        return dict(zip(self.arg_names, args)), spec, kw

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.dispatched.append((grid, args, kw))
            _, spec, _ = self._binder(*args, **kw)
            key = repr(spec)
            if key not in self.compiled:
                self.compiled[key] = _Compiled(spec, self.launched)
            return self.compiled[key]
        return run


@pytest.fixture
def no_cuda_stream(monkeypatch):
    monkeypatch.setattr(lean, "_raw_stream_fn", lambda: (lambda dev: 0x5))
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)


def _kernel():
    return FakeKernel(["inp_ptr", "out_ptr", "n", "addrs", "counter_ptr", "rank", "BLOCK", "R"],
                      constexprs=("BLOCK", "R"), dns=("rank",))


def _lean(k, verify=False):
    counters = torch.zeros(4, dtype=torch.int64)
    return lean.LeanKernel(k, 16, call=("inp_ptr", "out_ptr", "n"),
                           fixed=dict(addrs=(4096, 8192), counter_ptr=counters, rank=3),
                           constexprs=dict(BLOCK=1024, R=2), num_warps=8, device=0,
                           verify=verify), counters


def test_first_call_dispatches_then_launches_directly(no_cuda_stream):
    k = _kernel()
    lk, counters = _lean(k)
    x, y = torch.ones(64), torch.zeros(64)
    lk.launch(x, y, 64)
    assert len(k.dispatched) == 1 and not k.launched
    grid, args, kw = k.dispatched[0]
    assert grid == (16,) and args[0] is x and args[1] is y and args[2] == 64
    assert args[3:] == ((4096, 8192), counters, 3, 1024, 2) and kw == dict(num_warps=8)
    lk.launch(x, y, 64)
    lk.launch(x, y, 64)
    assert len(k.dispatched) == 1 and len(k.launched) == 2
    got = k.launched[-1]
    # grid, stream, function, coop, pdl, scratch x2, metadata, launch metadata, hooks x2
    assert got[:13] == (16, 1, 1, 0x5, 0xF00, False, False, None, None, (8, 1, 0), None,
                        None, None)
    # every parameter in order: raw pointers, the fixed values, the constexprs last
    assert got[13:] == (x.data_ptr(), y.data_ptr(), 64, (4096, 8192), counters.data_ptr(), 3,
                        1024, 2)


def test_a_new_specialization_goes_to_the_dispatcher_again(no_cuda_stream):
    k = _kernel()
    lk, _ = _lean(k)
    x, y = torch.ones(64), torch.zeros(64)
    lk.launch(x, y, 64)
    lk.launch(x, y, 48)            # 48 % 16 == 0 too: same kernel
    assert len(k.dispatched) == 1
    lk.launch(x, y, 50)            # not a multiple of 16: another specialization
    lk.launch(x[1:], y[1:], 48)    # unaligned pointers
    lk.launch(x.half(), y.half(), 48)
    lk.launch(x, y, 1)             # 1 is a constexpr in Triton
    assert len(k.dispatched) == 5
    lk.launch(x, y, 66)
    assert len(k.dispatched) == 5 and len(k.launched) == 2


def test_key_covers_tritons_specialization(no_cuda_stream):
    """Two calls with the same key must get the same specialization from Triton's binder."""
    k = _kernel()
    lk, _ = _lean(k, verify=True)
    base = torch.zeros(64, dtype=torch.float32)
    tensors = [base, base[1:], base[4:], base.half(), base.bfloat16()[2:], base.double()]
    ints = [0, 1, 2, 15, 16, 17, 32, -16, -1, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16,
            2**32, 2**63 - 16, 2**63, 2**64 - 16]
    lk.launch(base, base, 16)
    seen: dict = {}
    for a, b, n in itertools.product(tensors, tensors[:3], ints):
        key = lk.key_of(a, b, n)
        spec = repr([native_specialize_impl(BaseBackend, v, False, True, True)
                     for v in (a, b, n)])
        assert seen.setdefault(key, spec) == spec, (key, spec, seen[key])
    assert len(seen) > 20


def test_verify_raises_on_a_key_that_lies(no_cuda_stream):
    k = _kernel()
    lk, _ = _lean(k, verify=True)
    x, y = torch.ones(64), torch.zeros(64)
    lk.launch(x, y, 64)
    lk.launch(x, y, 64)
    assert lk.lean_calls == 1
    key = lk.key_of(x, y, 64)
    lk._spec[key] = ["something else"]
    with pytest.raises(RuntimeError, match="specializes"):
        lk.launch(x, y, 64)


def test_no_allocation_per_call_after_warm_up(no_cuda_stream):
    k = _kernel()
    k.launched = _Ring()
    lk, _ = _lean(k)
    x, y = torch.ones(64), torch.zeros(64)
    for _ in range(3):
        lk.launch(x, y, 64)
    tracemalloc.start()
    try:
        lk.launch(x, y, 64)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            lk.launch(x, y, 64)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(k.dispatched) == 1
    # a per-call leak would keep at least 32 B x 2000 = 64 KB; allocator noise stays below
    assert grown < 16384, f"the lean call path kept {grown} bytes over 2000 calls"


class _Ring(list):
    """Keeps only the last launch (the stand-in launcher must not grow memory itself)."""
    def append(self, v):
        if self:
            self[0] = v
        else:
            super().append(v)


def test_interpreter_uses_the_dispatcher(monkeypatch):
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    k = _kernel()
    lk, _ = _lean(k)
    assert lk.reason and "TRITON_INTERPRET" in lk.reason
    x, y = torch.ones(64), torch.zeros(64)
    for _ in range(3):
        lk.launch(x, y, 64)
    assert len(k.dispatched) == 3 and not k.launched


def test_constexprs_before_runtime_arguments_fall_back(no_cuda_stream):
    k = FakeKernel(["BLOCK", "inp_ptr"], constexprs=("BLOCK",))
    lk = lean.LeanKernel(k, 1, call=("inp_ptr",), fixed={}, constexprs=dict(BLOCK=4),
                         num_warps=4, device=0)
    assert "not all last" in lk.reason
    lk.launch(torch.ones(4))
    lk.launch(torch.ones(4))
    assert len(k.dispatched) == 2


def test_unbound_parameters_are_refused():
    k = _kernel()
    with pytest.raises(ValueError, match=r"\['rank'\] are not bound"):
        lean.LeanKernel(k, 1, call=("inp_ptr", "out_ptr", "n"),
                        fixed=dict(addrs=(), counter_ptr=0), constexprs=dict(BLOCK=1, R=1),
                        num_warps=4)


def test_int_key_matches_triton():
    for v in [0, 1, 2, 16, -16, 2**31 - 1, 2**31, 2**63, -2**31, -2**31 - 1]:
        t = native_specialize_impl(BaseBackend, v, False, True, True)
        ty = "constexpr" if v == 1 else {0: "i32", 1: "i64", 2: "u64"}[lean.int_key(v)[2]]
        assert t[0] == ty, (v, t)
        if v != 1:
            assert (t[1] == "D") == lean.int_key(v)[1]
        assert native_specialize_impl(BaseBackend, v, False, False, True)[0] == \
            {0: "i32", 1: "i64", 2: "u64"}[lean.int_key(v, False)[0]]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks a real kernel")
def test_real_kernels_are_bindable():
    """Every kernel the GPU engine binds has its constexprs last (else it would fall back)."""
    from tpcomm.kernels import (all_gather, all_reduce_add_rms_norm, all_reduce_one_shot,
                                all_reduce_ring, all_reduce_two_shot, barrier, reduce_scatter)
    kernels = [all_reduce_one_shot._all_reduce_one_shot_push_kernel,
               all_reduce_one_shot._all_reduce_one_shot_pull_kernel,
               all_reduce_two_shot._all_reduce_two_shot_push_kernel,
               all_reduce_ring._all_reduce_ring_push_kernel,
               all_gather._all_gather_push_kernel, reduce_scatter._reduce_scatter_push_kernel,
               all_reduce_add_rms_norm._all_reduce_add_rms_norm_one_shot_push_kernel,
               barrier._barrier_kernel]
    for kern in kernels:
        flags = [p.is_constexpr for p in kern.params]
        assert flags == sorted(flags), kern.__name__


def test_a_bound_bundle_is_passed_raw(no_cuda_stream):
    """A tuple parameter (the push kernels' ``sync`` bundle, kernels/sync.py) is bound once:
    the dispatcher gets it as given (tensors inside), the direct launch as one plain tuple of
    raw values (tensors as their addresses), and a call does nothing more than before."""
    from tpcomm.kernels.sync import DeviceSync
    counters, err = torch.zeros(4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    sync = DeviceSync((4096, 8192), 8192, 1 << 20, counters, err, 0, 10**9)
    k = FakeKernel(["inp_ptr", "out_ptr", "n", "sync", "rank", "BLOCK"], constexprs=("BLOCK",),
                   dns=("rank",))
    lk = lean.LeanKernel(k, 16, call=("inp_ptr", "out_ptr", "n"),
                         fixed=dict(sync=sync, rank=1), constexprs=dict(BLOCK=1024),
                         num_warps=8, device=0)
    x, y = torch.ones(64), torch.zeros(64)
    lk.launch(x, y, 64)
    assert k.dispatched[0][1][3] is sync
    lk.launch(x, y, 64)
    raw = ((4096, 8192), 8192, 1 << 20, counters.data_ptr(), err.data_ptr(), 0, 10**9)
    assert k.launched[-1][13:] == (x.data_ptr(), y.data_ptr(), 64, raw, 1, 1024)
    assert type(k.launched[-1][16]) is tuple
    # the per-call code binds the same things as for flat parameters: the bundle is one name
    flat = FakeKernel(["inp_ptr", "out_ptr", "n", "a", "rank", "BLOCK"], constexprs=("BLOCK",),
                      dns=("rank",))
    lf = lean.LeanKernel(flat, 16, call=("inp_ptr", "out_ptr", "n"), fixed=dict(a=5, rank=1),
                         constexprs=dict(BLOCK=1024), num_warps=8, device=0)
    lf.launch(x, y, 64)
    assert lk.source.replace("f_sync", "f_a").replace("_fake_kernel", "") == \
        lf.source.replace("_fake_kernel", "")


def test_pinned_launch_is_the_launch_with_its_stream(no_cuda_stream):
    """``pinned(dtype, dtype, n)``: the same launcher call as ``launch(x, y, n)`` but on the
    stream it is given; the key is the launch's, so a pointer of another alignment, which the
    launch would compile for, goes through the dispatcher; nothing allocated per call."""
    k = _kernel()
    k.launched = _Ring()        # the last launch only
    lk, counters = _lean(k)
    x, y = torch.ones(64), torch.zeros(64)
    assert lk.pinned(torch.float32, torch.float32, 64) is None     # kinds not learnt yet
    lk.launch(x, y, 64)
    lk.launch(x, y, 64)
    want = k.launched[-1]
    go = lk.pinned(torch.float32, torch.float32, 64)
    go(0x7, x, y)
    assert len(k.dispatched) == 1
    assert k.launched[-1] == want[:3] + (0x7,) + want[4:]
    go(0x5, x[1:], y[1:])                  # unaligned: a new key, through the dispatcher
    a = k.dispatched[-1][1]
    assert len(k.dispatched) == 2 and (a[0].data_ptr(), a[1].data_ptr(), a[2]) == (
        x[1:].data_ptr(), y[1:].data_ptr(), 64)
    go(0x5, x[1:], y[1:])                  # now cached for the pinned call too
    assert len(k.dispatched) == 2 and k.launched[-1][13] == x[1:].data_ptr()
    go(0x7, x, x)                          # in place: the one tensor's pointer twice
    assert k.launched[-1][13:15] == (x.data_ptr(), x.data_ptr())
    # a pinned call of another size or dtype is keyed as the launch of that call
    lk.launch(x, y, 50)
    go50 = lk.pinned(torch.float32, torch.float32, 50)
    go50(0x5, x, y)
    assert len(k.dispatched) == 3 and k.launched[-1][15] == 50
    gh = lk.pinned(torch.float16, torch.float16, 64)
    gh(0x5, x.half(), y.half())
    assert len(k.dispatched) == 4
    tracemalloc.start()
    try:
        go(0x7, x, y)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            go(0x7, x, y)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16384, f"the pinned call path kept {grown} bytes over 2000 calls"


def test_pinned_refused_where_the_lean_path_is_not_in_use(no_cuda_stream, monkeypatch):
    x, y = torch.ones(64), torch.zeros(64)
    k = _kernel()
    lk, _ = _lean(k, verify=True)              # TPCOMM_DEBUG's check runs on every launch
    lk.launch(x, y, 64)
    assert lk.pinned(torch.float32, torch.float32, 64) is None
    lk, _ = _lean(_kernel())
    lk.launch(x, y, 64)
    assert lk.pinned(torch.float32, 64, 64) is None           # a tensor given as an int
    assert lk.pinned(torch.float32, torch.float32, 6.5) is None   # a float for an int
    assert lk.pinned(torch.float32, torch.float32) is None        # too few
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    lk, _ = _lean(_kernel())
    lk.launch(x, y, 64)
    assert lk.pinned(torch.float32, torch.float32, 64) is None
