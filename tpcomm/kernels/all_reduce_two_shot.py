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

from ._lamport import clear_slots, poll_one, poll_sum, prologue, push, sanitize, typed
from .barrier import ERR_TWO_SHOT, call_begin, call_check, call_post, record_error
from .launch import LeanKernel


@triton.jit(do_not_specialize=["rank", "call_hash"])
def _all_reduce_two_shot_push_kernel(
        inp_ptr, out_ptr, n, sl, recv_addrs, my_recv_addr, buf_stride, rs_slot_stride, ag_off,
        counter_ptr, err_ptr, err_host, rank, timeout_ns, call_hash,
        R: tl.constexpr, BLOCK: tl.constexpr, ITYPE: tl.constexpr, CANON: tl.constexpr,
        ITEM: tl.constexpr, CALL_OFF: tl.constexpr, WP: tl.constexpr):
    pid, G, epoch, buf_off, dead, t0 = prologue(counter_ptr, err_ptr, buf_stride)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    cep, word = call_begin(counter_ptr + CALL_OFF, call_hash)
    call_post(recv_addrs, 2 * buf_stride, cep, word, rank, rank, R, R)
    ntiles = tl.cdiv(sl, BLOCK)
    # a. scatter my input: slice q goes to RS slot `rank` of rank q
    for q in tl.static_range(R):
        lo = q * sl
        size = tl.minimum(n - lo, sl)
        dst = recv_addrs[q] + buf_off + rank * rs_slot_stride * ITEM
        for t in range(pid, ntiles, G):
            offs = t * BLOCK + tl.arange(0, BLOCK)
            m = offs < size
            bits = sanitize(tl.load(inp_ptr + lo + offs, mask=m), ITYPE, CANON)
            push(dst, offs, bits, m, ITYPE)
    # the peers' calls (barrier.py's call check), before anything of theirs is read
    dead = call_check(my_recv_addr + 2 * buf_stride, cep, word, rank, -1, t0, timeout_ns, dead,
                      err_ptr, err_host, ERR_TWO_SHOT, epoch, R, WP)
    # b. reduce my slice, keep it, and send it to everyone
    lo = rank * sl
    size = tl.minimum(n - lo, sl)
    mine = my_recv_addr + buf_off
    for t in range(pid, ntiles, G):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        m = offs < size
        acc, dead, late = poll_sum(mine, rs_slot_stride, offs, m, t0, timeout_ns, dead, DTYPE,
                                   ITYPE, R)
        if late >= 0:
            record_error(err_ptr, err_host, ERR_TWO_SHOT, 0, rank, late, epoch)
        res = acc.to(DTYPE)
        tl.store(out_ptr + lo + offs, res, mask=m & (dead == 0))   # none after an error
        bits = sanitize(res, ITYPE, CANON)
        for q in tl.static_range(R):
            if q != rank:
                push(recv_addrs[q] + buf_off + ag_off + lo * ITEM, offs, bits, m, ITYPE)
        clear_slots(mine, rs_slot_stride, offs, m, ITYPE, R)
    # c. gather the other slices
    for q in tl.static_range(R):
        if q != rank:
            lo = q * sl
            size = tl.minimum(n - lo, sl)
            src = mine + ag_off + lo * ITEM
            for t in range(pid, ntiles, G):
                offs = t * BLOCK + tl.arange(0, BLOCK)
                m = offs < size
                bits, dead, late = poll_one(src, offs, m, t0, timeout_ns, dead, ITYPE)
                if late != 0:
                    record_error(err_ptr, err_host, ERR_TWO_SHOT, 1, rank, q, epoch)
                tl.store(out_ptr + lo + offs, bits.to(DTYPE, bitcast=True), mask=m & (dead == 0))
                tl.store(typed(src, ITYPE) + offs, tl.full([BLOCK], -1, ITYPE), mask=m)
    tl.store(counter_ptr + pid, epoch)
    tl.store(counter_ptr + CALL_OFF + pid, cep)


def all_reduce_two_shot(inp, out, n, sl, recv_addrs, my_recv_addr, buf_stride, rs_slot_stride,
                        ag_off, counters, err_dev, err_host, rank, timeout_ns, *, grid,
                        num_warps, itype, canon, block, call_hash, call_off, wp):
    _all_reduce_two_shot_push_kernel[(grid,)](
        inp, out, n, sl, recv_addrs, my_recv_addr, buf_stride, rs_slot_stride, ag_off, counters,
        err_dev, err_host, rank, timeout_ns, call_hash, R=len(recv_addrs), BLOCK=block,
        ITYPE=itype, CANON=canon, ITEM=inp.element_size(), CALL_OFF=call_off, WP=wp,
        num_warps=num_warps)


def bind_all_reduce_two_shot(common: dict, *, recv_addrs, my_recv_addr, buf_stride,
                             rs_slot_stride, ag_off, grid, num_warps, itype, canon, block, item,
                             call_off, wp, device=None, verify=False) -> LeanKernel:
    """The two-shot kernel with everything but ``(inp, out, n, sl, call_hash)`` bound."""
    return LeanKernel(
        _all_reduce_two_shot_push_kernel, grid,
        call=("inp_ptr", "out_ptr", "n", "sl", "call_hash"),
        fixed=dict(common, recv_addrs=recv_addrs, my_recv_addr=my_recv_addr,
                   buf_stride=buf_stride, rs_slot_stride=rs_slot_stride, ag_off=ag_off),
        constexprs=dict(R=len(recv_addrs), BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item,
                        CALL_OFF=call_off, WP=wp),
        num_warps=num_warps, device=device, verify=verify)
