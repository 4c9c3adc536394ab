"""GEMM + reduce-scatter with the send fused into the GEMM's epilogue ("fused compute and send").

Problem: every rank p holds ``a_p`` [M, K] and the same ``b`` [K, N]; rank r needs
``out_r = sum over p of (a_p @ b)[r*m:(r+1)*m]`` [m, N], m = M / R (a row-parallel linear
followed by a reduce-scatter over rows). Done apart, the GEMM writes [M, N] to memory, then a
reduce-scatter reads it back and sends it; nothing is sent before the last tile is computed.

Algorithm, per round of rows (``rows`` rows of every owner's block, so that ``rows * N``
elements fit one push slot; the caller loops over rounds):

- ``_matmul_reduce_scatter_push_kernel``: a tiled matmul (fp32 accumulator, ``tl.dot``, masks
  for any M, N, K). Its epilogue does not store to a local C: it rounds each tile to the output
  dtype, takes its bits (``_lamport.sanitize``: never the sentinel) and stores them straight
  into slot ``rank`` of the receive region of the rank that owns those rows. The stores of the
  early tiles travel over NVLink while the later tiles are computed; the GEMM never waits.
- ``_reduce_scatter_receive_kernel``: on every rank, the receive half of
  ``reduce_scatter.py``: poll the R slots (``_lamport.poll_sum``: slot order 0..R-1, float32
  sum, one rounding, so the result is bitwise that of GEMM then reduce-scatter), store ``out``,
  store the sentinel back (``clear_slots``) and advance the per-block epoch counters.

Routing (row ``i`` of the round's [R * rows, N] product, ``d = i // rows`` its owner)::

    source row  a[d*m + lo + (i - d*rows)]      (a pointer per row: no copy of a round's rows)
    target      recv_addrs[d] + region(E) + rank * slot_stride * ITEM
    element     (i - d*rows) * N + col           (== the receiver's out[lo:hi] layout)

A tile of BLOCK_M rows may straddle owners: the epilogue stores it once per owner that it
touches, each store masked to that owner's rows.

Epoch and region. The receive kernel is a push-family kernel like the others: the fixed grid G,
per-block counters read at its start (epoch E = counter + 1) and written back at its end. The
GEMM's grid is not G, so it must not touch the counters: it reads ``E = counter[0] + 1`` and
pushes into region ``E % 2``. That is the receive kernel's epoch: every push-family kernel
writes every block's counter once, so between two kernels on the stream all G counters are
equal, and the GEMM runs (stream order) after the previous op's kernels and before this op's
receive kernel. Why region ``E % 2`` is free when a peer w pushes into rank r's during op E
(the rule of ``_lamport.py``, unchanged): w's GEMM starts after w finished op E-1, whose receive
waited for data that r pushed in its own op E-1, which r did after finishing op E-2, the last
op that used this region, clearing included. A round with R * rows * N > 0 elements makes every
rank wait on every rank, like any push op; empty rounds launch nothing.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._lamport import clear_slots, poll_sum, prologue, push, sanitize
from .barrier import INTERPRET, record_error

# GPU tile of the GEMM: 128 x 128 with 64-deep K steps in 16-bit dtypes (3 stages of
# (128*64 + 64*128) * 2 B = 96 KiB of shared memory); 32-deep in float32 (same bytes).
BLOCK_M, BLOCK_N = 128, 128
GEMM_WARPS, GEMM_STAGES = 8, 3


# ``rows`` changes between rounds (the last one is short): one binary for all of them
@triton.jit(do_not_specialize=["rank", "rows"])
def _matmul_reduce_scatter_push_kernel(
        a_ptr, b_ptr, rows, N, K, stride_am, stride_ak, stride_ad, stride_bk, stride_bn,
        recv_addrs, counter_ptr, buf_stride, slot_stride, rank,
        R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ITYPE: tl.constexpr, CANON: tl.constexpr, ITEM: tl.constexpr,
        INPUT_PRECISION: tl.constexpr):
    """Rows ``i`` in [0, R * rows): row ``i - d*rows`` of owner d's block, at
    ``a_ptr + d * stride_ad + (i - d*rows) * stride_am`` (elements)."""
    DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    epoch = tl.load(counter_ptr) + 1          # the receive kernel's epoch; not stored here
    buf_off = (epoch % 2) * buf_stride
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    total = R * rows
    ri = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cj = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = ri < total
    col_ok = cj < N
    owner = ri // rows
    local = ri - owner * rows
    a_row = owner.to(tl.int64) * stride_ad + local.to(tl.int64) * stride_am
    a_ptrs = a_ptr + a_row[:, None] + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + cj.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + rk) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if INTERPRET:   # triton 3.6's interpreter multiplies bf16 as their uint16 bits
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    bits = sanitize(acc.to(DTYPE), ITYPE, CANON)
    offs = local[:, None] * N + cj[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    first = (pid_m * BLOCK_M) // rows                                # owners this tile
    last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, total) - 1) // rows  # touches: first..last
    for d in tl.static_range(R):
        if (d >= first) & (d <= last):
            dst = recv_addrs[d] + buf_off + rank * slot_stride * ITEM
            push(dst, offs, bits, mask & (owner == d)[:, None], ITYPE)


@triton.jit(do_not_specialize=["rank"])
def _reduce_scatter_receive_kernel(
        out_ptr, c, my_recv_addr, buf_stride, slot_stride, counter_ptr, err_ptr, err_host,
        rank, timeout_ns,
        R: tl.constexpr, BLOCK: tl.constexpr, ITYPE: tl.constexpr):
    pid, G, epoch, buf_off, dead, t0 = prologue(counter_ptr, err_ptr, buf_stride)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    mine = my_recv_addr + buf_off
    for start in range(pid * BLOCK, c, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < c
        acc, dead, late = poll_sum(mine, slot_stride, offs, m, t0, timeout_ns, dead, DTYPE,
                                   ITYPE, R)
        if late >= 0:
            record_error(err_ptr, err_host, 9, 0, rank, late, epoch)  # OP_MATMUL_RS
        tl.store(out_ptr + offs, acc.to(DTYPE), mask=m)
        clear_slots(mine, slot_stride, offs, m, ITYPE, R)
    tl.store(counter_ptr + pid, epoch)


def matmul_reduce_scatter_push(a, b, rows, n, k, stride_am, stride_ak, stride_ad, recv_addrs,
                               counters, buf_stride, slot_stride, rank, *, itype, canon,
                               block_m=BLOCK_M, block_n=BLOCK_N, block_k=None,
                               num_warps=GEMM_WARPS, num_stages=GEMM_STAGES,
                               input_precision=None):
    """The GEMM of one round: ``a`` is the round's first row of owner 0 (rows of owner d are
    ``stride_ad`` elements further), ``b`` [K, N] any strides; pushes R * rows x N results.
    ``input_precision``: ``tl.dot``'s; default "ieee" for float32 (torch's default matmul),
    the hardware default for 16-bit dtypes."""
    R = len(recv_addrs)
    if block_k is None:
        block_k = 64 if a.element_size() <= 2 else 32
    if input_precision is None and a.element_size() == 4:
        input_precision = "ieee"
    grid = (triton.cdiv(R * rows, block_m), triton.cdiv(n, block_n))
    _matmul_reduce_scatter_push_kernel[grid](
        a, b, rows, n, k, stride_am, stride_ak, stride_ad, b.stride(0), b.stride(1),
        recv_addrs, counters, buf_stride, slot_stride, rank, R=R, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, ITYPE=itype, CANON=canon, ITEM=a.element_size(),
        INPUT_PRECISION=input_precision, num_warps=num_warps,
        num_stages=num_stages)


def reduce_scatter_receive(out, c, my_recv_addr, buf_stride, slot_stride, counters, err_dev,
                           err_host, world, rank, timeout_ns, *, grid, num_warps, itype, canon,
                           block):
    """Poll this rank's ``world`` slots for ``c`` elements, sum them into ``out`` (contiguous),
    clear the slots, advance the push family's epoch (``canon`` unused: nothing is sent)."""
    del canon
    _reduce_scatter_receive_kernel[(grid,)](
        out, c, my_recv_addr, buf_stride, slot_stride, counters, err_dev, err_host, rank,
        timeout_ns, R=world, BLOCK=block, ITYPE=itype, num_warps=num_warps)
