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

from ._lamport import clear_slots, poll_sum, prologue, push, sanitize
from .barrier import ERR_REDUCE_SCATTER, call_begin, call_check, call_post, record_error
from .launch import LeanKernel


@triton.jit(do_not_specialize=["rank", "call_hash"])
def _reduce_scatter_push_kernel(
        inp_ptr, out_ptr, c, in_stride, recv_addrs, my_recv_addr, buf_stride, slot_stride,
        counter_ptr, err_ptr, err_host, rank, timeout_ns, call_hash,
        R: tl.constexpr, BLOCK: tl.constexpr, ITYPE: tl.constexpr, CANON: tl.constexpr,
        ITEM: tl.constexpr, CALL_OFF: tl.constexpr, WP: tl.constexpr):
    pid, G, epoch, buf_off, dead, t0 = prologue(counter_ptr, err_ptr, buf_stride)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    cep, word = call_begin(counter_ptr + CALL_OFF, call_hash)
    call_post(recv_addrs, 2 * buf_stride, cep, word, rank, rank, R, R)
    for start in range(pid * BLOCK, c, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < c
        for q in tl.static_range(R):
            bits = sanitize(tl.load(inp_ptr + q * in_stride + offs, mask=m), ITYPE, CANON)
            push(recv_addrs[q] + buf_off + rank * slot_stride * ITEM, offs, bits, m, ITYPE)
    dead = call_check(my_recv_addr + 2 * buf_stride, cep, word, rank, -1, t0, timeout_ns, dead,
                      err_ptr, err_host, ERR_REDUCE_SCATTER, epoch, R, WP)
    mine = my_recv_addr + buf_off
    for start in range(pid * BLOCK, c, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < c
        acc, dead, late = poll_sum(mine, slot_stride, offs, m, t0, timeout_ns, dead, DTYPE,
                                   ITYPE, R)
        if late >= 0:
            record_error(err_ptr, err_host, ERR_REDUCE_SCATTER, 0, rank, late, epoch)
        tl.store(out_ptr + offs, acc.to(DTYPE), mask=m & (dead == 0))   # none after an error
        clear_slots(mine, slot_stride, offs, m, ITYPE, R)
    tl.store(counter_ptr + pid, epoch)
    tl.store(counter_ptr + CALL_OFF + pid, cep)


def reduce_scatter(inp, out, c, in_stride, recv_addrs, my_recv_addr, buf_stride, slot_stride,
                   counters, err_dev, err_host, rank, timeout_ns, *, grid, num_warps, itype,
                   canon, block, call_hash, call_off, wp):
    _reduce_scatter_push_kernel[(grid,)](
        inp, out, c, in_stride, recv_addrs, my_recv_addr, buf_stride, slot_stride, counters,
        err_dev, err_host, rank, timeout_ns, call_hash, R=len(recv_addrs), BLOCK=block,
        ITYPE=itype, CANON=canon, ITEM=out.element_size(), CALL_OFF=call_off, WP=wp,
        num_warps=num_warps)


def bind_reduce_scatter(common: dict, *, recv_addrs, my_recv_addr, buf_stride, slot_stride, grid,
                        num_warps, itype, canon, block, item, call_off, wp, device=None,
                        verify=False) -> LeanKernel:
    """The reduce-scatter kernel with everything but ``(inp, out, c, in_stride, call_hash)``
    bound."""
    return LeanKernel(
        _reduce_scatter_push_kernel, grid,
        call=("inp_ptr", "out_ptr", "c", "in_stride", "call_hash"),
        fixed=dict(common, recv_addrs=recv_addrs, my_recv_addr=my_recv_addr,
                   buf_stride=buf_stride, slot_stride=slot_stride),
        constexprs=dict(R=len(recv_addrs), BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item,
                        CALL_OFF=call_off, WP=wp),
        num_warps=num_warps, device=device, verify=verify)
