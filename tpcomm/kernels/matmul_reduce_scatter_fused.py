"""GEMM + reduce-scatter with the send fused into the GEMM's epilogue ("fused compute and send").

Problem: every rank p holds ``a_p`` [M, K] and the same ``b`` [K, N]; rank r needs
``out_r = sum over p of (a_p @ b)[r*m:(r+1)*m]`` [m, N], m = M / R (a row-parallel linear
followed by a reduce-scatter over rows). Done apart, the GEMM writes [M, N] to memory, then a
reduce-scatter reads it back and sends it; nothing is sent before the last tile is computed.

Algorithm, per round of rows (``rows`` rows of every owner's block, so that ``rows * N``
elements fit one push slot; the caller loops over rounds):

- ``_matmul_reduce_scatter_push_kernel``: the GEMM core of ``_gemm.py`` (persistent grid,
  A and B through TMA descriptors where TMA can express them, else pointers; wgmma through
  ``tl.dot``; software-pipelined or warp-specialized per the tile table). Its epilogue does not
  store to a local C: it rounds each tile to the output dtype, takes its bits
  (``_lamport.sanitize``: never the sentinel) and stores them straight into slot ``rank`` of
  the receive region of the rank that owns those rows. The stores of the early tiles travel
  over NVLink while the later tiles are computed; the GEMM never waits. Tiles go out in order
  of local row tile first, owner second (``_gemm.tile_coords``): every owner gets its first
  rows first, which is where its receive kernel's blocks start polling.
- ``_reduce_scatter_receive_kernel``: on every rank, the receive half of
  ``reduce_scatter.py``: poll the R slots (``_lamport.poll_sum``: slot order 0..R-1, float32
  sum, one rounding, so the result is bitwise that of GEMM then reduce-scatter), store ``out``,
  store the sentinel back (``clear_slots``) and advance the per-block epoch counters.

Routing (tile (d, t): rows ``t*BLOCK_M ..`` of owner d's ``rows`` rows of this round)::

    source rows  a[d*m + lo + t*BLOCK_M ..]       (one TMA box or pointer block of a, in place:
                                                 no copy of a round's rows)
    target       recv_addrs[d] + region(E) + rank * slot_stride * ITEM
    element      local_row * N + col              (== the receiver's out[lo:hi] layout)

A tile never straddles two owners: each owner's rows are tiled on their own (at most R partial
tiles per round), so a tile is one box of a and one masked push.

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

from . import _gemm
from ._gemm import device_descs, halves, mainloop, pick, tile_coords, tile_count
from ._lamport import clear_slots, poll_sum, prologue, push, sanitize
from .barrier import record_error


@triton.jit
def _push_tile(acc, dst, r0, c0, rows, N, DTYPE: tl.constexpr, ITYPE: tl.constexpr,
               CANON: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows r0.. and columns c0.. of the owner's [rows, N] block, rounded to DTYPE, as bits
    (never the sentinel), into the slot at ``dst``."""
    bits = sanitize(acc.to(DTYPE), ITYPE, CANON)
    ri = r0 + tl.arange(0, BLOCK_M)
    cj = c0 + tl.arange(0, BLOCK_N)
    push(dst, ri[:, None] * N + cj[None, :], bits, (ri < rows)[:, None] & (cj < N)[None, :],
         ITYPE)


# ``lo`` and ``rows`` change between rounds (the last one is short): one binary for all of them
@triton.jit(do_not_specialize=["lo", "rows", "rank"])
def _matmul_reduce_scatter_push_kernel(
        a, b, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
        lo, m, rows, recv_addrs, counter_ptr, buf_stride, slot_stride, rank,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, A_DESC: tl.constexpr,
        B_DESC: tl.constexpr, B_T: tl.constexpr, EVEN_K: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr, EPI_SPLIT: tl.constexpr,
        DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        R: tl.constexpr, ITYPE: tl.constexpr, CANON: tl.constexpr, ITEM: tl.constexpr):
    """Owner d's rows ``a[d*m + lo : d*m + lo + rows]`` times b, pushed to owner d's slot
    ``rank``; persistent over the R * cdiv(rows, BLOCK_M) * cdiv(N, BLOCK_N) tiles."""
    a, b = device_descs(a, b, M, N, K, stride_am, stride_bk, stride_bn, BLOCK_M, BLOCK_N,
                        BLOCK_K, A_DESC, B_DESC, B_T)
    epoch = tl.load(counter_ptr) + 1          # the receive kernel's epoch; not stored here
    slot_off = (epoch % 2) * buf_stride + rank * slot_stride * ITEM
    pid = tl.program_id(0)
    tiles = tile_count(rows, N, R, BLOCK_M, BLOCK_N)
    tile_c = pid - NUM_SMS   # the epilogue's own counter (as in Triton's persistent tutorial)
    for tile in tl.range(pid, tiles, NUM_SMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        d, r0, c0 = tile_coords(tile, rows, N, R, BLOCK_M, BLOCK_N, GROUP_M)
        acc = mainloop(a, b, d * m + lo + r0, rows - r0, c0, N, K, stride_am, stride_ak,
                       stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, A_DESC, B_DESC, B_T,
                       EVEN_K, INPUT_PRECISION)
        tile_c += NUM_SMS
        d, r0, c0 = tile_coords(tile_c, rows, N, R, BLOCK_M, BLOCK_N, GROUP_M)
        dst = pick(recv_addrs, d, R) + slot_off
        if EPI_SPLIT:
            left, right = halves(acc, BLOCK_M, BLOCK_N)
            _push_tile(left, dst, r0, c0, rows, N, DTYPE, ITYPE, CANON, BLOCK_M, BLOCK_N // 2)
            _push_tile(right, dst, r0, c0 + BLOCK_N // 2, rows, N, DTYPE, ITYPE, CANON,
                       BLOCK_M, BLOCK_N // 2)
        else:
            _push_tile(acc, dst, r0, c0, rows, N, DTYPE, ITYPE, CANON, BLOCK_M, BLOCK_N)


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


def plan(a, b, rows_per_launch, **gemm) -> _gemm.Plan:
    """The GEMM core's plan for ``a`` [M, K] x ``b`` [K, N] (once per op, see ``_gemm.plan``):
    the tile table's config for launches of ``rows_per_launch`` rows, ``gemm`` overriding its
    fields (block_m, block_n, block_k, num_warps, num_stages, tma, ...)."""
    config = gemm.pop("config", None)
    return _gemm.plan(a, b, config, rows_hint=rows_per_launch, **gemm)


def matmul_reduce_scatter_push(p: _gemm.Plan, lo, rows, m, recv_addrs, counters, buf_stride,
                               slot_stride, rank, *, itype, canon, warmup=False):
    """The GEMM of one round: rows ``lo..lo+rows`` of every owner's block of ``m`` rows of the
    planned ``a``, times b, pushed as R * rows x N results into slot ``rank`` of each owner's
    receive region. ``warmup``: compile only."""
    R = len(recv_addrs)
    grid = p.grid(_gemm.num_tiles(rows, p.n, R, p.config))
    fn = (_matmul_reduce_scatter_push_kernel.warmup if warmup else
          _matmul_reduce_scatter_push_kernel[grid])
    kw = dict(grid=grid) if warmup else {}
    return fn(*p.args, lo, m, rows, tuple(recv_addrs), counters, buf_stride, slot_stride, rank,
              R=R, ITYPE=itype, CANON=canon, ITEM=p.item, **p.meta, **kw)


def reduce_scatter_receive(out, c, my_recv_addr, buf_stride, slot_stride, counters, err_dev,
                           err_host, world, rank, timeout_ns, *, grid, num_warps, itype, canon,
                           block):
    """Poll this rank's ``world`` slots for ``c`` elements, sum them into ``out`` (contiguous),
    clear the slots, advance the push family's epoch (``canon`` unused: nothing is sent)."""
    del canon
    _reduce_scatter_receive_kernel[(grid,)](
        out, c, my_recv_addr, buf_stride, slot_stride, counters, err_dev, err_host, rank,
        timeout_ns, R=world, BLOCK=block, ITYPE=itype, num_warps=num_warps)
