"""Reduce-scatter (push): out = sum over ranks of their row ``rank`` of ``inp`` [R, c].

Rank r stores row q of its input into slot r of rank q's receive region (one one-way NVLink
latency, no barrier), then polls its own R slots, sums them in rank order 0..R-1 in float32,
rounds once and clears them (``_lamport.py``). Rows of ``inp`` may be strided (``in_stride``
elements apart). Region of op E: ``recv + (E % 2) * buf_stride``; slots ``slot_stride``
elements apart.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._lamport import begin, check_calls, clear_slots, end, push, receive_sum, sanitize
from .barrier import ERR_REDUCE_SCATTER
from .launch import LeanKernel
from .sync import SyncArgs


@triton.jit(do_not_specialize=["rank", "call_hash"])
def _reduce_scatter_push_kernel(
        inp_ptr, out_ptr, c, in_stride, slot_stride, sync, rank, call_hash,
        R: tl.constexpr, BLOCK: tl.constexpr, ITYPE: tl.constexpr, CANON: tl.constexpr,
        ITEM: tl.constexpr, CALL_OFF: tl.constexpr, WP: tl.constexpr):
    pid, G, epoch, buf_off, dead, t0, cep, word = begin(sync, rank, call_hash, R, CALL_OFF)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    for start in range(pid * BLOCK, c, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < c
        for q in tl.static_range(R):
            bits = sanitize(tl.load(inp_ptr + q * in_stride + offs, mask=m), ITYPE, CANON)
            push(sync.recv_addrs[q] + buf_off + rank * slot_stride * ITEM, offs, bits, m, ITYPE)
    dead = check_calls(sync, cep, word, rank, t0, dead, ERR_REDUCE_SCATTER, epoch, R, WP)
    mine = sync.my_recv_addr + buf_off
    for start in range(pid * BLOCK, c, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < c
        acc, dead = receive_sum(sync, mine, slot_stride, offs, m, t0, dead, rank, epoch, 1, cep,
                                word, ERR_REDUCE_SCATTER, DTYPE, ITYPE, R, WP)
        tl.store(out_ptr + offs, acc.to(DTYPE), mask=m & (dead == 0))   # none after an error
        clear_slots(mine, slot_stride, offs, m, ITYPE, R)
    end(sync, pid, epoch, cep, CALL_OFF)


def bind_reduce_scatter(*, sync: SyncArgs, slot_stride: int, grid: int, num_warps: int,
                        itype: tl.dtype, canon: int, block: int, item: int,
                        device: int | None = None, verify: bool = False) -> LeanKernel:
    """out [c] = sum over ranks of their row ``rank`` of inp [R, c] (rows ``in_stride`` apart):
    ``.launch(inp, out, c, in_stride, call_hash)``."""
    return LeanKernel(
        _reduce_scatter_push_kernel, grid,
        call=("inp_ptr", "out_ptr", "c", "in_stride", "call_hash"),
        fixed=dict(slot_stride=slot_stride, sync=sync.device(), rank=sync.rank),
        constexprs=dict(R=sync.world, BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item,
                        CALL_OFF=sync.call_off, WP=sync.wp),
        num_warps=num_warps, device=device, verify=verify)
