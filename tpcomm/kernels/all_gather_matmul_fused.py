"""All-gather + GEMM fused: the GEMM's tiles wait for the rows they read, not for the gather.

Problem: every rank p holds a shard ``a_p`` [m, K] of the activations and the same ``b``
[K, N]; every rank needs ``out = all_gather(a) @ b`` [R*m, N] (a column-parallel linear fed by a
sequence-parallel input). Done apart, the GEMM starts when the last shard has arrived.

Algorithm, per round of rows (rows ``lo..lo+rows`` of every shard, so that ``rows * K``
elements fit one push slot; the caller loops over rounds), three kernels:

- ``_all_gather_push_kernel`` (a side stream, a few small blocks): copies this rank's rows
  ``a[lo:lo+rows]`` into slot ``rank`` of its own receive region, ``BLOCK_M`` rows at a time,
  raising its own flag ``[rank][t]`` after each such row tile; then the same rows into slot
  ``rank`` of every peer's region, raising flag ``[rank][t]`` in each peer's pad. A flag is
  raised with ``_tile_sync.signal_flag``: ``bar.sync``, then a release store at system scope.
- ``_all_gather_matmul_kernel`` (the caller's stream): the persistent GEMM core of ``_gemm.py``
  over the R shards' tiles, own shard first, then shards rank+1, rank+2, ... (the order in
  which they arrive). Every tile first waits for flag ``[q][t]`` of its shard q and row tile t
  (``_tile_sync.wait_flag``: acquire, bounded; for the own shard a local copy, a microsecond
  or two ahead), then reads the rows from slot q of the receive region (one device-side TMA
  descriptor over the region, or pointers: one mainloop for every shard, so one set of
  pipeline buffers in shared memory). So the GEMM starts at once and never waits for the whole
  gather, only for the row tile it is about to read. The tile goes to
  ``out[q*m + lo + t*BLOCK_M ..]``. At world 1 nothing is pushed or waited for: the GEMM reads
  ``a`` in place.
- ``_clear_received_kernel`` (the caller's stream, after the GEMM): stores the sentinel back
  into the rows the round received, so the region is again what every push-family kernel
  expects (all sentinel wherever no data is in flight; a Lamport receive takes anything else
  for data).

Layout of a receive region (region ``E % 2`` of the push family, ``buf_stride`` bytes apart)::

    row q*srows + i  (i < rows)  = row lo + i of rank q's shard, K elements, row stride K
    srows = slot // K            (rows per slot; slot q starts at element q*slot >= q*srows*K)

and of the flags, in every rank's signal pad: ``flags[q][t]`` (int64, ``q * MAX_T + t``),
the epoch of the round whose row tile t of rank q has arrived.

Epochs and regions, as in the push family (``_lamport.py``): the GEMM kernel runs on the fixed
grid G, reads its epoch E = counter + 1, uses region ``E % 2`` and writes E back at its end; the
push kernel reads the same counter (word 0) at its start, after the previous round's GEMM and
clearing ended (the side stream waits for them) and before this round's GEMM writes it back
(program 0 of the GEMM waits for all of the push's own flags first). Region ``E % 2`` is free
when rank w pushes into rank r's: w's push of round E starts after w's GEMM of round E-1
ended, which waited for r's rows of round E-1, which r pushed after r's GEMM and clearing of
round E-2 (the last use of region ``E % 2``) ended. Flags are epochs, so they only grow and are
never reset; a flag that already holds a later epoch also satisfies a wait (the later rows went
to the other region).

Both the push kernel and the GEMM must run at the same time on every rank (each rank's GEMM
waits for every rank's push): the push kernel's blocks are small (4 warps, few registers, no
shared memory) and sit beside the GEMM's one block per SM.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _gemm
from ._gemm import device_descs, halves, mainloop, tile_coords
from ._lamport import prologue, typed
from ._tile_sync import fence_async_proxy, signal_flag, wait_flag, wait_flags_below
from .barrier import OP_ALL_GATHER_MATMUL, pick, record_error
from .sync import SyncArgs

_OP: tl.constexpr = tl.constexpr(OP_ALL_GATHER_MATMUL)   # the op code a timeout records
MAX_T = 256          # row tiles per round (flags per source rank): 256 x 128 = 32768 rows
PUSH_GRID = 16       # blocks of the push kernel: enough stores in flight for NVLink
PUSH_WARPS = 4


@triton.jit
def _copy_rows(src, dst_base, dst, n, BLOCK: tl.constexpr):
    """n elements from ``src`` to ``dst_base + dst`` (DTYPE pointers, contiguous)."""
    for e in range(0, n, BLOCK):
        offs = e + tl.arange(0, BLOCK)
        msk = offs < n
        tl.store(dst_base + dst + offs, tl.load(src + offs, mask=msk), mask=msk)


@triton.jit(do_not_specialize=["lo", "rows", "rank"])
def _all_gather_push_kernel(a, lo, rows, K, recv_addrs, flag_addrs, counter_ptr, buf_stride,
                            srows, rank, R: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK: tl.constexpr, MAX_T: tl.constexpr):
    """Rows ``a[lo:lo+rows]`` (contiguous, K elements each) into slot ``rank`` of region
    ``E % 2``: this rank's own first, then every peer's; a flag per BLOCK_M rows each time."""
    epoch = tl.load(counter_ptr) + 1          # the GEMM's epoch of this round; not stored here
    buf_off = (epoch % 2) * buf_stride
    DTYPE: tl.constexpr = a.dtype.element_ty
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(rows, BLOCK_M)
    for step in tl.static_range(R):
        q = (rank + step) % R
        dst_base = typed(pick(recv_addrs, q, R) + buf_off, DTYPE)
        for t in range(pid, row_tiles, tl.num_programs(0)):
            src = a + (lo + t * BLOCK_M).to(tl.int64) * K
            dst = (rank * srows + t * BLOCK_M).to(tl.int64) * K
            _copy_rows(src, dst_base, dst, tl.minimum(BLOCK_M, rows - t * BLOCK_M) * K, BLOCK)
            signal_flag(pick(flag_addrs, q, R) + (rank * MAX_T + t) * 8, epoch)


@triton.jit(do_not_specialize=["lo", "rows", "rank"])
def _all_gather_matmul_kernel(
        a, b, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
        out, stride_om, lo, m, rows, my_recv_addr, srows, my_flags, buf_stride, counter_ptr,
        err_ptr, err_host, rank, timeout_ns,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, A_DESC: tl.constexpr,
        B_DESC: tl.constexpr, B_T: tl.constexpr, EVEN_K: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr, EPI_SPLIT: tl.constexpr,
        DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        R: tl.constexpr, RECV_DESC: tl.constexpr, MAX_T: tl.constexpr,
        OUT_DESC: tl.constexpr):
    """out rows ``q*m + lo ..`` (+ ``rows``) = shard q's rows ``lo..lo+rows`` times b for every
    q, read from this rank's region as their flags arrive (world 1: from ``a``, this rank's
    [m, K]); persistent over R * cdiv(rows, BLOCK_M) * cdiv(N, BLOCK_N) tiles with NUM_SMS
    (= G) programs. ``OUT_DESC`` (world 1 only): ``out`` is a host TMA descriptor over exactly
    the ``rows`` rows from ``lo``, the tiles leave through TMA stores (halves with EPI_SPLIT);
    FLATTEN is honoured at world 1 only (beyond it the loop holds a flag wait)."""
    a, b = device_descs(a, b, M, N, K, stride_am, stride_bk, stride_bn, BLOCK_M, BLOCK_N,
                        BLOCK_K, A_DESC, B_DESC, B_T)
    pid, G, epoch, buf_off, dead, t0 = prologue(counter_ptr, err_ptr, buf_stride)
    if R > 1:
        recv = typed(my_recv_addr + buf_off, DTYPE)
        if RECV_DESC == 2:
            recv = tl.make_tensor_descriptor(recv, shape=[R * srows, K], strides=[K, 1],
                                             block_shape=[BLOCK_M, BLOCK_K])
    per_shard = tl.cdiv(rows, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(pid, R * per_shard, NUM_SMS, flatten=FLATTEN):
        s = tile // per_shard
        q = (rank + s) % R
        _, r0, c0 = tile_coords(tile - s * per_shard, rows, N, 1, BLOCK_M, BLOCK_N, GROUP_M)
        if R == 1:
            acc = mainloop(a, b, lo + r0, rows - r0, c0, N, K, stride_am, stride_ak, stride_bk,
                           stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, A_DESC, B_DESC, B_T, EVEN_K,
                           INPUT_PRECISION)
        else:
            dead, late = wait_flag(my_flags + (q * MAX_T + r0 // BLOCK_M) * 8, epoch, t0,
                                   timeout_ns, dead)
            if late != 0:
                record_error(err_ptr, err_host, _OP, 0, rank, q, epoch)
            if RECV_DESC != 0:
                fence_async_proxy()
            acc = mainloop(recv, b, q * srows + r0, rows - r0, c0, N, K, K, 1, stride_bk,
                           stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, RECV_DESC, B_DESC, B_T, EVEN_K,
                           INPUT_PRECISION)
        if OUT_DESC:
            if EPI_SPLIT:
                left, right = halves(acc, BLOCK_M, BLOCK_N)
                out.store([r0, c0], left.to(DTYPE))
                out.store([r0, c0 + BLOCK_N // 2], right.to(DTYPE))
            else:
                out.store([r0, c0], acc.to(DTYPE))
        else:
            ri = r0 + tl.arange(0, BLOCK_M)
            cj = c0 + tl.arange(0, BLOCK_N)
            ptrs = out + (q * m + lo + ri).to(tl.int64)[:, None] * stride_om + cj[None, :]
            tl.store(ptrs, acc.to(DTYPE), mask=(ri < rows)[:, None] & (cj < N)[None, :])
    if R > 1:
        if pid == 0:   # this rank's push has read the epoch: the counters may move on
            dead, late = wait_flags_below(my_flags + rank * MAX_T * 8, tl.cdiv(rows, BLOCK_M),
                                          epoch, t0, timeout_ns, dead, MAX_T)
            if late != 0:
                record_error(err_ptr, err_host, _OP, 1, rank, rank, epoch)
    tl.store(counter_ptr + pid, epoch)


@triton.jit(do_not_specialize=["rows"])
def _clear_received_kernel(my_recv_addr, counter_ptr, buf_stride, srows, rows, K,
                           R: tl.constexpr, ITYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The sentinel back into the rows the round received (the R slots of region E % 2, E =
    the GEMM's epoch, already stored): the region is the push family's, whose other kernels
    take any element that is not the sentinel for data that has arrived."""
    epoch = tl.load(counter_ptr)
    base = typed(my_recv_addr + (epoch % 2) * buf_stride, ITYPE)
    n = rows * K
    for q in tl.static_range(R):
        first = (q * srows).to(tl.int64) * K
        for e in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = e + tl.arange(0, BLOCK)
            tl.store(base + first + offs, tl.full([BLOCK], -1, ITYPE), mask=offs < n)


def plan(a_shard, b, rows_per_launch, grid, **gemm) -> _gemm.Plan:
    """The GEMM core's plan for the own shard ``a_shard`` [m, K] x ``b`` [K, N] (once per op):
    the tile table's config for launches of ``rows_per_launch`` rows (R * rows of a round) on
    ``grid`` programs (the push family's fixed grid); ``gemm`` overrides its fields."""
    config = gemm.pop("config", None)
    gemm["num_sms"] = grid
    return _gemm.plan(a_shard, b, config, rows_hint=rows_per_launch, **gemm)


def recv_mode(p: _gemm.Plan, k: int) -> int:
    """How the GEMM reads the receive region: a device-side TMA descriptor where the config
    uses TMA and a row of K elements is a multiple of 16 bytes, else pointers."""
    if p.config.tma != "off" and (k * p.item) % 16 == 0:
        return _gemm.DEVICE_DESC
    return _gemm.PTR


def all_gather_push(*, a_shard: torch.Tensor, lo: int, rows: int, flag_addrs: tuple[int, ...],
                    srows: int, sync: SyncArgs, block_m: int, warmup: bool = False):
    """This rank's rows ``a_shard[lo:lo+rows]`` (a_shard [m, K] contiguous) into slot ``rank``
    (``srows`` rows) of every rank's region (its own first), flags ``[rank][t]`` raised on
    every rank (``flag_addrs``: each rank's flag area). Grid PUSH_GRID. ``warmup``: compile
    only."""
    K = a_shard.shape[1]
    block = PUSH_WARPS * 32 * (16 // a_shard.element_size()) * 4
    grid = (PUSH_GRID,)
    fn = _all_gather_push_kernel.warmup if warmup else _all_gather_push_kernel[grid]
    kw = dict(grid=grid) if warmup else {}
    return fn(a_shard, lo, rows, K, tuple(sync.recv_addrs), tuple(flag_addrs), sync.counters,
              sync.buf_stride, srows, sync.rank, R=sync.world, BLOCK_M=block_m, BLOCK=block,
              MAX_T=MAX_T, num_warps=PUSH_WARPS, **kw)


def clear_received(*, rows: int, k: int, srows: int, sync: SyncArgs, grid: int, num_warps: int,
                   itype: tl.dtype, block: int, warmup: bool = False):
    """After a round's GEMM: the sentinel back into the [rows, k] elements each rank pushed
    into this rank's region (slots of ``srows`` rows; the push family's invariant: a region
    holds the sentinel wherever no data is in flight). ``warmup``: compile only."""
    fn = _clear_received_kernel.warmup if warmup else _clear_received_kernel[(grid,)]
    kw = dict(grid=(grid,)) if warmup else {}
    return fn(sync.my_recv_addr, sync.counters, sync.buf_stride, srows, rows, k, R=sync.world,
              ITYPE=itype, BLOCK=block, num_warps=num_warps, **kw)


def all_gather_matmul(*, p: _gemm.Plan, out: torch.Tensor, lo: int, rows: int, m: int,
                      srows: int, my_flags: int, sync: SyncArgs, warmup: bool = False):
    """One round's GEMM: out [R*m, N] (contiguous rows) rows ``q*m + lo ..`` (+ ``rows``) for
    every shard q, the own one from the planned a_shard [m, K], the peers' from this rank's
    region (slots of ``srows`` rows) as their flags at ``my_flags`` arrive. Grid: the plan's
    NUM_SMS (the push family's G). ``warmup``: compile only."""
    world = sync.world
    grid = (p.grid_cap,)
    recv = recv_mode(p, p.args[4]) if world > 1 else _gemm.PTR   # world 1: no region read
    if recv == _gemm.DEVICE_DESC and not _gemm.INTERPRET:
        _gemm.ensure_allocator()
    fn = _all_gather_matmul_kernel.warmup if warmup else _all_gather_matmul_kernel[grid]
    kw = dict(grid=grid) if warmup else {}
    out_arg, out_desc = out, False
    if world == 1 and p.config.tma_store:   # a descriptor over exactly this launch's rows
        desc = _gemm.store_desc(out[lo:lo + rows], p.config)
        if desc is not None:
            out_arg, out_desc = desc, True
    meta = dict(p.meta, FLATTEN=p.meta["FLATTEN"] and world == 1)
    return fn(*p.args, out_arg, out.stride(0), lo, m, rows, sync.my_recv_addr, srows, my_flags,
              sync.buf_stride, sync.counters, sync.err_dev, sync.err_host, sync.rank,
              sync.timeout_ns, R=world, RECV_DESC=recv, MAX_T=MAX_T, OUT_DESC=out_desc, **meta,
              **kw)
