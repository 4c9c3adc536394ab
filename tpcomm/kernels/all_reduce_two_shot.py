"""Two-shot all-reduce (push): reduce-scatter then all-gather in one kernel.

The input is cut into R slices of ``sl`` elements (``sl`` a multiple of 16; the last slices may
be short or empty). Receive region of op E (``recv + (E % 2) * buf_stride``, bytes)::

    [0, R * rs_slot_stride) elements   RS slots: slot s holds rank s's copy of my slice
    [ag_off, ag_off + n) bytes/elems   AG area: element i of the result (slices of the others)

Phases, per tile (``BLOCK`` elements; block b takes tiles b, b+G, ... of every slice, the same
tiles in every phase, so ``out`` may alias ``inp``):

    a. push slice q of my input into RS slot ``rank`` of rank q          (never waits)
    b. poll my RS slots, sum them in rank order 0..R-1 in float32, round once, write my slice
       of ``out``, push it into every peer's AG area, clear my RS slots
    c. for every other slice: poll my AG area, copy into ``out``, clear

Each rank sends 2 (R-1)/R of the bytes, the bandwidth optimum, and waits two one-way NVLink
latencies. Every block only waits for the same block index on the peers, and never before it
has pushed everything its peers need from it, so the fixed grid (at most one wave) cannot
deadlock.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._lamport import (begin, check_calls, clear_slots, end, push, receive_copy, receive_sum,
                       sanitize)
from .barrier import ERR_TWO_SHOT
from .launch import LeanKernel
from .sync import SyncArgs


@triton.jit(do_not_specialize=["rank", "call_hash"])
def _all_reduce_two_shot_push_kernel(
        inp_ptr, out_ptr, n, sl, rs_slot_stride, ag_off, sync, rank, call_hash,
        R: tl.constexpr, BLOCK: tl.constexpr, ITYPE: tl.constexpr, CANON: tl.constexpr,
        ITEM: tl.constexpr, CALL_OFF: tl.constexpr, WP: tl.constexpr):
    pid, G, epoch, buf_off, dead, t0, cep, word = begin(sync, rank, call_hash, R, CALL_OFF)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    ntiles = tl.cdiv(sl, BLOCK)
    # a. scatter my input: slice q goes to RS slot `rank` of rank q
    for q in tl.static_range(R):
        lo = q * sl
        size = tl.minimum(n - lo, sl)
        dst = sync.recv_addrs[q] + buf_off + rank * rs_slot_stride * ITEM
        for t in range(pid, ntiles, G):
            offs = t * BLOCK + tl.arange(0, BLOCK)
            m = offs < size
            bits = sanitize(tl.load(inp_ptr + lo + offs, mask=m), ITYPE, CANON)
            push(dst, offs, bits, m, ITYPE)
    # the peers' calls (barrier.py's call check), before anything of theirs is read
    dead = check_calls(sync, cep, word, rank, t0, dead, ERR_TWO_SHOT, epoch, R, WP)
    # b. reduce my slice, keep it, and send it to everyone
    lo = rank * sl
    size = tl.minimum(n - lo, sl)
    mine = sync.my_recv_addr + buf_off
    for t in range(pid, ntiles, G):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        m = offs < size
        acc, dead = receive_sum(sync, mine, rs_slot_stride, offs, m, t0, dead, rank, epoch, 1,
                                cep, word, ERR_TWO_SHOT, DTYPE, ITYPE, R, WP)
        res = acc.to(DTYPE)
        tl.store(out_ptr + lo + offs, res, mask=m & (dead == 0))   # none after an error
        bits = sanitize(res, ITYPE, CANON)
        for q in tl.static_range(R):
            if q != rank:
                push(sync.recv_addrs[q] + buf_off + ag_off + lo * ITEM, offs, bits, m, ITYPE)
        clear_slots(mine, rs_slot_stride, offs, m, ITYPE, R)
    # c. gather the other slices
    for q in tl.static_range(R):
        if q != rank:
            lo = q * sl
            size = tl.minimum(n - lo, sl)
            src = mine + ag_off + lo * ITEM
            for t in range(pid, ntiles, G):
                offs = t * BLOCK + tl.arange(0, BLOCK)
                dead = receive_copy(sync, src, out_ptr + lo, offs, offs < size, t0, dead, rank,
                                    q, epoch, ERR_TWO_SHOT, 1, 0, ITYPE, DTYPE, False)
    end(sync, pid, epoch, cep, CALL_OFF)


def bind_all_reduce_two_shot(*, sync: SyncArgs, rs_slot_stride: int, ag_off: int, grid: int,
                             num_warps: int, itype: tl.dtype, canon: int, block: int, item: int,
                             device: int | None = None, verify: bool = False) -> LeanKernel:
    """out [n] = sum over ranks of inp [n] in R slices of ``sl``:
    ``.launch(inp, out, n, sl, call_hash)``."""
    return LeanKernel(
        _all_reduce_two_shot_push_kernel, grid,
        call=("inp_ptr", "out_ptr", "n", "sl", "call_hash"),
        fixed=dict(rs_slot_stride=rs_slot_stride, ag_off=ag_off, sync=sync.device(),
                   rank=sync.rank),
        constexprs=dict(R=sync.world, BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item,
                        CALL_OFF=sync.call_off, WP=sync.wp),
        num_warps=num_warps, device=device, verify=verify)
