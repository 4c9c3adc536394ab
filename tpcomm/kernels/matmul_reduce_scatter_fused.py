"""GEMM + reduce-scatter with the send and the receive fused into the GEMM ("compute and send").

Problem: every rank p holds ``a_p`` [M, K] and the same ``b`` [K, N]; rank r needs
``out_r = sum over p of (a_p @ b)[r*m:(r+1)*m]`` [m, N], m = M / R (a row-parallel linear
followed by a reduce-scatter over rows). Done apart, the GEMM writes [M, N] to memory, then a
reduce-scatter reads it back and sends it; nothing is sent before the last tile is computed.

Algorithm: one persistent kernel per round of rows (``rows`` rows of every owner's block, so
that ``rows * N`` elements fit one push slot; the caller loops over rounds; at world 1 no slot
is used, every tile goes straight to ``out``, and one launch covers all rows),
``_matmul_reduce_scatter_kernel``, on the fixed grid G of the push family (counters per
program, below). Program p computes tiles ``p, p + G, p + 2G, ...`` of the round on the GEMM
core of ``_gemm.py`` (A and B through TMA where TMA can express them, wgmma through ``tl.dot``,
software-pipelined), and after each tile:

1. push: rounds the tile to the output dtype, takes its bits (``_lamport.sanitize``: never the
   sentinel) and stores them into slot ``rank`` of the receive region of the tile's owner (its
   rows' rank), over NVLink for a peer;
2. receive, one step late: if the tile it pushed one step before belongs to this rank, it polls
   that tile in its R slots (``_tile_sync.poll_sum_tile``: slot order 0..R-1, float32 sum, one
   rounding: bitwise the result of GEMM then reduce-scatter), stores the sum into ``out`` and
   stores the sentinel back. After the last tile it receives its last owned tile.

Every rank runs the same tile schedule (same shapes, same config, same G), so tile t is computed
by program ``t % G`` on every rank at the same step: the owner's program finds the R pushes of
its tile arrived or arriving (the one-step lag hides their NVLink latency behind a whole tile of
compute), and the receive needs no kernel, no pass over memory and no launch of its own: at
world 1 the tile is read back from L2 right after it was written. A program waits only for
pushes of steps not later than its own, which every rank's program makes before it waits, so
the waits cannot form a cycle (all G programs of every rank must be resident at once: the grid
is at most the SM count, one program per SM).

Tiles go in order of local row tile first, owner second (``_gemm.tile_coords``): every owner's
first rows come first.

Routing (tile (d, t): rows ``t*BLOCK_M ..`` of owner d's ``rows`` rows of this round)::

    source rows  a[d*m + lo + t*BLOCK_M ..]       (one TMA box or pointer block of a, in place:
                                                 no copy of a round's rows)
    target       recv_addrs[d] + region(E) + rank * slot_stride * ITEM
    element      local_row * N + col              (== the receiver's out[lo:hi] layout)

Epoch and region: a push-family kernel like the others (``_lamport.py``): program p reads its
counter (epoch E = counter + 1) at its start, uses region ``E % 2`` and writes E back at its
end; every program, with or without tiles, so the G counters stay equal. Why region ``E % 2``
is free when a peer w pushes into rank r's during op E: w started op E after finishing op E-1,
which waited for data that r pushed in its op E-1, which r did after finishing op E-2, the last
op that used this region, clearing included. Every round with R * rows * N > 0 elements makes
every rank wait on every rank (each owner receives a tile from every rank); empty rounds launch
nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _gemm
from ._gemm import device_descs, halves, mainloop, tile_coords, tile_count
from ._lamport import prologue, sanitize, typed
from ._tile_sync import clear_tile, poll_sum_tile
from .barrier import OP_MATMUL_RS, pick, record_error
from .sync import SyncArgs


@triton.jit
def _store_tile(acc, dst, r0, c0, rows, N, DTYPE: tl.constexpr, ITYPE: tl.constexpr,
                CANON: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows r0.. and columns c0.. of an owner's [rows, N] block, rounded to DTYPE (after
    ``+ 0.0``: a -0 becomes +0, as in a sum from zero), as bits (never the sentinel), at the
    ITYPE pointer ``dst`` (element 0 of the block: a peer's slot, or this rank's ``out``).
    64-bit offsets: at world 1 one launch covers all rows (``rows * N`` may pass 2**31)."""
    bits = sanitize((acc + 0.0).to(DTYPE), ITYPE, CANON)
    ri = r0 + tl.arange(0, BLOCK_M)
    cj = c0 + tl.arange(0, BLOCK_N)
    tl.store(dst + ri.to(tl.int64)[:, None] * N + cj[None, :], bits,
             mask=(ri < rows)[:, None] & (cj < N)[None, :])


@triton.jit
def _receive_tile(mine, slot_stride, own, r0, c0, rows, N, t0, timeout_ns, dead, err_ptr,
                  err_host, rank, epoch, DTYPE: tl.constexpr, ITYPE: tl.constexpr,
                  R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SUB_M: tl.constexpr, op):
    """Owner side of tile (r0, c0): the R - 1 peers' slots and this rank's own contribution
    (in ``own``: this round's rows of the contiguous result, as bits) summed in rank order into
    ``own``, the slots cleared; SUB_M rows at a time (registers: R loads per element)."""
    tl.debug_barrier()   # the own tile was stored by other threads of this program
    cj = c0 + tl.arange(0, BLOCK_N)
    for s in tl.static_range(BLOCK_M // SUB_M):
        ri = r0 + s * SUB_M + tl.arange(0, SUB_M)
        offs = ri[:, None] * N + cj[None, :]
        msk = (ri < rows)[:, None] & (cj < N)[None, :]
        acc, dead, late = poll_sum_tile(mine, slot_stride, own, offs, msk, t0, timeout_ns, dead,
                                        rank, DTYPE, ITYPE, R)
        if late >= 0:
            record_error(err_ptr, err_host, op, 0, rank, late, epoch)
        tl.store(own + offs, acc.to(DTYPE).to(ITYPE, bitcast=True), mask=msk)
        clear_tile(mine, slot_stride, offs, msk, rank, ITYPE, R)
    return dead


# ``out_row``, ``lo`` and ``rows`` change between rounds (the last one is short) and ranks: one
# binary for all of them (``out`` is passed whole, so its alignment does not change either)
@triton.jit(do_not_specialize=["out_row", "lo", "rows", "rank", "op"])
def _matmul_reduce_scatter_kernel(
        a, b, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
        out, out_row, lo, m, rows, recv_addrs, my_recv_addr, buf_stride, slot_stride,
        counter_ptr, err_ptr, err_host, rank, timeout_ns, op,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, A_DESC: tl.constexpr,
        B_DESC: tl.constexpr, B_T: tl.constexpr, EVEN_K: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr, EPI_SPLIT: tl.constexpr,
        DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        R: tl.constexpr, ITYPE: tl.constexpr, CANON: tl.constexpr, ITEM: tl.constexpr,
        SUB_M: tl.constexpr, OUT_DESC: tl.constexpr):
    """Owner d's rows ``a[d*m + lo : d*m + lo + rows]`` times b, pushed to owner d's slot
    ``rank`` (this rank's own: into ``out`` rows ``out_row ..``, where its receive sums them);
    persistent over the R * cdiv(rows, BLOCK_M) * cdiv(N, BLOCK_N) tiles with NUM_SMS (= G)
    programs. ``OUT_DESC`` (world 1 only): ``out`` is a host TMA descriptor over exactly the
    ``rows`` rows this launch writes (from ``out_row``), the tiles leave through TMA stores."""
    a, b = device_descs(a, b, M, N, K, stride_am, stride_bk, stride_bn, BLOCK_M, BLOCK_N,
                        BLOCK_K, A_DESC, B_DESC, B_T)
    pid, G, epoch, buf_off, dead, t0 = prologue(counter_ptr, err_ptr, buf_stride)
    slot_off = buf_off + rank * slot_stride * ITEM
    mine = my_recv_addr + buf_off
    if OUT_DESC:
        own = out
    else:
        own = (out + out_row.to(tl.int64) * N).to(tl.pointer_type(ITYPE))
    tiles = tile_count(rows, N, R, BLOCK_M, BLOCK_N)
    tile_c = pid - NUM_SMS   # the epilogue's own counter (as in Triton's persistent tutorial)
    own_r0 = -1              # the owned tile stored one step before (its rows; -1: none)
    own_c0 = 0
    for tile in tl.range(pid, tiles, NUM_SMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        d, r0, c0 = tile_coords(tile, rows, N, R, BLOCK_M, BLOCK_N, GROUP_M)
        acc = mainloop(a, b, d * m + lo + r0, rows - r0, c0, N, K, stride_am, stride_ak,
                       stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, A_DESC, B_DESC, B_T,
                       EVEN_K, INPUT_PRECISION)
        tile_c += NUM_SMS
        d, r0, c0 = tile_coords(tile_c, rows, N, R, BLOCK_M, BLOCK_N, GROUP_M)
        if OUT_DESC:   # world 1: no slot, no sentinel to avoid (a -0 becomes +0 as below)
            if EPI_SPLIT:
                left, right = halves(acc, BLOCK_M, BLOCK_N)
                own.store([r0, c0], (left + 0.0).to(DTYPE))
                own.store([r0, c0 + BLOCK_N // 2], (right + 0.0).to(DTYPE))
            else:
                own.store([r0, c0], (acc + 0.0).to(DTYPE))
        else:
            if d == rank:
                dst = own
            else:
                dst = typed(pick(recv_addrs, d, R) + slot_off, ITYPE)
            if EPI_SPLIT:
                left, right = halves(acc, BLOCK_M, BLOCK_N)
                _store_tile(left, dst, r0, c0, rows, N, DTYPE, ITYPE, CANON, BLOCK_M,
                            BLOCK_N // 2)
                _store_tile(right, dst, r0, c0 + BLOCK_N // 2, rows, N, DTYPE, ITYPE, CANON,
                            BLOCK_M, BLOCK_N // 2)
            else:
                _store_tile(acc, dst, r0, c0, rows, N, DTYPE, ITYPE, CANON, BLOCK_M, BLOCK_N)
        if R > 1:   # world 1: the own tile is the result (nothing to receive)
            if own_r0 >= 0:
                dead = _receive_tile(mine, slot_stride, own, own_r0, own_c0, rows, N, t0,
                                     timeout_ns, dead, err_ptr, err_host, rank, epoch, DTYPE,
                                     ITYPE, R, BLOCK_M, BLOCK_N, SUB_M, op)
            own_r0 = tl.where(d == rank, r0, -1)
            own_c0 = c0
    if R > 1:
        if own_r0 >= 0:
            dead = _receive_tile(mine, slot_stride, own, own_r0, own_c0, rows, N, t0,
                                 timeout_ns, dead, err_ptr, err_host, rank, epoch, DTYPE, ITYPE,
                                 R, BLOCK_M, BLOCK_N, SUB_M, op)
    tl.store(counter_ptr + pid, epoch)


def plan(a, b, rows_per_launch, grid, **gemm) -> _gemm.Plan:
    """The GEMM core's plan for ``a`` [M, K] x ``b`` [K, N] (once per op, see ``_gemm.plan``):
    the tile table's config for launches of ``rows_per_launch`` rows on ``grid`` programs (the
    push family's fixed grid), ``gemm`` overriding its fields (block_m, block_n, block_k,
    num_warps, num_stages, tma, ...)."""
    config = gemm.pop("config", None)
    gemm["num_sms"] = grid
    return _gemm.plan(a, b, config, rows_hint=rows_per_launch, **gemm)


def sub_rows(p: _gemm.Plan, world: int) -> int:
    """Rows of a tile the receive handles at a time: at most 64 loaded elements per thread
    (R slots of SUB_M x BLOCK_N elements over 32 * num_warps threads); 16 where an operand is
    read through pointers (its address tensors stay live across the loop: 128x128x32 in bf16
    spilled 2 KB per thread with 64)."""
    cfg = p.config
    budget = 64 if _gemm.PTR not in p.modes[:2] else 16
    sub = cfg.block_m
    while sub > 1 and world * sub * cfg.block_n > budget * 32 * cfg.num_warps:
        sub //= 2
    return sub


def matmul_reduce_scatter(*, p: _gemm.Plan, out: torch.Tensor, out_row: int, lo: int, rows: int,
                          m: int, slot_stride: int, sync: SyncArgs, itype: tl.dtype, canon: int,
                          op: int = OP_MATMUL_RS, warmup: bool = False):
    """One round: rows ``lo..lo+rows`` of every owner's [m, K] block of the planned a [R*m, K]
    times b [K, N], pushed to their owners; this rank's [rows, N] sum into rows ``out_row ..``
    of the contiguous ``out`` [*, N]. Grid: the plan's NUM_SMS (the push family's G). ``op``:
    the op code its timeouts record. ``warmup``: compile only."""
    R = sync.world
    grid = (p.grid_cap,)
    fn = (_matmul_reduce_scatter_kernel.warmup if warmup else
          _matmul_reduce_scatter_kernel[grid])
    kw = dict(grid=grid) if warmup else {}
    out_arg, out_desc = out, False
    if R == 1 and p.config.tma_store:   # a descriptor over exactly this launch's rows
        desc = _gemm.store_desc(out.view(-1, p.n)[out_row:out_row + rows], p.config)
        if desc is not None:
            out_arg, out_desc = desc, True
    # flattening the tile loop with a receive (a spin loop) inside defeats Triton 3.6's
    # pipeliner: 2 TMA loads in flight, 48 KiB of shared memory, spills (compile_check, R = 4)
    meta = dict(p.meta, FLATTEN=p.meta["FLATTEN"] and R == 1)
    return fn(*p.args, out_arg, out_row, lo, m, rows, tuple(sync.recv_addrs), sync.my_recv_addr,
              sync.buf_stride, slot_stride, sync.counters, sync.err_dev, sync.err_host,
              sync.rank, sync.timeout_ns, op, R=R, ITYPE=itype, CANON=canon, ITEM=p.item,
              SUB_M=sub_rows(p, R), OUT_DESC=out_desc, **meta, **kw)
