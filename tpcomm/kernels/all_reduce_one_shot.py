"""One-shot all-reduce: every rank ends up with every rank's data and reduces all of it.

Two mechanisms:

- ``_all_reduce_one_shot_push_kernel`` (small messages): each rank stores its input straight
  into slot ``rank`` of every rank's receive region (itself included) and polls its own region
  until all R slots hold data (``_lamport.py``): one NVLink one-way latency, no barrier round
  trip, no copy-in. Region of op E: ``recv + (E % 2) * buf_stride``, slots ``slot_stride``
  elements apart.
- ``_all_reduce_one_shot_pull_kernel`` (inputs in symmetric memory, zero-copy): the input is in
  this rank's symmetric buffer (copied into a staging slot, MODE 0, or already there because it
  came from ``Communicator.empty``, MODES 1-2); a signal-pad barrier; every rank reads every
  peer's input; a second barrier when the input is the user's tensor (it may be overwritten as
  soon as the kernel ends). Staging slots alternate by epoch: op E writes slot E % 2, whose last
  readers (op E-2) finished before the peers signalled op E-1.

Both sum in rank order 0..R-1 in float32 and round once, so every rank gets the same bits.
Grid: a fixed number of blocks G per mechanism (the per-block epoch counters must advance
together); block b handles tiles b, b+G, b+2G, ...
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._lamport import clear_slots, poll_sum, poll_sum_call, prologue, push, sanitize, typed
from .barrier import (ERR_ONE_SHOT_PULL, ERR_ONE_SHOT_PUSH, NPHASE, blockwise_barrier, call_begin,
                      call_check, call_post, pick, record_error, record_mismatch)
from .launch import LeanKernel


@triton.jit(do_not_specialize=["rank", "call_hash"])
def _all_reduce_one_shot_push_kernel(
        inp_ptr, out_ptr, n, recv_addrs, my_recv_addr, buf_stride, slot_stride,
        counter_ptr, err_ptr, err_host, rank, timeout_ns, call_hash,
        R: tl.constexpr, BLOCK: tl.constexpr, ITYPE: tl.constexpr, CANON: tl.constexpr,
        ITEM: tl.constexpr, CALL_OFF: tl.constexpr, WP: tl.constexpr):
    pid, G, epoch, buf_off, dead, t0 = prologue(counter_ptr, err_ptr, buf_stride)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    cep, word = call_begin(counter_ptr + CALL_OFF, call_hash)
    call_post(recv_addrs, 2 * buf_stride, cep, word, rank, rank, R, R)
    checked = 0
    for start in range(pid * BLOCK, n, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        bits = sanitize(tl.load(inp_ptr + offs, mask=m), ITYPE, CANON)
        for q in tl.static_range(R):
            push(recv_addrs[q] + buf_off + rank * slot_stride * ITEM, offs, bits, m, ITYPE)
        mine = my_recv_addr + buf_off
        if checked == 0:   # the first poll also checks the peers' calls (one round trip)
            acc, dead, late, bad, theirs = poll_sum_call(
                mine, slot_stride, offs, m, t0, timeout_ns, dead, my_recv_addr + 2 * buf_stride,
                cep, word, rank, DTYPE, ITYPE, R, WP)
            if bad >= 0:
                record_mismatch(err_ptr, err_host, ERR_ONE_SHOT_PUSH, rank, bad, epoch, word >> 16,
                                theirs >> 16)
            checked = 1
        else:
            acc, dead, late = poll_sum(mine, slot_stride, offs, m, t0, timeout_ns, dead, DTYPE,
                                       ITYPE, R)
        if late >= 0:
            record_error(err_ptr, err_host, ERR_ONE_SHOT_PUSH, 0, rank, late, epoch)
        # no output after an error (a mismatch, a timeout): an in-place input keeps its values
        tl.store(out_ptr + offs, acc.to(DTYPE), mask=m & (dead == 0))
        clear_slots(mine, slot_stride, offs, m, ITYPE, R)
    if checked == 0:
        dead = call_check(my_recv_addr + 2 * buf_stride, cep, word, rank, -1, t0, timeout_ns,
                          dead, err_ptr, err_host, ERR_ONE_SHOT_PUSH, epoch, R, WP)
    tl.store(counter_ptr + pid, epoch)
    tl.store(counter_ptr + CALL_OFF + pid, cep)


@triton.jit(do_not_specialize=["rank", "call_hash"])
def _all_reduce_one_shot_pull_kernel(
        inp_ptr, out_ptr, n, src_addrs, my_src_addr, slot_bytes, pad_addrs, my_pad_addr,
        counter_ptr, err_ptr, err_host, rank, timeout_ns, call_hash, hdr_addrs,
        MODE: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr,
        CALL_OFF: tl.constexpr):
    """MODE 0: copy inp into this rank's staging slot first; src_addrs are the staging bases.
    MODE 1: zero-copy, inp is at the same offset of every rank's buffer (src_addrs), out apart.
    MODE 2: zero-copy in place: results go to the staging slot (my_src_addr), then to out
    after the closing barrier."""
    pid, G, epoch, slot_off, dead, t0 = prologue(counter_ptr, err_ptr, slot_bytes)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    # the call check before the barrier: a peer that runs a push kernel for its call (another
    # size) never raises this kernel's barrier flags, but its header comes
    cep, word = call_begin(counter_ptr + CALL_OFF, call_hash)
    call_post(hdr_addrs, 0, cep, word, rank, rank, R, R)
    dead = call_check(pick(hdr_addrs, rank, R), cep, word, rank, -1, t0, timeout_ns, dead, err_ptr,
                      err_host, ERR_ONE_SHOT_PULL, epoch, R, RP)
    if MODE == 0:
        stage = typed(my_src_addr + slot_off, DTYPE)
        for start in range(pid * BLOCK, n, G * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n
            tl.store(stage + offs, tl.load(inp_ptr + offs, mask=m), mask=m)
    dead = blockwise_barrier(pad_addrs, my_pad_addr, pid * NPHASE, epoch, rank, err_ptr,
                             err_host, t0, timeout_ns, dead, ERR_ONE_SHOT_PULL, 0, R, RP)
    if MODE == 0:
        src_off = slot_off
    else:
        src_off = slot_off * 0
    for start in range(pid * BLOCK, n, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        acc = tl.zeros([BLOCK], tl.float32)
        for q in tl.static_range(R):
            src = typed(src_addrs[q] + src_off, DTYPE)
            acc += tl.load(src + offs, mask=m).to(tl.float32)
        if MODE == 2:
            tl.store(typed(my_src_addr + slot_off, DTYPE) + offs, acc.to(DTYPE), mask=m)
        else:   # no output after an error
            tl.store(out_ptr + offs, acc.to(DTYPE), mask=m & (dead == 0))
    if MODE != 0:
        dead = blockwise_barrier(pad_addrs, my_pad_addr, pid * NPHASE + 1, epoch, rank, err_ptr,
                                 err_host, t0, timeout_ns, dead, ERR_ONE_SHOT_PULL, 1, R,
                                 RP)
    if MODE == 2:
        res = typed(my_src_addr + slot_off, DTYPE)
        for start in range(pid * BLOCK, n, G * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n
            tl.store(out_ptr + offs, tl.load(res + offs, mask=m), mask=m & (dead == 0))
    tl.store(counter_ptr + pid, epoch)
    tl.store(counter_ptr + CALL_OFF + pid, cep)


def all_reduce_one_shot_push(inp, out, n, recv_addrs, my_recv_addr, buf_stride, slot_stride,
                             counters, err_dev, err_host, rank, timeout_ns, *, grid, num_warps,
                             itype, canon, block, call_hash, call_off, wp):
    """``call_hash``: ``barrier.call_hash`` of the call; ``call_off``: the call counters' word
    offset from ``counters``; ``wp``: the world rounded up to a power of two (>= 2)."""
    _all_reduce_one_shot_push_kernel[(grid,)](
        inp, out, n, recv_addrs, my_recv_addr, buf_stride, slot_stride, counters, err_dev,
        err_host, rank, timeout_ns, call_hash, R=len(recv_addrs), BLOCK=block, ITYPE=itype,
        CANON=canon, ITEM=inp.element_size(), CALL_OFF=call_off, WP=wp, num_warps=num_warps)


def all_reduce_one_shot_pull(inp, out, n, src_addrs, my_src_addr, slot_bytes, pad_addrs,
                             my_pad_addr, counters, err_dev, err_host, rank, timeout_ns, *, mode,
                             grid, num_warps, rp, block, call_hash, hdr_addrs, call_off):
    """``hdr_addrs``: every rank's call-header area; the rest as the push launcher."""
    _all_reduce_one_shot_pull_kernel[(grid,)](
        inp, out, n, src_addrs, my_src_addr, slot_bytes, pad_addrs, my_pad_addr, counters,
        err_dev, err_host, rank, timeout_ns, call_hash, hdr_addrs, MODE=mode, R=len(src_addrs),
        RP=rp, BLOCK=block, CALL_OFF=call_off, num_warps=num_warps)


def bind_all_reduce_one_shot_push(common: dict, *, recv_addrs, my_recv_addr, buf_stride,
                                  slot_stride, grid, num_warps, itype, canon, block, item,
                                  call_off, wp, device=None, verify=False) -> LeanKernel:
    """The push kernel with everything but ``(inp, out, n, call_hash)`` bound:
    ``.launch(inp, out, n, call_hash)``. ``common``: counter_ptr, err_ptr, err_host, rank,
    timeout_ns (``launch.py``); ``call_hash`` varies per call (kernels/barrier.call_hash)."""
    return LeanKernel(
        _all_reduce_one_shot_push_kernel, grid, call=("inp_ptr", "out_ptr", "n", "call_hash"),
        fixed=dict(common, recv_addrs=recv_addrs, my_recv_addr=my_recv_addr,
                   buf_stride=buf_stride, slot_stride=slot_stride),
        constexprs=dict(R=len(recv_addrs), BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item,
                        CALL_OFF=call_off, WP=wp),
        num_warps=num_warps, device=device, verify=verify)


def bind_all_reduce_one_shot_pull(common: dict, *, src_addrs, my_src_addr, slot_bytes,
                                  pad_addrs, my_pad_addr, hdr_addrs, mode, grid, num_warps, rp,
                                  block, call_off, device=None, verify=False) -> LeanKernel:
    """The pull kernel of ``mode`` with everything but ``(inp, out, n, call_hash)`` bound, and
    with ``src_addrs=None`` also ``src_addrs`` per call:
    ``.launch(inp, out, n, call_hash[, src_addrs])``."""
    call = ("inp_ptr", "out_ptr", "n", "call_hash") + (("src_addrs",) if src_addrs is None else ())
    fixed = dict(common, my_src_addr=my_src_addr, slot_bytes=slot_bytes, pad_addrs=pad_addrs,
                 my_pad_addr=my_pad_addr, hdr_addrs=hdr_addrs)
    if src_addrs is not None:
        fixed["src_addrs"] = src_addrs
    return LeanKernel(
        _all_reduce_one_shot_pull_kernel, grid, call=call, fixed=fixed,
        constexprs=dict(MODE=mode, R=len(pad_addrs), RP=rp, BLOCK=block, CALL_OFF=call_off),
        num_warps=num_warps, device=device, verify=verify)
