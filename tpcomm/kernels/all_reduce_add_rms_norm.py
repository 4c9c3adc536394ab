"""All-reduce + residual add + RMSNorm in one kernel: the end of a TP sublayer.

Problem: a row-parallel linear leaves a partial sum on every rank; the model then needs
``residual += all_reduce(x)`` and ``normed = rms_norm(residual) * weight``. Done apart, that is
an all-reduce kernel and two more passes over the activations (add, norm), each a launch.

Algorithm (``_all_reduce_add_rms_norm_one_shot_push_kernel``): the one-shot push all-reduce of
``all_reduce_one_shot.py`` with rows as tiles. Block ``b`` owns rows ``b, b+G, b+2G, ...``; for
each row it stores its slice of ``x`` into slot ``rank`` of every rank's receive region
(``_lamport.py``: the data carries its own arrival flag), polls its own region until all R slots
hold the row, sums them in rank order 0..R-1 in float32, and then, with the whole row in
registers::

    y        = round(sum)                      -> x (in place: x ends up all-reduced)
    residual = round(float(y) + float(residual)) -> residual (in place)
    normed   = round(residual * rsqrt(mean(residual^2) + eps) * weight)   (float32 inside)

which is the arithmetic of ``tpcomm.reference.add_rms_norm`` after a rounded all-reduce: x and
residual come out bitwise equal to the unfused path; normed may differ from torch's in the last
bit (another summation order for the mean, another rsqrt). Every rank runs the same arithmetic
on the same bits, so every rank gets bitwise the same three results.

Receive regions and counters are the push family's (the same epoch counters as the one-shot
push kernel, so the grid G must be the same fixed grid), and every wait is bounded as in
``barrier.py``. A row must fit in one block's registers: ``BLOCK_H`` is the next power of two of
H (the launcher refuses H > MAX_H; the Communicator routes those to the unfused path).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._lamport import begin, check_calls, clear_slots, end, push, receive_sum, sanitize
from .barrier import ERR_ADD_RMS_NORM
from .launch import LeanKernel
from .sync import SyncArgs

# Largest hidden size handled by one block (16384 bf16 = 32 KiB per row, 64 float32 values per
# thread at 8 warps): above it registers spill and the unfused path is as fast.
MAX_H = 16384


# rows not specialized either: one binary for every batch size (decode batches vary)
@triton.jit(do_not_specialize=["rank", "rows", "call_hash"])
def _all_reduce_add_rms_norm_one_shot_push_kernel(
        x_ptr, res_ptr, w_ptr, normed_ptr, rows, H, eps, slot_stride, sync, rank, call_hash,
        R: tl.constexpr, BLOCK_H: tl.constexpr, ITYPE: tl.constexpr, CANON: tl.constexpr,
        ITEM: tl.constexpr, CALL_OFF: tl.constexpr, WP: tl.constexpr):
    pid, G, epoch, buf_off, dead, t0, cep, word = begin(sync, rank, call_hash, R, CALL_OFF)
    checked = 0
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_H)
    cm = cols < H
    w = tl.load(w_ptr + cols, mask=cm, other=0).to(tl.float32)
    mine = sync.my_recv_addr + buf_off
    for row in range(pid, rows, G):
        offs = row * H + cols
        bits = sanitize(tl.load(x_ptr + offs, mask=cm), ITYPE, CANON)
        for q in tl.static_range(R):
            push(sync.recv_addrs[q] + buf_off + rank * slot_stride * ITEM, offs, bits, cm, ITYPE)
        # the first poll also checks the peers' calls (one round trip)
        acc, dead = receive_sum(sync, mine, slot_stride, offs, cm, t0, dead, rank, epoch, checked,
                                cep, word, ERR_ADD_RMS_NORM, DTYPE, ITYPE, R, WP)
        checked = 1
        y = acc.to(DTYPE)
        wm = cm & (dead == 0)   # no output after an error: x and residual keep their values
        tl.store(x_ptr + offs, y, mask=wm)
        res = (y.to(tl.float32) + tl.load(res_ptr + offs, mask=cm, other=0).to(tl.float32))
        res = res.to(DTYPE)
        tl.store(res_ptr + offs, res, mask=wm)
        rf = res.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(rf * rf, 0) / H + eps)
        tl.store(normed_ptr + offs, (rf * inv * w).to(DTYPE), mask=wm)
        clear_slots(mine, slot_stride, offs, cm, ITYPE, R)
    if checked == 0:
        dead = check_calls(sync, cep, word, rank, t0, dead, ERR_ADD_RMS_NORM, epoch, R, WP)
    end(sync, pid, epoch, cep, CALL_OFF)


def bind_all_reduce_add_rms_norm_one_shot_push(*, sync: SyncArgs, hidden: int, slot_stride: int,
                                               grid: int, num_warps: int, itype: tl.dtype,
                                               canon: int, item: int, device: int | None = None,
                                               verify: bool = False) -> LeanKernel:
    """x, residual, normed [rows, hidden], weight [hidden] (x, residual updated in place):
    ``.launch(x, residual, weight, normed, rows, eps, call_hash)``."""
    if hidden > MAX_H:
        raise ValueError(f"fused all_reduce_add_rms_norm handles hidden sizes up to {MAX_H}, "
                         f"got {hidden}")
    return LeanKernel(
        _all_reduce_add_rms_norm_one_shot_push_kernel, grid,
        call=("x_ptr", "res_ptr", "w_ptr", "normed_ptr", "rows", "eps", "call_hash"),
        fixed=dict(H=hidden, slot_stride=slot_stride, sync=sync.device(), rank=sync.rank),
        constexprs=dict(R=sync.world, BLOCK_H=triton.next_power_of_2(hidden), ITYPE=itype,
                        CANON=canon, ITEM=item, CALL_OFF=sync.call_off, WP=sync.wp),
        num_warps=num_warps, device=device, verify=verify)
