"""All-gather (push): out[p] = inp of rank p, ``out`` [R, c] with rows ``out_stride`` apart.

Rank r stores its input into slot r of every peer's receive region and into its own row of
``out``; then it polls slot q of its region for every other rank q, copies it into row q and
clears it (``_lamport.py``). Bits are copied exactly, except that an input element whose bits
are all ones (a NaN) arrives as the canonical NaN, on every rank alike.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._lamport import poll_one, prologue, push, sanitize, typed
from .barrier import ERR_ALL_GATHER, call_begin, call_check, call_post, record_error
from .launch import LeanKernel


@triton.jit(do_not_specialize=["rank", "call_hash"])
def _all_gather_push_kernel(
        inp_ptr, out_ptr, c, out_stride, recv_addrs, my_recv_addr, buf_stride, slot_stride,
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
        bits = sanitize(tl.load(inp_ptr + offs, mask=m), ITYPE, CANON)
        for q in tl.static_range(R):
            if q != rank:
                push(recv_addrs[q] + buf_off + rank * slot_stride * ITEM, offs, bits, m, ITYPE)
        # own row before the call check (a copy of the input): skipped only by a dead kernel
        tl.store(out_ptr + rank * out_stride + offs, bits.to(DTYPE, bitcast=True),
                 mask=m & (dead == 0))
    dead = call_check(my_recv_addr + 2 * buf_stride, cep, word, rank, -1, t0, timeout_ns, dead,
                      err_ptr, err_host, ERR_ALL_GATHER, epoch, R, WP)
    mine = my_recv_addr + buf_off
    for q in tl.static_range(R):
        if q != rank:
            src = mine + q * slot_stride * ITEM
            for start in range(pid * BLOCK, c, G * BLOCK):
                offs = start + tl.arange(0, BLOCK)
                m = offs < c
                bits, dead, late = poll_one(src, offs, m, t0, timeout_ns, dead, ITYPE)
                if late != 0:
                    record_error(err_ptr, err_host, ERR_ALL_GATHER, 0, rank, q, epoch)
                tl.store(out_ptr + q * out_stride + offs, bits.to(DTYPE, bitcast=True),
                         mask=m & (dead == 0))   # none after an error
                tl.store(typed(src, ITYPE) + offs, tl.full([BLOCK], -1, ITYPE), mask=m)
    tl.store(counter_ptr + pid, epoch)
    tl.store(counter_ptr + CALL_OFF + pid, cep)


def all_gather(inp, out, c, out_stride, recv_addrs, my_recv_addr, buf_stride, slot_stride,
               counters, err_dev, err_host, rank, timeout_ns, *, grid, num_warps, itype, canon,
               block, call_hash, call_off, wp, warmup=False):
    """out[p] = inp of rank p (``c`` elements; rows of ``out`` ``out_stride`` elements apart).
    ``warmup``: compile only."""
    fn = _all_gather_push_kernel.warmup if warmup else _all_gather_push_kernel[(grid,)]
    kw = dict(grid=(grid,)) if warmup else {}
    return fn(inp, out, c, out_stride, recv_addrs, my_recv_addr, buf_stride, slot_stride,
              counters, err_dev, err_host, rank, timeout_ns, call_hash, R=len(recv_addrs),
              BLOCK=block, ITYPE=itype, CANON=canon, ITEM=out.element_size(), CALL_OFF=call_off,
              WP=wp, num_warps=num_warps, **kw)


def bind_all_gather(common: dict, *, recv_addrs, my_recv_addr, buf_stride, slot_stride, grid,
                    num_warps, itype, canon, block, item, call_off, wp, device=None,
                    verify=False) -> LeanKernel:
    """The all-gather kernel with everything but ``(inp, out, c, out_stride, call_hash)``
    bound (``call_hash``: the call check's hash of this call, kernels/barrier.call_hash)."""
    return LeanKernel(
        _all_gather_push_kernel, grid,
        call=("inp_ptr", "out_ptr", "c", "out_stride", "call_hash"),
        fixed=dict(common, recv_addrs=recv_addrs, my_recv_addr=my_recv_addr,
                   buf_stride=buf_stride, slot_stride=slot_stride),
        constexprs=dict(R=len(recv_addrs), BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item,
                        CALL_OFF=call_off, WP=wp),
        num_warps=num_warps, device=device, verify=verify)
