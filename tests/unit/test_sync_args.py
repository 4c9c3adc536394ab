"""The launchers' sync bundle (tpcomm/kernels/sync.py): every bind_* launcher binds every
parameter of its kernel from one SyncArgs plus its own keywords, the push kernels get the
bundle as one tuple parameter with the rank apart (never specialized), and the launchers are
keyword-only. No GPU: LeanKernel binds without launching."""
from __future__ import annotations

import inspect

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from tpcomm.kernels import (all_gather, all_gather_matmul_fused, all_reduce_add_rms_norm,  # noqa: E402
                            all_reduce_one_shot, all_reduce_ring, all_reduce_two_shot, barrier,
                            matmul_reduce_scatter_fused, reduce_scatter)
from tpcomm.kernels.sync import DeviceSync, SyncArgs  # noqa: E402

R, RANK = 4, 2
ADDRS = tuple((1 << 40) + i * (1 << 30) for i in range(R))


def _sync() -> SyncArgs:
    return SyncArgs(recv_addrs=ADDRS, my_recv_addr=ADDRS[RANK], buf_stride=1 << 24,
                    counters=torch.zeros(256, dtype=torch.int64), call_off=700,
                    err_dev=torch.zeros(3, dtype=torch.int64), err_host=1 << 41, rank=RANK,
                    timeout_ns=10**9, wp=4, hdr_addrs=tuple(a + 7 for a in ADDRS),
                    pad_addrs=tuple(a + 9 for a in ADDRS), my_pad_addr=ADDRS[RANK] + 9)


KW = dict(grid=8, num_warps=8, itype=tl.int16, canon=0x7FC0, item=2)


def _bound(s: SyncArgs):
    return {
        "one_shot_push": all_reduce_one_shot.bind_all_reduce_one_shot_push(
            sync=s, slot_stride=64, block=2048, **KW),
        "one_shot_pull": all_reduce_one_shot.bind_all_reduce_one_shot_pull(
            sync=s, src_addrs=None, my_src_addr=5, slot_bytes=64, mode=1, grid=8, num_warps=8,
            block=2048),
        "two_shot": all_reduce_two_shot.bind_all_reduce_two_shot(
            sync=s, rs_slot_stride=64, ag_off=512, block=2048, **KW),
        "ring": all_reduce_ring.bind_all_reduce_ring(sync=s, ag_off=512, block=2048, **KW),
        "reduce_scatter": reduce_scatter.bind_reduce_scatter(sync=s, slot_stride=64,
                                                             block=2048, **KW),
        "all_gather": all_gather.bind_all_gather(sync=s, slot_stride=64, block=2048, **KW),
        "add_rms_norm": all_reduce_add_rms_norm.bind_all_reduce_add_rms_norm_one_shot_push(
            sync=s, hidden=4096, slot_stride=64, **KW),
        "barrier": barrier.bind_barrier(sync=s, slot=512),
    }


def test_every_kernel_parameter_is_bound_from_the_bundle():
    s = _sync()
    for name, lk in _bound(s).items():   # LeanKernel refuses unbound or unknown parameters
        vals = dict(lk.fixed, **lk.constexprs)
        assert vals.get("rank") == RANK, name
        if "sync" in vals:                # the push kernels
            assert isinstance(vals["sync"], DeviceSync), name
            d = vals["sync"]
            assert d.counter_ptr is s.counters and d.err_ptr is s.err_dev, name
            assert (d.recv_addrs, d.my_recv_addr, d.buf_stride, d.err_host, d.timeout_ns) == \
                (ADDRS, ADDRS[RANK], 1 << 24, 1 << 41, 10**9), name
            assert "rank" not in DeviceSync._fields
            assert "rank" in [p.name for p in lk.kernel.params if p.do_not_specialize], name
            assert vals["CALL_OFF"] == 700 and vals["WP"] == 4 and vals["R"] == R, name
        else:                             # pull and barrier: flat parameters
            assert vals["counter_ptr"] is s.counters and vals["err_ptr"] is s.err_dev, name
            assert vals["pad_addrs"] == s.pad_addrs and vals["my_pad_addr"] == s.my_pad_addr
    b = _bound(s)
    assert b["ring"].fixed["next_addr"] == ADDRS[(RANK + 1) % R]
    assert b["one_shot_pull"].fixed["hdr_addrs"] == s.hdr_addrs
    assert b["one_shot_pull"].call[-1] == "src_addrs"


def test_launchers_are_keyword_only_typed_and_documented():
    fns = [all_reduce_one_shot.bind_all_reduce_one_shot_push,
           all_reduce_one_shot.bind_all_reduce_one_shot_pull,
           all_reduce_two_shot.bind_all_reduce_two_shot, all_reduce_ring.bind_all_reduce_ring,
           reduce_scatter.bind_reduce_scatter, all_gather.bind_all_gather,
           all_reduce_add_rms_norm.bind_all_reduce_add_rms_norm_one_shot_push,
           barrier.bind_barrier, barrier.write_word,
           matmul_reduce_scatter_fused.matmul_reduce_scatter,
           all_gather_matmul_fused.all_gather_matmul, all_gather_matmul_fused.all_gather_push,
           all_gather_matmul_fused.clear_received]
    for fn in fns:
        params = inspect.signature(fn).parameters.values()
        assert all(p.kind is p.KEYWORD_ONLY for p in params), fn.__name__
        assert all(p.annotation is not p.empty for p in params), fn.__name__
        assert fn.__doc__ and "[" in fn.__doc__ or fn is barrier.bind_barrier \
            or fn is barrier.write_word, f"{fn.__name__}: no shapes in the docstring"


def test_the_bundle_is_built_once_per_family():
    """The engine's bundles are made at set-up; binding reads them, a call never builds one."""
    src = inspect.getsource(__import__("tpcomm.cuda.p2p_collectives",
                                       fromlist=["x"]).P2PCollectives)
    assert src.count("SyncArgs(") == 1
    assert "for f in range(3)" in src
