"""Compute-communication overlap: a GEMM and the collective around it, split into row chunks so
that chunk i's collective runs while chunk i+1's GEMM computes.

    y  = matmul_all_reduce(a, b, comm)         # all_reduce(a @ b)        row-parallel
    ys = matmul_reduce_scatter(a, b, comm)     # reduce_scatter(a @ b)    row-parallel, SP
    y  = all_gather_matmul(a_shard, b, comm)   # all_gather(a_shard) @ b  column-parallel, SP

Shape letters: M rows of the GEMM (tokens), K the reduction dimension, N the output columns,
R the world size, m = M / R the rows of one rank's share.

Pipeline on CUDA (no host synchronization anywhere; safe to capture in a CUDA graph)::

    compute (caller's):  GEMM 0 ─ev0─ GEMM 1 ─ev1─ GEMM 2 ─ev2─ ...  wait(side) ─▶
    side (one per comm):        └▶ coll 0   └▶ coll 1    └▶ coll 2 ───┘

For ``all_gather_matmul`` the arrows point the other way: the side stream gathers chunk after
chunk, and the compute stream's GEMM of chunk i waits for gather i (the own shard's GEMM runs
first: it needs no communication).

Lifetimes: every tensor the side stream touches is allocated on the compute stream before the
fork, and the compute stream waits for the side stream before this function returns, so the
caching allocator can only hand that memory out again to work ordered after the collectives.

On the CPU there are no streams: the same chunk loop runs sequentially (what the CPU tests
check: the row arithmetic). One chunk is exactly "GEMM, then one collective".

The chunk count comes from :func:`overlap_chunks`, a pure function of the shape; ``chunks=``
forces it. ``comm`` is a :class:`tpcomm.Communicator` or anything with its interface
(``all_reduce_``, ``all_gather(x, out=)``, ``world_size``, ``rank``; ``reduce_scatter`` and
``device`` are optional, e.g. :class:`tpcomm.models.comm.TorchDistComm`).
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from .. import reference

OPS = ("all_reduce", "reduce_scatter", "all_gather")

# ---------------------------------------------------------------- chunk choice
# Starting points for H200 (to be re-measured with `tpcomm bench overlap`):
# achievable dense GEMM rate per dtype, in FLOP/s. bf16/fp16: ~700 TFLOP/s of the 989 peak on
# large shapes; float32 without TF32: ~50 TFLOP/s.
GEMM_FLOPS = {torch.bfloat16: 700e12, torch.float16: 700e12, torch.float32: 50e12}
# A chunk's GEMM must last at least this long: an eager collective costs ~15-30 us of fixed
# time (host + launch + NCCL's own latency), and a chunk shorter than that cannot hide it.
# 40 us of bf16 GEMM = 28 GFLOP = 2 * 240 rows * 7168 * 8192 (a Llama-70B down projection).
MIN_CHUNK_US = 40.0
# A chunk must hold at least one 128-row tile of a Hopper GEMM: a thinner chunk wastes the
# tile's rows (M = 128 decode batches therefore always run as one chunk).
MIN_CHUNK_ROWS = 128
# Past ~8 chunks the gain (the hidden part grows as 1 - 1/chunks) is smaller than the fixed
# cost per chunk (one more collective call and one more, thinner, GEMM).
MAX_CHUNKS = 8


def overlap_chunks(op: str, m: int, k: int, n: int, world: int, dtype=torch.bfloat16,
                   device_type: str = "cuda") -> int:
    """How many row chunks to pipeline for ``op`` on an [m, k] x [k, n] GEMM (pure function).

    ``m`` is the whole GEMM's rows in every op: a's rows for all_reduce and reduce_scatter,
    the gathered rows (R * shard rows) for all_gather. 1 means no overlap: the plain GEMM, then
    one collective (the fallback whenever overlap does not pay).
    """
    if op not in OPS:
        raise ValueError(f"overlap_chunks: op must be one of {OPS}, got {op!r}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    # no communication (world 1) or no streams to overlap on (CPU: the chunks would only add
    # calls)
    if world <= 1 or device_type != "cuda" or min(m, k, n) <= 0:
        return 1
    # the rows that are split: the whole M for all_reduce, a rank's share for the others
    rows = m if op == "all_reduce" else m // world
    # all_gather: the own shard's GEMM is not chunked, the others are
    gemm_rows = m * (world - 1) // world if op == "all_gather" else m
    gemm_us = 2.0 * gemm_rows * k * n / GEMM_FLOPS.get(dtype, GEMM_FLOPS[torch.float32]) * 1e6
    chunks = min(MAX_CHUNKS, int(gemm_us // MIN_CHUNK_US), rows // MIN_CHUNK_ROWS)
    if chunks < 2:
        return 1
    return 1 << (chunks.bit_length() - 1)   # a power of two: even, tile-aligned chunks


def chunk_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` near-equal [lo, hi) ranges covering ``rows`` (the first ones one row shorter
    when ``chunks`` does not divide ``rows``)."""
    return [(j * rows // chunks, (j + 1) * rows // chunks) for j in range(chunks)]


# ---------------------------------------------------------------- validation
def _check(op: str, a, b, comm, rows_name: str = "a") -> None:
    for name, t in ((rows_name, a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"{op}: {rows_name} {tuple(a.shape)} and b {tuple(b.shape)} do not "
                         f"multiply ({rows_name}'s K={a.shape[1]} != b's K={b.shape[0]})")
    if a.dtype != b.dtype or not a.dtype.is_floating_point:
        raise TypeError(f"{op}: {rows_name} and b must have the same floating-point dtype, got "
                        f"{a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{op}: {rows_name} is on {a.device} but b on {b.device}")
    dev = getattr(comm, "device", None)
    if dev is not None and torch.device(dev) != a.device:
        raise ValueError(f"{op}: tensors are on {a.device} but the communicator is on {dev}")


def _num_chunks(op: str, chunks, rows: int, m: int, k: int, n: int, world: int,
                a: torch.Tensor) -> int:
    if chunks is None:
        c = overlap_chunks(op, m, k, n, world, a.dtype, a.device.type)
    elif isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"{op}: chunks must be a positive int or None, got {chunks!r}")
    else:
        c = chunks
    return max(1, min(c, rows))   # never more chunks than rows (an empty chunk is a no-op)


def _overlaps(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.numel() == 0 or y.numel() == 0:
        return False
    x0, y0 = x.data_ptr(), y.data_ptr()
    return (x0 < y0 + y.numel() * y.element_size()
            and y0 < x0 + x.numel() * x.element_size())


METHODS = ("pipeline", "fused")


def _check_method(op: str, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{op}: method must be 'pipeline' or 'fused', got {method!r}")


def _fused(op: str, method: str, comm, name: str, a, b, out) -> bool:
    """``method="fused"``: the communicator's fused kernel ``name`` ran (True), or it cannot
    run here and the caller takes the pipeline (False; the communicator logs why once)."""
    _check_method(op, method)
    fn = getattr(comm, name, None)
    return method == "fused" and fn is not None and bool(fn(a, b, out))


# ---------------------------------------------------------------- communicator adapters
def _world(comm) -> int:
    return int(getattr(comm, "world_size", 1))


def _traced_op(comm) -> bool:
    """torch.compile is tracing a call with a tpcomm Communicator of several ranks: record the
    registered op (``comm.handle`` names it); a world of one is traced as plain torch code."""
    return (torch.compiler.is_dynamo_compiling() and getattr(comm, "handle", None) is not None
            and _world(comm) > 1)


def _reduce_scatter(comm, x: torch.Tensor, out: torch.Tensor) -> None:
    fn = getattr(comm, "reduce_scatter", None)
    if fn is not None:
        fn(x, out=out)
    elif _world(comm) == 1:
        out.copy_(x)
    else:   # TorchDistComm has no reduce_scatter: torch.distributed on its group
        reference.reduce_scatter(x, out, getattr(comm, "group", None))


# one side stream per (communicator, device), created on first use
_SIDE_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _side_stream(comm, device: torch.device):
    try:
        per_comm = _SIDE_STREAMS.setdefault(comm, {})
    except TypeError:   # not weak-referenceable: an uncached stream
        per_comm = {}
    stream = per_comm.get(device)
    if stream is None:
        # high priority: a collective's kernels get SMs as soon as they are free, instead of
        # queueing behind the next chunk's GEMM blocks
        stream = per_comm[device] = torch.cuda.Stream(device, priority=-1)
    return stream


class _Pipe:
    """The two streams of one call: ``fork()`` makes the side stream wait for the compute
    stream's work so far, ``join_compute()`` the compute stream for the side's (both no-ops
    on the CPU)."""

    def __init__(self, comm, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.side = _side_stream(comm, device)

    def fork(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(self.compute)
            self.side.wait_event(ev)

    def side_ctx(self):
        return torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext()

    def side_event(self):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.side)
        return ev

    def compute_wait(self, ev) -> None:
        if ev is not None:
            self.compute.wait_event(ev)

    def join(self) -> None:
        if self.cuda:
            self.compute.wait_stream(self.side)


# ---------------------------------------------------------------- ops
def matmul_all_reduce(a: torch.Tensor, b: torch.Tensor, comm, *, chunks: int | None = None,
                      out: torch.Tensor | None = None, method: str = "pipeline") -> torch.Tensor:
    """all_reduce(a @ b), the all-reduce of chunk i overlapping the GEMM of chunk i+1.

    Problem: a row-parallel linear (attention output, MLP down projection) ends in an
    all-reduce of its whole [M, N] output; in prefill that is tens of MiB that wait for the
    whole GEMM and then leave the GPU's SMs idle while they travel.

    Algorithm: split M into ``chunks`` row ranges; for each, ``out[rows] = a[rows] @ b`` on the
    compute stream, then ``comm.all_reduce_(out[rows])`` on the side stream after an event. The
    compute stream waits for the side stream at the end. One chunk = GEMM, then all-reduce.

    Routing: the chunk count is :func:`overlap_chunks` (1 on CPU, at world 1 and for small M),
    or ``chunks``; each chunk's all-reduce goes through ``comm``, which picks its algorithm
    (or falls back to torch.distributed) as for any other call. ``method="fused"`` (opt-in,
    experimental): the fused GEMM + reduce-scatter kernel, then a push all-gather
    (``cuda/fused_gemm.py``); where that cannot run (CPU, NCCL fallback, world 1) the pipeline
    runs instead, logged once. Not chosen automatically before it has been measured on several
    GPUs.

    Example::

        y = matmul_all_reduce(x_local, w_local.t(), comm)   # [M, K/R] x [K/R, N] -> [M, N]

    a: [M, K], b: [K, N], same floating dtype and device; out: optional contiguous [M, N].
    Returns out, the same on every rank.
    """
    op = "matmul_all_reduce"
    if _traced_op(comm):   # torch.compile: one registered op (tpcomm/ops/library.py)
        y = torch.ops.tpcomm.matmul_all_reduce(a, b, comm.handle, chunks)
        return y if out is None else out.copy_(y)
    _check(op, a, b, comm)
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    elif (not isinstance(out, torch.Tensor) or out.shape != (M, N) or out.dtype != a.dtype
          or out.device != a.device or not out.is_contiguous()):
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}"
               if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ValueError(f"{op}: out must be a contiguous [{M}, {N}] {a.dtype} tensor on "
                         f"{a.device}, got {got}")
    elif _overlaps(out, a) or _overlaps(out, b):
        raise ValueError(f"{op}: out must not overlap a or b")
    if _fused(op, method, comm, "matmul_all_reduce_fused", a, b, out):
        return out
    c = _num_chunks("all_reduce", chunks, M, M, K, N, _world(comm), a)
    if c == 1:
        torch.mm(a, b, out=out)
        comm.all_reduce_(out)
        return out
    pipe = _Pipe(comm, a.device)
    for lo, hi in chunk_bounds(M, c):
        torch.mm(a[lo:hi], b, out=out[lo:hi])
        pipe.fork()
        with pipe.side_ctx():
            comm.all_reduce_(out[lo:hi])
    pipe.join()
    return out


def matmul_reduce_scatter(a: torch.Tensor, b: torch.Tensor, comm, *,
                          chunks: int | None = None, method: str = "pipeline") -> torch.Tensor:
    """reduce_scatter(a @ b): rank r gets rows [r*m, (r+1)*m) of the sum over ranks of a @ b.

    Problem: a row-parallel linear with a sequence-parallel output reduce-scatters its [M, N]
    partial product; as with the all-reduce, the transfer waits for the whole GEMM.

    Algorithm: split each rank's block of m = M/R rows into ``chunks`` row ranges; chunk j
    computes sub-rows j of every block at once (``a.view(R, m, K)[:, rows_j] @ b``, one batched
    GEMM into a contiguous [R, h, N] workspace) and reduce-scatters it, which yields exactly
    ``out[rows_j]``. The reduce-scatter of chunk j runs on the side stream while chunk j+1's
    GEMM computes. One chunk = GEMM, then reduce-scatter.

    Routing: chunk count from :func:`overlap_chunks` or ``chunks``; each reduce-scatter through
    ``comm.reduce_scatter`` (torch.distributed on ``comm.group`` when ``comm`` has none).
    ``method="fused"`` (opt-in, experimental): one Triton GEMM whose epilogue stores each tile
    into the owner rank's symmetric buffer and, one tile later, sums the tiles this rank owns
    from its R slots (``kernels/matmul_reduce_scatter_fused.py``); where that cannot run (CPU,
    NCCL fallback, world 1) the pipeline runs instead, logged once. It passed with emulated
    ranks on one GPU; it is not chosen automatically before it has been measured on several
    GPUs.

    Example::

        y_shard = matmul_reduce_scatter(x_local, w_local.t(), comm)   # [M, K/R] -> [M/R, N]

    a: [M, K] with M divisible by R; b: [K, N]. Returns [M/R, N].
    """
    op = "matmul_reduce_scatter"
    if _traced_op(comm):
        return torch.ops.tpcomm.matmul_reduce_scatter(a, b, comm.handle, chunks, method)
    _check(op, a, b, comm)
    R = _world(comm)
    M, K = a.shape
    N = b.shape[1]
    if M % R:
        raise ValueError(f"{op}: a's rows M={M} (a {tuple(a.shape)}) must be divisible by the "
                         f"world size {R}")
    m = M // R
    out = torch.empty(m, N, dtype=a.dtype, device=a.device)
    if _fused(op, method, comm, "matmul_reduce_scatter_fused", a, b, out):
        return out
    c = _num_chunks("reduce_scatter", chunks, m, M, K, N, R, a)
    if c == 1:
        _reduce_scatter(comm, torch.mm(a, b), out)
        return out
    a3 = a.contiguous().view(R, m, K)
    # one workspace, chunk-major: chunk j's [R, h_j, N] block is contiguous
    work = torch.empty(R * m * N, dtype=a.dtype, device=a.device)
    pipe = _Pipe(comm, a.device)
    for lo, hi in chunk_bounds(m, c):
        h = hi - lo
        part = work[R * lo * N:R * hi * N].view(R, h, N)
        torch.bmm(a3[:, lo:hi], b.expand(R, K, N), out=part)
        pipe.fork()
        with pipe.side_ctx():
            _reduce_scatter(comm, part.view(R * h, N), out[lo:hi])
    pipe.join()
    return out


def all_gather_matmul(a_shard: torch.Tensor, b: torch.Tensor, comm, *,
                      chunks: int | None = None, return_gathered: bool = False,
                      method: str = "pipeline"):
    """all_gather(a_shard) @ b, the GEMM of chunk i overlapping the gather of chunk i+1.

    Problem: a column-parallel linear with a sequence-parallel input must gather the [R*m, K]
    activations before its GEMM; unfused, the GEMM waits for the whole gather.

    Algorithm: the own shard's rows (``out[rank*m:(rank+1)*m] = a_shard @ b``) first, which
    needs no communication, while the side stream all-gathers ``a_shard`` in ``chunks`` row
    ranges; chunk j's gather yields sub-rows j of every rank's block, and the compute stream
    multiplies the peers' ones (one GEMM per peer, straight into the output rows) after the
    gather's event. One chunk = all-gather, then the GEMM of the peers' rows.

    Routing: chunk count from :func:`overlap_chunks` (``m`` there is R * shard rows) or
    ``chunks``; each gather through ``comm.all_gather``. ``method="fused"`` (opt-in,
    experimental): one GEMM kernel whose tiles wait on per-row-tile arrival flags while a push
    kernel sends this rank's shard to every peer, own shard first
    (``kernels/all_gather_matmul_fused.py``); it does not keep the gathered rows, so with
    ``return_gathered``, and where it cannot run (CPU, NCCL fallback, world 1), the pipeline
    runs instead (logged once). Not chosen automatically before it has been measured on
    several GPUs.

    Example::

        y_local = all_gather_matmul(x_shard, w_local.t(), comm)   # [m, K] -> [R*m, N/R]

    a_shard: [m, K]; b: [K, N]. Returns [R*m, N] (rank p's shard times b in rows
    [p*m, (p+1)*m)), or (that, the gathered [R*m, K]) with ``return_gathered``.
    """
    op = "all_gather_matmul"
    if _traced_op(comm):
        out, gathered = torch.ops.tpcomm.all_gather_matmul(a_shard, b, comm.handle, chunks,
                                                           return_gathered)
        return (out, gathered) if return_gathered else out
    _check(op, a_shard, b, comm, "a_shard")
    R, rank = _world(comm), int(getattr(comm, "rank", 0))
    m, K = a_shard.shape
    N = b.shape[1]
    a_shard = a_shard.contiguous()
    out = torch.empty(R * m, N, dtype=a_shard.dtype, device=a_shard.device)
    if return_gathered and method == "fused":
        method = "pipeline"   # the fused kernel never holds the gathered rows in one tensor
    if _fused(op, method, comm, "all_gather_matmul_fused", a_shard, b, out):
        return out
    c = _num_chunks("all_gather", chunks, m, R * m, K, N, R, a_shard)
    if c == 1:
        gathered = comm.all_gather(a_shard)
        torch.mm(gathered, b, out=out)
        return (out, gathered) if return_gathered else out
    gathered = (torch.empty(R * m, K, dtype=a_shard.dtype, device=a_shard.device)
                if return_gathered else None)
    work = torch.empty(R * m * K, dtype=a_shard.dtype, device=a_shard.device)
    pipe = _Pipe(comm, a_shard.device)
    pipe.fork()            # a_shard may still be being written on the compute stream
    bounds = chunk_bounds(m, c)
    events = []
    with pipe.side_ctx():  # every gather queued back to back on the side stream
        for lo, hi in bounds:
            part = work[R * lo * K:R * hi * K].view(R * (hi - lo), K)
            comm.all_gather(a_shard[lo:hi], out=part)
            events.append(pipe.side_event())
    torch.mm(a_shard, b, out=out[rank * m:(rank + 1) * m])
    if gathered is not None:
        gathered[rank * m:(rank + 1) * m].copy_(a_shard)
    for (lo, hi), ev in zip(bounds, events):
        pipe.compute_wait(ev)
        h = hi - lo
        part = work[R * lo * K:R * hi * K].view(R, h, K)
        for p in range(R):
            if p == rank:
                continue
            torch.mm(part[p], b, out=out[p * m + lo:p * m + hi])
            if gathered is not None:
                gathered[p * m + lo:p * m + hi].copy_(part[p])
    pipe.join()
    return (out, gathered) if return_gathered else out
