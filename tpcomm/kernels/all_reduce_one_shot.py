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

from ._lamport import (begin, check_calls, clear_slots, end, prologue, push, receive_sum,
                       sanitize, typed)
from .barrier import (ERR_ONE_SHOT_PULL, ERR_ONE_SHOT_PUSH, NPHASE, blockwise_barrier, call_begin,
                      call_check, call_post, pick)
from .launch import LeanKernel
from .sync import SyncArgs


@triton.jit(do_not_specialize=["rank", "call_hash"])
def _all_reduce_one_shot_push_kernel(
        inp_ptr, out_ptr, n, slot_stride, sync, rank, call_hash,
        R: tl.constexpr, BLOCK: tl.constexpr, ITYPE: tl.constexpr, CANON: tl.constexpr,
        ITEM: tl.constexpr, CALL_OFF: tl.constexpr, WP: tl.constexpr):
    pid, G, epoch, buf_off, dead, t0, cep, word = begin(sync, rank, call_hash, R, CALL_OFF)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    checked = 0
    for start in range(pid * BLOCK, n, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        bits = sanitize(tl.load(inp_ptr + offs, mask=m), ITYPE, CANON)
        for q in tl.static_range(R):
            push(sync.recv_addrs[q] + buf_off + rank * slot_stride * ITEM, offs, bits, m, ITYPE)
        mine = sync.my_recv_addr + buf_off
        # the first poll also checks the peers' calls (one round trip)
        acc, dead = receive_sum(sync, mine, slot_stride, offs, m, t0, dead, rank, epoch, checked,
                                cep, word, ERR_ONE_SHOT_PUSH, DTYPE, ITYPE, R, WP)
        checked = 1
        # no output after an error (a mismatch, a timeout): an in-place input keeps its values
        tl.store(out_ptr + offs, acc.to(DTYPE), mask=m & (dead == 0))
        clear_slots(mine, slot_stride, offs, m, ITYPE, R)
    if checked == 0:
        dead = check_calls(sync, cep, word, rank, t0, dead, ERR_ONE_SHOT_PUSH, epoch, R, WP)
    end(sync, pid, epoch, cep, CALL_OFF)


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


def bind_all_reduce_one_shot_push(*, sync: SyncArgs, slot_stride: int, grid: int,
                                  num_warps: int, itype: tl.dtype, canon: int, block: int,
                                  item: int, device: int | None = None,
                                  verify: bool = False) -> LeanKernel:
    """out [n] = sum over ranks of inp [n] (push): ``.launch(inp, out, n, call_hash)``."""
    return LeanKernel(
        _all_reduce_one_shot_push_kernel, grid, call=("inp_ptr", "out_ptr", "n", "call_hash"),
        fixed=dict(slot_stride=slot_stride, sync=sync.device(), rank=sync.rank),
        constexprs=dict(R=sync.world, BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item,
                        CALL_OFF=sync.call_off, WP=sync.wp),
        num_warps=num_warps, device=device, verify=verify)


def bind_all_reduce_one_shot_pull(*, sync: SyncArgs, src_addrs: tuple[int, ...] | None,
                                  my_src_addr: int, slot_bytes: int, mode: int, grid: int,
                                  num_warps: int, block: int, device: int | None = None,
                                  verify: bool = False) -> LeanKernel:
    """out [n] = sum over ranks of inp [n] (pull, ``mode`` 0-2 of the kernel's docstring):
    ``.launch(inp, out, n, call_hash)``; ``src_addrs=None``: ``.launch(inp, out, n,
    call_hash, src_addrs)``, the R source addresses per call."""
    call = ("inp_ptr", "out_ptr", "n", "call_hash") + (("src_addrs",) if src_addrs is None else ())
    fixed = dict(my_src_addr=my_src_addr, slot_bytes=slot_bytes, pad_addrs=sync.pad_addrs,
                 my_pad_addr=sync.my_pad_addr, counter_ptr=sync.counters, err_ptr=sync.err_dev,
                 err_host=sync.err_host, rank=sync.rank, timeout_ns=sync.timeout_ns,
                 hdr_addrs=sync.hdr_addrs)
    if src_addrs is not None:
        fixed["src_addrs"] = src_addrs
    return LeanKernel(
        _all_reduce_one_shot_pull_kernel, grid, call=call, fixed=fixed,
        constexprs=dict(MODE=mode, R=sync.world, RP=sync.wp, BLOCK=block,
                        CALL_OFF=sync.call_off),
        num_warps=num_warps, device=device, verify=verify)
