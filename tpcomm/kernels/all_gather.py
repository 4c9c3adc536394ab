"""All-gather (push): out[p] = inp of rank p, ``out`` [R, c] with rows ``out_stride`` apart.

Rank r stores its input into slot r of every peer's receive region and into its own row of
``out``; then it polls slot q of its region for every other rank q, copies it into row q and
clears it (``_lamport.py``). Bits are copied exactly, except that an input element whose bits
are all ones (a NaN) arrives as the canonical NaN, on every rank alike.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._lamport import begin, check_calls, end, push, receive_copy, sanitize
from .barrier import ERR_ALL_GATHER
from .launch import LeanKernel
from .sync import SyncArgs


@triton.jit(do_not_specialize=["rank", "call_hash"])
def _all_gather_push_kernel(
        inp_ptr, out_ptr, c, out_stride, slot_stride, sync, rank, call_hash,
        R: tl.constexpr, BLOCK: tl.constexpr, ITYPE: tl.constexpr, CANON: tl.constexpr,
        ITEM: tl.constexpr, CALL_OFF: tl.constexpr, WP: tl.constexpr):
    pid, G, epoch, buf_off, dead, t0, cep, word = begin(sync, rank, call_hash, R, CALL_OFF)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    for start in range(pid * BLOCK, c, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < c
        bits = sanitize(tl.load(inp_ptr + offs, mask=m), ITYPE, CANON)
        for q in tl.static_range(R):
            if q != rank:
                push(sync.recv_addrs[q] + buf_off + rank * slot_stride * ITEM, offs, bits, m,
                     ITYPE)
        # own row before the call check (a copy of the input): skipped only by a dead kernel
        tl.store(out_ptr + rank * out_stride + offs, bits.to(DTYPE, bitcast=True),
                 mask=m & (dead == 0))
    dead = check_calls(sync, cep, word, rank, t0, dead, ERR_ALL_GATHER, epoch, R, WP)
    mine = sync.my_recv_addr + buf_off
    for q in tl.static_range(R):
        if q != rank:
            src = mine + q * slot_stride * ITEM
            for start in range(pid * BLOCK, c, G * BLOCK):
                offs = start + tl.arange(0, BLOCK)
                dead = receive_copy(sync, src, out_ptr + q * out_stride, offs, offs < c, t0, dead,
                                    rank, q, epoch, ERR_ALL_GATHER, 0, 0, ITYPE, DTYPE, False)
    end(sync, pid, epoch, cep, CALL_OFF)


def bind_all_gather(*, sync: SyncArgs, slot_stride: int, grid: int, num_warps: int,
                    itype: tl.dtype, canon: int, block: int, item: int,
                    device: int | None = None, verify: bool = False) -> LeanKernel:
    """out [R, c] (rows ``out_stride`` apart) = inp [c] of every rank:
    ``.launch(inp, out, c, out_stride, call_hash)``; ``.warmup(...)`` compiles only."""
    return LeanKernel(
        _all_gather_push_kernel, grid,
        call=("inp_ptr", "out_ptr", "c", "out_stride", "call_hash"),
        fixed=dict(slot_stride=slot_stride, sync=sync.device(), rank=sync.rank),
        constexprs=dict(R=sync.world, BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item,
                        CALL_OFF=sync.call_off, WP=sync.wp),
        num_warps=num_warps, device=device, verify=verify)
