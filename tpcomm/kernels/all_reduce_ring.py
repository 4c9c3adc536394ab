"""Ring all-reduce (push): pipelined reduce-scatter then all-gather around the ring r -> r+1.

The input is cut into R slices of ``sl`` elements. Slice k is reduced along the chain
k+1, k+2, ..., k (ranks mod R): rank k+1 sends its part, every next rank adds its own and sends
the float32 partial on, rank k adds the last part, rounds once and owns the result; the result
then travels the ring once more. So every slice is reduced in one fixed order, once, and every
rank gets the same bits (the order is rotated per slice, not 0..R-1; float32 throughout, so the
difference from rank order is only float32 rounding of the partials).

Rank r at reduce-scatter step s (0..R-2) works on slice (r-1-s) mod R and pushes the partial
into rank r+1's RS32 area; at the final step it finishes slice r; at all-gather step u
(0..R-2) it receives slice (r-1-u) mod R and forwards it unless u = R-2. Every slice reaches a
rank at most once per phase, so both areas are indexed by the element's global index::

    [0, 4 n) bytes            RS32 area: float32 partials
    [ag_off, ag_off + n)      AG area: finished elements (dtype)

Pipelining: each step walks all the block's tiles before the next step, so consecutive tiles of
one slice are in flight on the link at once ("several chunks in flight"); block b only waits for
block b of its predecessor.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._lamport import poll_one, prologue, push, sanitize, typed
from .barrier import ERR_RING, call_begin, call_check, call_post, record_error
from .launch import LeanKernel


@triton.jit(do_not_specialize=["rank", "call_hash"])
def _all_reduce_ring_push_kernel(
        inp_ptr, out_ptr, n, sl, next_addr, my_recv_addr, buf_stride, ag_off,
        counter_ptr, err_ptr, err_host, rank, timeout_ns, call_hash, recv_addrs,
        R: tl.constexpr, BLOCK: tl.constexpr, ITYPE: tl.constexpr, CANON: tl.constexpr,
        ITEM: tl.constexpr, CALL_OFF: tl.constexpr, WP: tl.constexpr):
    pid, G, epoch, buf_off, dead, t0 = prologue(counter_ptr, err_ptr, buf_stride)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    ntiles = tl.cdiv(sl, BLOCK)
    mine = my_recv_addr + buf_off
    nxt = next_addr + buf_off
    prev = (rank + R - 1) % R
    # the call check with every rank (``recv_addrs``: every rank's receive base), not only the
    # ring neighbours: a rank whose predecessor matched it would otherwise go on with the data
    # of a peer that stopped at a mismatch
    cep, word = call_begin(counter_ptr + CALL_OFF, call_hash)
    call_post(recv_addrs, 2 * buf_stride, cep, word, rank, rank, R, R)
    # reduce-scatter steps 0..R-2, then the final step (s = R-1) on my own slice
    for s in tl.static_range(R):
        if s == 1:   # after step 0's pushes, before the first poll
            dead = call_check(my_recv_addr + 2 * buf_stride, cep, word, rank, -1, t0,
                              timeout_ns, dead, err_ptr, err_host, ERR_RING, epoch, R, WP)
        k = (rank + 2 * R - 1 - s) % R
        lo = k * sl
        size = tl.minimum(n - lo, sl)
        for t in range(pid, ntiles, G):
            offs = t * BLOCK + tl.arange(0, BLOCK)
            m = offs < size
            x = tl.load(inp_ptr + lo + offs, mask=m).to(tl.float32)
            if s > 0:
                pbits, dead, late = poll_one(mine + lo * 4, offs, m, t0, timeout_ns, dead,
                                             tl.int32)
                if late != 0:
                    record_error(err_ptr, err_host, ERR_RING, 0, rank, prev, epoch)
                x = pbits.to(tl.float32, bitcast=True) + x
                tl.store(typed(mine + lo * 4, tl.int32) + offs, tl.full([BLOCK], -1, tl.int32),
                         mask=m)
            if s < R - 1:
                push(nxt + lo * 4, offs, sanitize(x, tl.int32, 0x7FC00000), m, tl.int32)
            else:
                res = x.to(DTYPE)
                tl.store(out_ptr + lo + offs, res, mask=m & (dead == 0))   # none after an error
                push(nxt + ag_off + lo * ITEM, offs, sanitize(res, ITYPE, CANON), m, ITYPE)
    # all-gather steps 0..R-2
    for u in tl.static_range(R - 1):
        k = (rank + 2 * R - 1 - u) % R
        lo = k * sl
        size = tl.minimum(n - lo, sl)
        src = mine + ag_off + lo * ITEM
        for t in range(pid, ntiles, G):
            offs = t * BLOCK + tl.arange(0, BLOCK)
            m = offs < size
            bits, dead, late = poll_one(src, offs, m, t0, timeout_ns, dead, ITYPE)
            if late != 0:
                record_error(err_ptr, err_host, ERR_RING, 1, rank, prev, epoch)
            tl.store(out_ptr + lo + offs, bits.to(DTYPE, bitcast=True), mask=m & (dead == 0))
            if u < R - 2:
                push(nxt + ag_off + lo * ITEM, offs, bits, m, ITYPE)
            tl.store(typed(src, ITYPE) + offs, tl.full([BLOCK], -1, ITYPE), mask=m)
    tl.store(counter_ptr + pid, epoch)
    tl.store(counter_ptr + CALL_OFF + pid, cep)


def all_reduce_ring(inp, out, n, sl, next_addr, my_recv_addr, buf_stride, ag_off, counters,
                    err_dev, err_host, rank, world, timeout_ns, *, grid, num_warps, itype, canon,
                    block, call_hash, call_off, wp, recv_addrs):
    """``recv_addrs``: every rank's receive base (the call check's headers only)."""
    _all_reduce_ring_push_kernel[(grid,)](
        inp, out, n, sl, next_addr, my_recv_addr, buf_stride, ag_off, counters, err_dev,
        err_host, rank, timeout_ns, call_hash, recv_addrs, R=world, BLOCK=block, ITYPE=itype,
        CANON=canon, ITEM=inp.element_size(), CALL_OFF=call_off, WP=wp, num_warps=num_warps)


def bind_all_reduce_ring(common: dict, *, next_addr, my_recv_addr, buf_stride, ag_off, world,
                         recv_addrs, grid, num_warps, itype, canon, block, item, call_off, wp,
                         device=None, verify=False) -> LeanKernel:
    """The ring kernel with everything but ``(inp, out, n, sl, call_hash)`` bound
    (``recv_addrs``: every rank's receive base, for the call check's headers only)."""
    return LeanKernel(
        _all_reduce_ring_push_kernel, grid, call=("inp_ptr", "out_ptr", "n", "sl", "call_hash"),
        fixed=dict(common, next_addr=next_addr, my_recv_addr=my_recv_addr,
                   buf_stride=buf_stride, ag_off=ag_off, recv_addrs=recv_addrs),
        constexprs=dict(R=world, BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item,
                        CALL_OFF=call_off, WP=wp),
        num_warps=num_warps, device=device, verify=verify)
