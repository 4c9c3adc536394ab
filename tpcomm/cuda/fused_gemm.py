"""The GPU engine's fused GEMM + collective ops: rounds, plans and streams around the kernels of
``kernels/matmul_reduce_scatter_fused.py`` and ``kernels/all_gather_matmul_fused.py``.

Each function takes the engine (:class:`tpcomm.cuda.p2p_collectives.P2PCollectives`: its layout
and launch options) and the push family's sync bundle (``kernels/sync.SyncArgs``: receive
addresses, epoch counters, error words, rank, timeout), and only launches kernels on the
current stream (plus, for the all-gather, a side stream that it joins before returning): no
host synchronization, so the ops run eagerly and inside CUDA graph capture (warm each shape up
once before capturing: the first call compiles).

Rounds: the receive slots of a push region hold ``slot = push_buf / world`` elements per source
rank (8 MiB / item per rank at world 1 with the default 32 MiB buffer: 1024 rows of N = 8192
in bf16), so a call runs in rounds of rows that fit:

    matmul_reduce_scatter   rows * N <= slot per owner; one GEMM kernel per round, the receive
                            inside it (256-row rounds at N = 8192, world 4); at world 1 the
                            kernel stores every tile straight into ``out`` (no slot is used):
                            one launch over all rows (schedule "single", the default there,
                            the table's config for M without flattening, as the all-gather)
    all_gather_matmul       rows * K <= slot per source; per round a push kernel (side stream),
                            the GEMM kernel and a kernel that clears the received rows; at
                            world 1 nothing is pushed: one round, the GEMM alone
    matmul_all_reduce       the reduce-scatter on the first R * (M // R) rows, then the push
                            all-gather of the result; rows past that (M % R) as a plain GEMM,
                            an all-gather of the products and their sum in rank order

``gemm``: a ``config`` (``kernels/_gemm.GemmConfig``) and/or fields of it that replace the
tile table's choice (block_m, block_n, block_k, num_warps, num_stages, tma, ...); the grid is
always the push family's fixed grid G (its counters are per program). The reduce-scatter (and
the all-reduce built on it) also take ``schedule`` (``SCHEDULES``): "rounds", launches of
slot-sized rounds at every world (the only schedule beyond world 1, and the only one before
issue 14's world-1 fix: 1024-row rounds at N = 8192, 16 launches at M = 16384); "single", one
launch over all rows, world 1 only; "auto" (default), "single" at world 1, else "rounds".
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch

from ..kernels import (_gemm, all_gather_matmul_fused as k_ag, barrier as k_barrier,
                       matmul_reduce_scatter_fused as k_rs)
from ..kernels.sync import SyncArgs

# one side stream per engine (the all-gather's pushes), created on first use
_SIDE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_operands(op: str, a, b) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{op} needs a [M, K] and b [K, N], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def _check_out(op: str, a, b, out, out_shape) -> None:
    if not (a.dtype == b.dtype == out.dtype):
        raise ValueError(f"{op} needs one dtype, got {a.dtype}, {b.dtype}, {out.dtype}")
    if tuple(out.shape) != tuple(out_shape) or not out.is_contiguous():
        raise ValueError(f"{op} needs a contiguous out of shape {tuple(out_shape)}, got "
                         f"{tuple(out.shape)} with strides {out.stride()}")


def _whole_tiles(rows: int, block_m: int) -> int:
    """``rows`` rounded down to whole row tiles where at least one fits: a round of 292 rows
    (a 4 MiB slot of K = 7168 bf16 rows) would end in a tile of 36 of 128 rows per owner."""
    return rows if rows < block_m else rows // block_m * block_m


def _slot(eng, item: int) -> int:
    """Elements of one source rank's receive slot in a push region."""
    return eng.layout.push_buf // eng.world // item


SCHEDULES = ("auto", "rounds", "single")


def _schedule(eng, gemm: dict) -> str:
    """``gemm``'s ``schedule`` (popped; see the module docstring) resolved for this engine."""
    s = gemm.pop("schedule", "auto")
    if s not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {s!r}")
    if s == "auto":
        return "single" if eng.world == 1 else "rounds"
    if s == "single" and eng.world != 1:
        raise ValueError(f"schedule='single' runs at world 1 only (beyond it every round's rows "
                         f"must fit the push slot); this group has world {eng.world}")
    return s


def _launched(k, warmup: bool):
    """In warm-up mode, load the compiled kernel's module now (``k`` is Triton's
    CompiledKernel): a module load waits for the kernels already running, which, with ranks
    emulated in one process, may be a rank's kernel waiting for the very rank that loads."""
    if warmup:
        init = getattr(k, "_init_handles", None)
        if init is not None:
            init()


def matmul_reduce_scatter(eng, sync: SyncArgs, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                          *, warmup: bool = False, **gemm) -> None:
    """out [M/world, N] = rows ``rank`` of sum over ranks of ``a @ b``: a [M, K], b [K, N]
    (any strides), out contiguous, one dtype. Per round of ``rows`` rows of every owner's block
    (``rows * N`` fits a push slot) one kernel computes the tiles, pushes each to its owner and
    receives this rank's (``kernels/matmul_reduce_scatter_fused.py``). The round's rows of
    ``a`` are read in place (row and owner-block strides), not copied. ``warmup``: compile
    and load the kernels, run nothing."""
    _check_operands("matmul_reduce_scatter", a, b)
    M, N = a.shape[0], b.shape[1]
    if M % eng.world:
        raise ValueError(f"matmul_reduce_scatter: M = {M} rows do not split over {eng.world} "
                         f"ranks")
    _check_out("matmul_reduce_scatter", a, b, out, (M // eng.world, N))
    schedule = _schedule(eng, gemm)
    _reduce_scatter_rounds(eng, sync, a, b, out, 0, k_barrier.OP_MATMUL_RS, warmup, gemm,
                           schedule)


# Schedule "single" (world 1): the tiles leave through TMA stores of half tiles (the core's
# TMA-store epilogue), the table's config otherwise, its loop not flattened. Measured on one
# H200 on 2026-12-03 (scripts/gpu_fused_rs_sweep.py --interleave 9: every variant timed
# round-robin in one run with inductor's best Triton GEMM; benchmarks/results/
# fused-rs-interleaved-h200x1-2026-12-03.md), bf16, K = 7168, N = 8192, us per call against
# inductor: the core with pointer stores 737.9 / inductor 734.8 at M = 4096, with half-tile TMA
# stores 716.8 (0.976 x; 1024: 0.953 x); the fused kernel's own pointer epilogue (sanitized bits)
# 817.5 (1.113 x). At M = 16384 the 4-stage config with a whole-tile TMA store does not fit
# shared memory (262 KB of 227); group 16, 3 stages, flattened, whole tiles: 0.987 x.
SINGLE_DEFAULT = dict(flatten=False, epilogue_split=True, tma_store=True)
SINGLE_CONFIGS = {
    # M = 1024 (both ops): the loop flattened (the default's half-tile TMA stores kept).
    # scripts/gpu_fused_rs_sweep.py --grid1k --budget-s 150 on one H200, 2026-12-03 (third
    # session; benchmarks/results/fused-1k-grid-h200x1-2026-12-03.md: 15 configs x both ops,
    # 21 interleaved passes with inductor and torch.mm), graph replays / calls, us:
    # RS 171.2 / 179.3 (0.995 / 1.047 x torch.mm) against the not-flattened default's 178.6 /
    # 187.2; AG 170.6 / 176.4 (0.992 / 1.030) against 174.7 / 181.4; the best of both ops
    # there (against inductor, 183.2 in graph replays in that run: RS 0.934, AG 0.931 x;
    # inductor ran slower than on 2026-12-03's earlier runs, 175.8). The default timed twice
    # differed by 3.5 % (RS, graph): a margin about the size of the noise, consistent with
    # the other flattened 128x256 configs (RS 171.8 / 172.8 in graph replays).
    (torch.bfloat16, 1024, 8192, 7168): _gemm.GemmConfig(epilogue_split=True, tma_store=True),
    (torch.bfloat16, 16384, 8192, 7168): _gemm.GemmConfig(group_m=16, tma_store=True),
}


def _single(gemm: dict, dtype, m: int, n: int, k: int) -> dict:
    """``gemm`` for one world-1 launch over all m rows: a measured SINGLE_CONFIGS entry, else
    SINGLE_DEFAULT's fields under those given; as given where it names a config."""
    if "config" in gemm:
        return gemm
    measured = SINGLE_CONFIGS.get((dtype, _gemm.m_bucket(m), n, k))
    if measured is not None:
        return dict(gemm, config=measured)
    return {**SINGLE_DEFAULT, **gemm}


def _rs_plan(eng, a, b, gemm, schedule):
    """The GEMM plan of the fused reduce-scatter: the table's config for one launch's rows
    (all m rows with schedule "single"; else a round's R * rows, rows * N fitting a push
    slot), on the push family's grid. With "single" (world 1) a measured SINGLE_CONFIGS entry,
    else the table's config with SINGLE_DEFAULT's fields (half-tile TMA stores, the loop not
    flattened: the all-gather GEMM's loop), unless ``gemm`` names a config; fields in ``gemm``
    replace either."""
    R, m, N = eng.world, a.shape[0] // eng.world, b.shape[1]
    if schedule == "single":
        return k_rs.plan(a, b, m, eng.layout.grid, **_single(gemm, a.dtype, m, N, a.shape[1]))
    per_round = max(1, _slot(eng, a.element_size()) // max(1, N))
    return k_rs.plan(a, b, R * min(m, per_round), eng.layout.grid, **gemm)


def _ag_plan(eng, a_shard, b, gemm):
    """The GEMM plan of the fused all-gather + GEMM: the table's config for one round's rows,
    its loop not flattened (a flag wait inside); at world 1 (one round of the whole shard,
    nothing to wait for) the reduce-scatter's "single" config (``_single``)."""
    R, (m, K) = eng.world, a_shard.shape
    if R == 1:
        return k_ag.plan(a_shard, b, m, eng.layout.grid,
                         **_single(gemm, a_shard.dtype, m, b.shape[1], K))
    slot_rows = _slot(eng, a_shard.element_size()) // max(1, K)
    return k_ag.plan(a_shard, b, R * min(m, max(1, slot_rows)), eng.layout.grid, **gemm)


def gemm_config(eng, op: str, a: torch.Tensor, b: torch.Tensor, **gemm) -> _gemm.GemmConfig:
    """The tile configuration the GEMM of fused ``op`` runs for ``a`` x ``b`` (benchmarks time
    the plain core with it: the fused kernel without its communication). Beyond world 1 both
    loop over tiles without flattening (``flatten=False`` whatever the table says).
    ``schedule``: the reduce-scatter's."""
    if op == "all_gather_matmul":
        cfg = _ag_plan(eng, a, b, dict(gemm)).config
        return cfg if eng.world == 1 else dataclasses.replace(cfg, flatten=False)
    gemm = dict(gemm)
    schedule = _schedule(eng, gemm)
    rows = a.shape[0] // eng.world * eng.world
    cfg = _rs_plan(eng, a[:rows], b, gemm, schedule).config
    return cfg if eng.world == 1 else dataclasses.replace(cfg, flatten=False)


def _reduce_scatter_rounds(eng, sync: SyncArgs, a, b, out, out_row0, op, warmup, gemm,
                           schedule) -> None:
    """The rounds of the fused reduce-scatter of checked operands into rows ``out_row0 ..`` of
    the contiguous ``out`` (one round of all rows with ``schedule`` "single": world 1, where
    no slot is used); ``op``: the op code a timeout records."""
    if not warmup:
        eng._begin()
    R = eng.world
    m, N = a.shape[0] // R, b.shape[1]
    if m == 0 or N == 0:
        return
    slot = _slot(eng, out.element_size())
    if N > slot and schedule == "rounds":
        raise ValueError(f"{k_barrier.OP_NAMES[op][0]}: a row of {N} elements does not fit the "
                         f"push slot of {slot}")
    kw = eng._kw(out.dtype)
    with eng._dev():
        p = _rs_plan(eng, a, b, gemm, schedule)
        per_round = m if schedule == "single" else _whole_tiles(slot // N, p.config.block_m)
        for lo in range(0, m, per_round):
            hi = min(m, lo + per_round)
            _launched(k_rs.matmul_reduce_scatter(
                p=p, out=out, out_row=out_row0 + lo, lo=lo, rows=hi - lo, m=m, slot_stride=slot,
                sync=sync, itype=kw["itype"], canon=kw["canon"], op=op, warmup=warmup), warmup)
            if warmup:
                return   # every round runs the same binary


def _side_stream(eng):
    stream = _SIDE.get(eng)
    if stream is None:
        # high priority: the push's small blocks get SMs beside the GEMM's as soon as it starts
        stream = _SIDE[eng] = torch.cuda.Stream(eng.device, priority=-1)
    return stream


def all_gather_matmul(eng, sync: SyncArgs, a_shard: torch.Tensor, b: torch.Tensor,
                      out: torch.Tensor, *, warmup: bool = False, **gemm) -> None:
    """out [world*m, N] = all_gather(a_shard) @ b: a_shard [m, K] (any strides; copied to
    contiguous rows where it is not), b [K, N], out contiguous, one dtype. Per round of ``rows``
    rows of every shard (``rows * K`` fits a push slot): this rank's rows are pushed to every
    rank on a side stream, while the GEMM computes the own shard's tiles and then each peer's as
    its row tiles' flags arrive, and then the received rows are cleared
    (``kernels/all_gather_matmul_fused.py``). The side stream waits for the previous round's
    GEMM and clearing (its region is then free) and the caller's stream waits for the side
    stream at the end. ``warmup``: compile and load the kernels, run nothing."""
    if not warmup:
        eng._begin()
    R, rank = eng.world, eng.rank
    _check_operands("all_gather_matmul", a_shard, b)
    (m, K), N = a_shard.shape, b.shape[1]
    _check_out("all_gather_matmul", a_shard, b, out, (R * m, N))
    if m == 0 or N == 0:
        return
    L = eng.layout
    item = out.element_size()
    slot_rows = _slot(eng, item) // max(1, K)
    if R > 1 and slot_rows == 0:
        raise ValueError(f"all_gather_matmul: a row of {K} elements does not fit the push slot "
                         f"of {_slot(eng, item)}")
    if R > 1 and (a_shard.stride(1) != 1 or a_shard.stride(0) != K):
        a_shard = a_shard.contiguous()   # the push copies whole rows
    with eng._dev():
        p = _ag_plan(eng, a_shard, b, gemm)
        per_round = m if R == 1 else min(m, _whole_tiles(slot_rows, p.config.block_m),
                                         k_ag.MAX_T * p.config.block_m)
        cuda = a_shard.is_cuda and R > 1 and not warmup
        if cuda:
            main, side = torch.cuda.current_stream(eng.device), _side_stream(eng)
        flags = tuple(pad + 8 * L.fused_flags_word for pad in eng._pad_addrs)
        kw = eng._kw(out.dtype)
        for lo in range(0, m, per_round):
            rows = min(m, lo + per_round) - lo
            if R > 1:
                if cuda:   # after the previous round's GEMM and clearing (and earlier work)
                    side.wait_stream(main)
                with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                    _launched(k_ag.all_gather_push(
                        a_shard=a_shard, lo=lo, rows=rows, flag_addrs=flags, srows=slot_rows,
                        sync=sync, block_m=p.config.block_m, warmup=warmup), warmup)
            _launched(k_ag.all_gather_matmul(
                p=p, out=out, lo=lo, rows=rows, m=m, srows=slot_rows, my_flags=flags[rank],
                sync=sync, warmup=warmup), warmup)
            if R > 1:
                _launched(k_ag.clear_received(
                    rows=rows, k=K, srows=slot_rows, sync=sync, grid=kw["grid"],
                    num_warps=kw["num_warps"], itype=kw["itype"], block=kw["block"],
                    warmup=warmup), warmup)
            if warmup:
                return   # every round runs the same binaries
        if cuda:
            main.wait_stream(side)


def _all_gather(eng, inp: torch.Tensor, out: torch.Tensor, warmup: bool) -> None:
    """``eng.all_gather(inp, out)`` (inp [c], out [world, c] contiguous rows), with warm-up
    (the engine's bound all-gather kernel, compiled for each chunk)."""
    if not warmup:
        eng.all_gather(inp, out)
        return
    c = inp.numel()
    step = eng.layout.slot_max(inp.element_size())
    site = eng._slot_site("all_gather", inp.dtype)
    h = k_barrier.call_hash("all_gather", str(inp.dtype).removeprefix("torch."), c)
    for lo in range(0, c, step):   # the chunks' alignments may differ: load each binary
        i, o = inp[lo:lo + step], out[:, lo:lo + step]
        _launched(site.warmup(i, o, i.numel(), out.stride(0), h), True)


def matmul_all_reduce(eng, sync: SyncArgs, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *,
                      warmup: bool = False, **gemm) -> None:
    """out [M, N] = sum over ranks of ``a @ b`` (every rank the same bits): the fused
    reduce-scatter of the first R * (M // R) rows straight into this rank's rows of ``out``,
    then the push all-gather of those rows within ``out`` (nothing to gather at world 1); the
    last t = M % R rows, if any, as a plain GEMM on the core, an all-gather of the R [t, N]
    products and their float32 sum in rank order, rounded once (the reduction order of every
    all-reduce kernel). ``warmup``: compile and load the kernels, run nothing."""
    R, rank = eng.world, eng.rank
    _check_operands("matmul_all_reduce", a, b)
    M, N = a.shape[0], b.shape[1]
    _check_out("matmul_all_reduce", a, b, out, (M, N))
    m = M // R
    schedule = _schedule(eng, gemm)
    if m and N:
        _reduce_scatter_rounds(eng, sync, a[:R * m], b, out, rank * m,
                               k_barrier.OP_MATMUL_AR, warmup, dict(gemm), schedule)
        if R > 1:
            _all_gather(eng, out[rank * m:(rank + 1) * m].view(-1),
                        out[:R * m].view(R, m * N), warmup)
    t = M - R * m
    if t and N:
        config = gemm.pop("config", None)
        prod = torch.empty(t, N, dtype=out.dtype, device=out.device)
        gathered = torch.empty(R, t * N, dtype=out.dtype, device=out.device)
        with eng._dev():
            _launched(_gemm.matmul(_gemm.plan(a[R * m:], b, config, **gemm), prod,
                                   warmup=warmup), warmup)
        _all_gather(eng, prod.view(-1), gathered, warmup)
        if not warmup:
            acc = torch.zeros(t * N, dtype=torch.float32, device=out.device)
            for r in range(R):
                acc += gathered[r].float()
            out[R * m:].copy_(acc.view(t, N))


def warm_up(eng, sync: SyncArgs, op: str, *args, **gemm) -> None:
    """Compile and load every kernel that ``op`` ("matmul_reduce_scatter", "all_gather_matmul",
    "matmul_all_reduce") launches for these arguments, launching none (ranks emulated in one
    process: call it on every rank's engine before the first call of a shape)."""
    {"matmul_reduce_scatter": matmul_reduce_scatter, "all_gather_matmul": all_gather_matmul,
     "matmul_all_reduce": matmul_all_reduce}[op](eng, sync, *args, warmup=True, **gemm)
