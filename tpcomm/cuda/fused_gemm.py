"""The GPU engine's fused GEMM + collective ops: rounds, plans and streams around the kernels of
``kernels/matmul_reduce_scatter_fused.py`` and ``kernels/all_gather_matmul_fused.py``.

Each function takes the engine (:class:`tpcomm.cuda.backend.P2PCollectives`: its symmetric
buffer's addresses, layout, error words, rank, timeout) and the push family's epoch counters,
and only launches kernels on the current stream (plus, for the all-gather, a side stream that
it joins before returning): no host synchronization, so the ops run eagerly and inside CUDA
graph capture (warm each shape up once before capturing: the first call compiles).

Rounds: the receive slots of a push region hold ``slot = push_buf / world`` elements per source
rank (8 MiB / item per rank at world 1 with the default 32 MiB buffer: 1024 rows of N = 8192
in bf16), so a call runs in rounds of rows that fit:

    matmul_reduce_scatter   rows * N <= slot per owner; one GEMM kernel per round, the receive
                            inside it (1024-row rounds at N = 8192, world 1)
    all_gather_matmul       rows * K <= slot per source; per round a push kernel (side stream),
                            the GEMM kernel and a kernel that clears the received rows; at
                            world 1 nothing is pushed: one round, the GEMM alone
    matmul_all_reduce       the reduce-scatter on the first R * (M // R) rows, then the push
                            all-gather of the result; rows past that (M % R) as a plain GEMM and
                            an all-reduce

``gemm``: a ``config`` (``kernels/_gemm.GemmConfig``) and/or fields of it that replace the
tile table's choice (block_m, block_n, block_k, num_warps, num_stages, tma, ...); the grid is
always the push family's fixed grid G (its counters are per program).
"""
from __future__ import annotations

import weakref

import torch

from ..kernels import (_gemm, all_gather_matmul_fused as k_ag, barrier as k_barrier,
                       matmul_reduce_scatter_fused as k_rs)

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


def _slot(eng, item: int) -> int:
    """Elements of one source rank's receive slot in a push region."""
    return eng.layout.push_buf // eng.world // item


def matmul_reduce_scatter(eng, counters, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                          *, op: int = k_barrier.OP_MATMUL_RS, **gemm) -> None:
    """out [M/world, N] = rows ``rank`` of sum over ranks of ``a @ b``: a [M, K], b [K, N]
    (any strides), out contiguous, one dtype. Per round of ``rows`` rows of every owner's block
    (``rows * N`` fits a push slot) one kernel computes the tiles, pushes each to its owner and
    receives this rank's (``kernels/matmul_reduce_scatter_fused.py``). The round's rows of
    ``a`` are read in place (row and owner-block strides), not copied. ``op``: the op code a
    timeout records."""
    eng._begin()
    R = eng.world
    _check_operands("matmul_reduce_scatter", a, b)
    M, N = a.shape[0], b.shape[1]
    if M % R:
        raise ValueError(f"matmul_reduce_scatter: M = {M} rows do not split over {R} ranks")
    m = M // R
    _check_out("matmul_reduce_scatter", a, b, out, (m, N))
    if m == 0 or N == 0:
        return
    L = eng.layout
    slot = _slot(eng, out.element_size())
    if N > slot:
        raise ValueError(f"matmul_reduce_scatter: a row of {N} elements does not fit the push "
                         f"slot of {slot}")
    per_round = slot // N
    kw = eng._kw(out.dtype)
    with eng._dev():
        p = k_rs.plan(a, b, R * min(m, per_round), L.grid, **gemm)
        for lo in range(0, m, per_round):
            hi = min(m, lo + per_round)
            k_rs.matmul_reduce_scatter(
                p, out[lo:hi], lo, hi - lo, m, eng._push_addrs, eng._my_push, L.push_buf, slot,
                counters, eng._err_dev, eng._err_host, eng.rank, eng.timeout_ns,
                itype=kw["itype"], canon=kw["canon"], op=op)


def _side_stream(eng):
    stream = _SIDE.get(eng)
    if stream is None:
        # high priority: the push's small blocks get SMs beside the GEMM's as soon as it starts
        stream = _SIDE[eng] = torch.cuda.Stream(eng.device, priority=-1)
    return stream


def all_gather_matmul(eng, counters, a_shard: torch.Tensor, b: torch.Tensor,
                      out: torch.Tensor, **gemm) -> None:
    """out [world*m, N] = all_gather(a_shard) @ b: a_shard [m, K] (any strides; copied to
    contiguous rows where it is not), b [K, N], out contiguous, one dtype. Per round of ``rows``
    rows of every shard (``rows * K`` fits a push slot): this rank's rows are pushed to every
    peer on a side stream, while the GEMM computes the own shard's tiles and then each peer's as
    its row tiles' flags arrive (``kernels/all_gather_matmul_fused.py``). The side stream waits
    for the previous round's GEMM (its region is then free) and the caller's stream waits for
    the side stream at the end."""
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
        p = k_ag.plan(a_shard, b, m if R == 1 else R * min(m, slot_rows), L.grid, **gemm)
        per_round = m if R == 1 else min(m, slot_rows, k_ag.MAX_T * p.config.block_m)
        cuda = a_shard.is_cuda and R > 1
        if cuda:
            main, side = torch.cuda.current_stream(eng.device), _side_stream(eng)
        flags = tuple(pad + 8 * L.fused_flags_word for pad in eng._pad_addrs)
        for lo in range(0, m, per_round):
            rows = min(m, lo + per_round) - lo
            if R > 1:
                push = (lambda: k_ag.all_gather_push(
                    a_shard, lo, rows, eng._push_addrs, flags, counters, L.push_buf, slot_rows,
                    rank, block_m=p.config.block_m))
                if cuda:   # after the previous round's GEMM (and the caller's earlier work)
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        push()
                else:      # the interpreter: no streams, the push first
                    push()
            k_ag.all_gather_matmul(p, out, lo, rows, m, R, eng._my_push, slot_rows,
                                   flags[rank], L.push_buf, counters, eng._err_dev,
                                   eng._err_host, rank, eng.timeout_ns)
            if R > 1:
                kw = eng._kw(out.dtype)
                k_ag.clear_received(rows, K, R, eng._my_push, slot_rows, counters, L.push_buf,
                                    grid=kw["grid"], num_warps=kw["num_warps"],
                                    itype=kw["itype"], block=kw["block"])
        if cuda:
            main.wait_stream(side)


def matmul_all_reduce(eng, counters, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                      **gemm) -> None:
    """out [M, N] = sum over ranks of ``a @ b`` (every rank the same bits): the fused
    reduce-scatter of the first R * (M // R) rows straight into this rank's rows of ``out``,
    then the push all-gather of those rows within ``out`` (nothing to gather at world 1); the
    last M % R rows, if any, as a plain GEMM on the core and an all-reduce."""
    R, rank = eng.world, eng.rank
    _check_operands("matmul_all_reduce", a, b)
    M, N = a.shape[0], b.shape[1]
    _check_out("matmul_all_reduce", a, b, out, (M, N))
    m = M // R
    if m and N:
        mine = out[rank * m:(rank + 1) * m]
        matmul_reduce_scatter(eng, counters, a[:R * m], b, mine, op=k_barrier.OP_MATMUL_AR,
                              **gemm)
        if R > 1:
            eng.all_gather(mine.view(-1), out[:R * m].view(R, m * N))
    if R * m < M and N:
        config = gemm.pop("config", None)
        with eng._dev():
            tail = out[R * m:]
            _gemm.matmul(_gemm.plan(a[R * m:], b, config, **gemm), tail)
        eng.all_reduce(tail.view(-1), tail.view(-1), "one_shot")
