"""Compile every GPU kernel for sm_90 on a machine without a GPU (development aid).

    python scripts/compile_check.py [-v]

Installs a stand-in Triton driver that reports an sm_90 target, "warms up" (compiles without
launching) each kernel for each dtype and for aligned and unaligned sizes, and prints per kernel:
16-byte global accesses in the PTX, registers and spills from the cubin. For the GEMM core of
the fused kernels (``kernels/_gemm.py``): per tile config, whether the loop got warp-group MMA
(wgmma), TMA loads (cp.async.bulk.tensor) or cp.async, warps,
registers, spills and shared memory (Hopper allows 227 KiB a block). Needs only `triton`
(pip install --no-deps triton==3.6.0) and a CPU torch.

    python scripts/compile_check.py [-v] [--gemm-only] [--quick]
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


class _Sm90Driver:
    def __init__(self):
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _cubin_usage(k):
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return regs.group(1) if regs else "?", stack.group(1) if stack else "?"


def _report(name, k, verbose):
    ptx = k.asm["ptx"]
    v4 = len(re.findall(r"(ld|st)\.[a-z.]*v4", ptx))
    scalar16 = len(re.findall(r"(ld|st)\.global[a-z.]*\.b16", ptx))
    regs, spill = _cubin_usage(k)
    print(f"  {name:58s} v4 accesses {v4:4d}  b16 accesses {scalar16:4d}  regs {regs:>4}  "
          f"stack {spill}")
    if verbose:
        for line in ptx.splitlines():
            if any(s in line for s in ("atom", "globaltimer", "ld.volatile", "st.global.v4")):
                print("     ", line.strip())


def _gemm_report(name, k):
    ptx = k.asm["ptx"]
    regs, stack = _cubin_usage(k)
    print(f"  {name:50s} wgmma {len(re.findall('wgmma.mma_async', ptx)):3d}  "
          f"tma {len(re.findall('cp.async.bulk.tensor', ptx)):3d}  "
          f"cp.async {len(re.findall(r'cp.async.c[ag]', ptx)):3d}  "
          f"warps {k.metadata.num_warps:2d}  "
          f"regs {regs:>4}  stack {stack:>4}  smem {k.metadata.shared // 1024:3d} KiB")


def _sync(addrs: tuple, rank: int, buf_stride: int):
    """A stand-in sync bundle (kernels/sync.py): addresses only compiled against, never used."""
    from tpcomm.kernels.sync import SyncArgs
    return SyncArgs(recv_addrs=addrs, my_recv_addr=addrs[rank], buf_stride=buf_stride,
                    counters=torch.zeros(256, dtype=torch.int64), call_off=700,
                    err_dev=torch.zeros(3, dtype=torch.int64), err_host=0x7E0000000000,
                    rank=rank, timeout_ns=10**9, wp=max(2, 1 << (len(addrs) - 1).bit_length()),
                    hdr_addrs=addrs, pad_addrs=tuple(a + 8 for a in addrs),
                    my_pad_addr=addrs[rank] + 8)


def gemm_section(quick=False):
    """The GEMM core (plain, fused reduce-scatter, fused all-gather + GEMM) for a few configs,
    bf16 / fp16 / fp32 (ieee and tf32), aligned and not (N odd, K odd: pointer loads for that
    operand); the fused kernels at world 4 (R unrolled loops)."""
    from tpcomm.kernels import _gemm
    from tpcomm.kernels import all_gather_matmul_fused as ag, matmul_reduce_scatter_fused as rs
    G = _gemm.GemmConfig
    configs = (G(), G(num_stages=4), G(block_m=256, block_n=128), G(block_n=128, num_stages=4),
               G(flatten=False), G(flatten=False, num_stages=4), G(tma="device"), G(tma="off"))
    if quick:
        configs = configs[:1] + configs[4:5]
    R, addrs = 4, tuple((1 << 40) + i * (1 << 30) for i in range(4))
    s4, s1 = _sync(addrs, 1, 1 << 24), _sync(addrs[:1], 0, 1 << 24)
    for dtype, itype, canon in ((torch.bfloat16, tl.int16, 0x7FC0),
                                (torch.float16, tl.int16, 0x7E00),
                                (torch.float32, tl.int32, 0x7FC00000)):
        if quick and dtype != torch.bfloat16:
            continue
        for n, k, bt in ((8192, 7168, False), (8192, 7168, True), (8191, 7000, False),
                         (8192, 7001, True)):
            a = torch.empty(1024, k, dtype=dtype)
            b = torch.empty(n, k, dtype=dtype).t() if bt else torch.empty(k, n, dtype=dtype)
            c = torch.empty(1024, n, dtype=dtype)
            cg = torch.empty(R * 1024, n, dtype=dtype)
            print(f"GEMM core {dtype} [1024, {k}] x [{k}, {n}]{' (b = w.t())' if bt else ''}:")
            aligned = n == 8192 and k == 7168
            precisions = ("ieee", "tf32") if dtype == torch.float32 else (None,)
            for cfg in (configs if aligned and dtype == torch.bfloat16 else (None,)):
                for prec in precisions:
                    p = _gemm.plan(a, b, cfg, num_sms=132, input_precision=prec)
                    label = f"{p.config.name()} {p.modes}" + (f" {prec}" if prec else "")
                    try:
                        _gemm_report("plain " + label, _gemm.matmul(p, c, warmup=True))
                        _gemm_report("rs w4 " + label, rs.matmul_reduce_scatter(
                            p=p, out=c, out_row=0, lo=0, rows=256, m=256, slot_stride=1 << 22,
                            sync=s4, itype=itype, canon=canon, warmup=True))
                        _gemm_report("rs w1 " + label, rs.matmul_reduce_scatter(
                            p=p, out=c, out_row=0, lo=0, rows=1024, m=1024, slot_stride=1 << 23,
                            sync=s1, itype=itype, canon=canon, warmup=True))
                        _gemm_report("ag w4 " + label, ag.all_gather_matmul(
                            p=p, out=cg, lo=0, rows=256, m=1024, srows=256, my_flags=1 << 42,
                            sync=s4, warmup=True))
                        _gemm_report("ag w1 " + label, ag.all_gather_matmul(
                            p=p, out=c, lo=0, rows=1024, m=1024, srows=0, my_flags=1 << 42,
                            sync=s1, warmup=True))
                    except Exception as e:  # noqa: BLE001 - report and go on
                        print(f"  {label}: FAILED {type(e).__name__}: {str(e)[-300:]}")
            try:
                _report("ag push w4", ag.all_gather_push(
                    a_shard=a, lo=0, rows=256, flag_addrs=tuple(x + 8 for x in addrs),
                    srows=256, sync=s4, block_m=128, warmup=True), False)
                _report("ag clear w4", ag.clear_received(
                    rows=256, k=k, srows=256, sync=s4, grid=132, num_warps=8, itype=itype,
                    block=8 * 32 * (16 // a.element_size()), warmup=True), False)
            except Exception as e:  # noqa: BLE001
                print(f"  ag push / clear: FAILED {type(e).__name__}: {str(e)[-300:]}")


def main():
    verbose = "-v" in sys.argv
    driver.set_active(_Sm90Driver())
    gemm_section(quick="--quick" in sys.argv)
    if "--gemm-only" in sys.argv:
        return
    from tpcomm.kernels import (all_gather, all_reduce_one_shot, all_reduce_ring,
                                all_reduce_two_shot, barrier, reduce_scatter)
    R = 4
    addrs = tuple(0x7F0000000000 + i * (1 << 30) for i in range(R))
    sync = _sync(addrs, 1, 1 << 24)
    h = barrier.call_hash("all_reduce", "float32", 4096)
    itypes = {torch.bfloat16: (tl.int16, 0x7FC0), torch.float16: (tl.int16, 0x7E00),
              torch.float32: (tl.int32, 0x7FC00000)}
    for dtype, (itype, canon) in itypes.items():
        item = torch.tensor([], dtype=dtype).element_size()
        block = 8 * 32 * (16 // item)
        kw = dict(sync=sync, grid=132, num_warps=8, itype=itype, canon=canon, block=block,
                  item=item)
        for n in (4096, 4097):
            inp = torch.empty(n + 8, dtype=dtype)
            out = torch.empty(n + 8, dtype=dtype)
            print(f"{dtype} n={n}:")
            sl = -(-(-(-n // R)) // 16) * 16
            k = all_reduce_one_shot.bind_all_reduce_one_shot_push(slot_stride=1 << 20, **kw)
            _report("all_reduce_one_shot_push", k.warmup(inp, out, n, h), verbose)
            for mode in (0, 1, 2):
                k = all_reduce_one_shot.bind_all_reduce_one_shot_pull(
                    sync=sync, src_addrs=addrs, my_src_addr=addrs[1], slot_bytes=1 << 22,
                    mode=mode, grid=132, num_warps=8, block=block)
                _report(f"all_reduce_one_shot_pull MODE={mode}", k.warmup(inp, out, n, h),
                        verbose)
            k = all_reduce_two_shot.bind_all_reduce_two_shot(rs_slot_stride=1 << 20,
                                                             ag_off=1 << 23, **kw)
            _report("all_reduce_two_shot_push", k.warmup(inp, out, n, sl, h), verbose)
            k = all_reduce_ring.bind_all_reduce_ring(ag_off=1 << 23, **kw)
            _report("all_reduce_ring_push", k.warmup(inp, out, n, sl, h), verbose)
            c = n // R
            k = reduce_scatter.bind_reduce_scatter(slot_stride=1 << 20, **kw)
            _report("reduce_scatter_push", k.warmup(inp[:R * c].view(R, c), out, c, c, h),
                    verbose)
            k = all_gather.bind_all_gather(slot_stride=1 << 20, **kw)
            _report("all_gather_push", k.warmup(inp, out[:R * c].view(R, c), c, c, h), verbose)
    k = barrier.bind_barrier(sync=sync, slot=512)
    _report("barrier", k.warmup(), verbose)
    k = barrier._write_word_kernel.warmup(0x7E0000000000, 5, grid=(1,), num_warps=1)
    _report("write_word", k, verbose)


if __name__ == "__main__":
    main()
