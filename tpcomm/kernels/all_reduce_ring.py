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

from ._lamport import begin, check_calls, clear, end, push, receive_copy, receive_one, sanitize
from .barrier import ERR_RING
from .launch import LeanKernel
from .sync import SyncArgs


@triton.jit(do_not_specialize=["rank", "call_hash"])
def _all_reduce_ring_push_kernel(
        inp_ptr, out_ptr, n, sl, next_addr, ag_off, sync, rank, call_hash,
        R: tl.constexpr, BLOCK: tl.constexpr, ITYPE: tl.constexpr, CANON: tl.constexpr,
        ITEM: tl.constexpr, CALL_OFF: tl.constexpr, WP: tl.constexpr):
    # the call check with every rank (``sync.recv_addrs``: every rank's receive base), not only
    # the ring neighbours: a rank whose predecessor matched it would otherwise go on with the
    # data of a peer that stopped at a mismatch
    pid, G, epoch, buf_off, dead, t0, cep, word = begin(sync, rank, call_hash, R, CALL_OFF)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    ntiles = tl.cdiv(sl, BLOCK)
    mine = sync.my_recv_addr + buf_off
    nxt = next_addr + buf_off
    prev = (rank + R - 1) % R
    # reduce-scatter steps 0..R-2, then the final step (s = R-1) on my own slice
    for s in tl.static_range(R):
        if s == 1:   # after step 0's pushes, before the first poll
            dead = check_calls(sync, cep, word, rank, t0, dead, ERR_RING, epoch, R, WP)
        k = (rank + 2 * R - 1 - s) % R
        lo = k * sl
        size = tl.minimum(n - lo, sl)
        for t in range(pid, ntiles, G):
            offs = t * BLOCK + tl.arange(0, BLOCK)
            m = offs < size
            x = tl.load(inp_ptr + lo + offs, mask=m).to(tl.float32)
            if s > 0:
                pbits, dead = receive_one(sync, mine + lo * 4, offs, m, t0, dead, rank, prev,
                                          epoch, ERR_RING, 0, tl.int32)
                x = pbits.to(tl.float32, bitcast=True) + x
                clear(mine + lo * 4, offs, m, tl.int32)
            if s < R - 1:
                push(nxt + lo * 4, offs, sanitize(x, tl.int32, 0x7FC00000), m, tl.int32)
            else:
                res = x.to(DTYPE)
                tl.store(out_ptr + lo + offs, res, mask=m & (dead == 0))   # none after an error
                push(nxt + ag_off + lo * ITEM, offs, sanitize(res, ITYPE, CANON), m, ITYPE)
    # all-gather steps 0..R-2: receive, keep, forward unless last
    for u in tl.static_range(R - 1):
        k = (rank + 2 * R - 1 - u) % R
        lo = k * sl
        size = tl.minimum(n - lo, sl)
        src = mine + ag_off + lo * ITEM
        for t in range(pid, ntiles, G):
            offs = t * BLOCK + tl.arange(0, BLOCK)
            dead = receive_copy(sync, src, out_ptr + lo, offs, offs < size, t0, dead, rank, prev,
                                epoch, ERR_RING, 1, nxt + ag_off + lo * ITEM, ITYPE, DTYPE,
                                u < R - 2)
    end(sync, pid, epoch, cep, CALL_OFF)


def bind_all_reduce_ring(*, sync: SyncArgs, ag_off: int, grid: int, num_warps: int,
                         itype: tl.dtype, canon: int, block: int, item: int,
                         device: int | None = None, verify: bool = False) -> LeanKernel:
    """out [n] = sum over ranks of inp [n] around the ring, R slices of ``sl``:
    ``.launch(inp, out, n, sl, call_hash)``."""
    return LeanKernel(
        _all_reduce_ring_push_kernel, grid, call=("inp_ptr", "out_ptr", "n", "sl", "call_hash"),
        fixed=dict(next_addr=sync.recv_addrs[(sync.rank + 1) % sync.world], ag_off=ag_off,
                   sync=sync.device(), rank=sync.rank),
        constexprs=dict(R=sync.world, BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item,
                        CALL_OFF=sync.call_off, WP=sync.wp),
        num_warps=num_warps, device=device, verify=verify)
