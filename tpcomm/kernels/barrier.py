"""Signal-pad barrier and the synchronization primitives every GPU kernel shares.

Signal pad (int64 words, one pad per rank, written by peers, polled by its owner)::

    flags[slot][src]   slot = block * NPHASE + phase (the standalone barrier has its own slot)
                       src  = the rank that signals; the value is the epoch of the op

Contract of :func:`blockwise_barrier` (block ``b`` of op ``E`` on rank ``r``)::

    bar.sync                                   # every thread's earlier stores are done
    for p != r: flags_p[slot][r] = E           # st.release.sys (atom.exch.release.sys)
    for p != r: spin until flags_r[slot][p] >= E   (atom.add 0 .acquire.sys), bounded
    bar.sync                                   # every thread's later loads see the peers' data

- Memory ordering: a peer's stores made before its release are visible to every thread of the
  block after the barrier (release/acquire at system scope, cumulative through bar.sync).
- Safe inside CUDA graphs: the epoch ``E`` is not a kernel argument but a per-block counter in
  device memory that the kernel reads at its start and writes back (``E``) at its end, so every
  replay waits for the next epoch. Flags only grow, so nothing needs resetting, and a flag that a
  fast peer already raised for a later epoch also satisfies the wait. Every rank runs the same
  sequence of ops with the same fixed grid, so block ``b``'s counter agrees across ranks.
- Calls compared: every collective kernel checks that its peers serve the same call (op,
  dtype, total size) before it reads their data (the call check at the end of this file).
- Bounded: a wait past ``timeout_ns`` (GPU global timer) stops spinning, records one error word
  (op, phase, rank, missing peer, epoch) with a compare-and-swap into the device error word and
  copies it to a host-mapped word the host reads without synchronizing; every later wait in this
  kernel and in the kernels queued after it returns at once (they see the device error word), so
  a stalled peer costs one timeout, not one per call.
"""
from __future__ import annotations

import time

import triton
import triton.language as tl

from .launch import LeanKernel
from .sync import SyncArgs

# Under TRITON_INTERPRET=1 (tests of the protocol on a CPU) there is no inline PTX; the global
# timer comes from the host clock instead.
INTERPRET: tl.constexpr = tl.constexpr(bool(triton.knobs.runtime.interpret))
NPHASE: tl.constexpr = tl.constexpr(2)

# op codes in the error word: tpcomm.algorithms names them (OP_NAMES: how errors print them);
# the ERR_* constexprs are the same codes for the kernels' record_error / blockwise_barrier calls
from ..algorithms import (OP_ADD_RMS_NORM, OP_ALL_GATHER, OP_ALL_GATHER_MATMUL,  # noqa: E402,F401
                          OP_BARRIER, OP_MATMUL_AR, OP_MATMUL_RS, OP_NAMES, OP_ONE_SHOT_PULL,
                          OP_ONE_SHOT_PUSH, OP_REDUCE_SCATTER, OP_RING, OP_TWO_SHOT)

ERR_ONE_SHOT_PUSH: tl.constexpr = tl.constexpr(OP_ONE_SHOT_PUSH)
ERR_ONE_SHOT_PULL: tl.constexpr = tl.constexpr(OP_ONE_SHOT_PULL)
ERR_TWO_SHOT: tl.constexpr = tl.constexpr(OP_TWO_SHOT)
ERR_RING: tl.constexpr = tl.constexpr(OP_RING)
ERR_REDUCE_SCATTER: tl.constexpr = tl.constexpr(OP_REDUCE_SCATTER)
ERR_ALL_GATHER: tl.constexpr = tl.constexpr(OP_ALL_GATHER)
ERR_BARRIER: tl.constexpr = tl.constexpr(OP_BARRIER)
ERR_ADD_RMS_NORM: tl.constexpr = tl.constexpr(OP_ADD_RMS_NORM)


def _host_now_ns():  # interpreter only
    return time.monotonic_ns()


def decode_error(word: int) -> dict:
    """The fields of an error word written by :func:`record_error`."""
    return {"rank": word & 0xFF, "peer": (word >> 8) & 0xFF, "op": (word >> 16) & 0xF,
            "phase": (word >> 20) & 0xF, "epoch": (word >> 24) & 0xFFFFFFFF,
            "mismatch": (word >> 20) & 0xF == PHASE_MISMATCH}


if INTERPRET:
    @triton.jit
    def now_ns():
        """Host clock in nanoseconds (interpreter)."""
        return _host_now_ns()
else:
    @triton.jit
    def now_ns():
        """GPU global timer in nanoseconds."""
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                         is_pure=False, pack=1)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def lowest_bit(bits, N: tl.constexpr):
    """Index of the lowest set bit of ``bits`` (a scalar), or -1."""
    idx = -1
    for q in tl.static_range(N - 1, -1, -1):
        if ((bits >> q) & 1) != 0:
            idx = q
    return idx


@triton.jit
def keep_waiting(bits, t0, timeout_ns, dead, late, N: tl.constexpr):
    """The end of one round of every bounded poll: ``bits`` has a bit per source still
    missing. Returns (pending, dead, late): past ``timeout_ns`` since ``t0`` the wait stops,
    ``dead`` becomes 1 and ``late`` the lowest missing source (of N)."""
    pending = bits != 0
    if pending:
        if now_ns() - t0 > timeout_ns:
            late = lowest_bit(bits, N)
            dead = 1
            pending = False
    return pending, dead, late


@triton.jit
def is_dead(err_ptr):
    """1 if this rank already recorded an error (then no kernel waits any more), else 0."""
    return (tl.load(err_ptr, volatile=True) != 0).to(tl.int32)


@triton.jit
def record_error(err_ptr, err_host, op, phase, rank, peer, epoch):
    """Record the first error of this rank: device word by CAS, then the host-mapped copy."""
    base = epoch.to(tl.int64)
    zero = base * 0
    word = ((base & 0xFFFFFFFF) << 24) | (((zero + phase) & 0xF) << 20)
    word = word | (((zero + op) & 0xF) << 16) | (((zero + peer) & 0xFF) << 8)
    word = word | ((zero + rank) & 0xFF) | (1 << 62)
    old = tl.atomic_cas(err_ptr, word * 0, word, sem="relaxed", scope="gpu")
    if old == 0:
        if err_host != 0:
            tl.store(err_host.to(tl.pointer_type(tl.int64)), word, cache_modifier=".wt")


@triton.jit
def wait_flags(own_flags, mask, epoch, t0, timeout_ns, dead, RP: tl.constexpr):
    """Spin until every flag under ``mask`` holds at least ``epoch``; bounded.

    Returns (dead, late): ``late`` is the lowest index still missing at the timeout, else -1.
    """
    idx = tl.arange(0, RP)
    late = -1
    pending = dead == 0
    while pending:
        f = tl.atomic_add(own_flags, tl.zeros([RP], tl.int64), mask=mask, sem="acquire",
                          scope="sys")
        missing = mask & (f < epoch)
        bits = tl.reduce(missing.to(tl.int32) << idx, 0, _bit_or)
        pending, dead, late = keep_waiting(bits, t0, timeout_ns, dead, late, RP)
    return dead, late


@triton.jit
def blockwise_barrier(pad_addrs, my_pad_addr, slot, epoch, rank, err_ptr, err_host, t0,
                      timeout_ns, dead, op, phase, R: tl.constexpr, RP: tl.constexpr):
    """Signal every peer's flag ``slot`` with ``epoch``, then wait for theirs (see module doc).

    ``pad_addrs``: tuple of the R pads' addresses (as mapped on this GPU); ``my_pad_addr``: this
    rank's pad. Returns the updated ``dead`` flag.
    """
    tl.debug_barrier()
    idx = tl.arange(0, RP)
    others = (idx < R) & (idx != rank)
    addr = tl.zeros([RP], tl.int64)
    for q in tl.static_range(R):
        addr = tl.where(idx == q, pad_addrs[q], addr)
    peer_flags = (addr + (slot * RP + rank) * 8).to(tl.pointer_type(tl.int64))
    ep = tl.zeros([RP], tl.int64) + epoch
    tl.atomic_xchg(peer_flags, ep, mask=others, sem="release", scope="sys")
    own_flags = (my_pad_addr + (slot * RP + idx) * 8).to(tl.pointer_type(tl.int64))
    dead, late = wait_flags(own_flags, others, epoch, t0, timeout_ns, dead, RP)
    if late >= 0:
        record_error(err_ptr, err_host, op, phase, rank, late, epoch)
    tl.debug_barrier()
    return dead


@triton.jit(do_not_specialize=["rank"])
def _barrier_kernel(pad_addrs, my_pad_addr, counter_ptr, err_ptr, err_host, rank, timeout_ns,
                    SLOT: tl.constexpr, R: tl.constexpr, RP: tl.constexpr):
    epoch = tl.load(counter_ptr) + 1
    dead = is_dead(err_ptr)
    dead = blockwise_barrier(pad_addrs, my_pad_addr, SLOT, epoch, rank, err_ptr, err_host,
                             now_ns(), timeout_ns, dead, ERR_BARRIER, 0, R, RP)
    tl.store(counter_ptr, epoch)


@triton.jit
def _write_word_kernel(addr, value):
    tl.store(addr.to(tl.pointer_type(tl.int64)), value, cache_modifier=".wt")


def write_word(*, addr: int, value: int) -> None:
    """Store one int64 at ``addr`` from the GPU (checks that host-mapped memory is reachable)."""
    _write_word_kernel[(1,)](addr, value, num_warps=1)


def bind_barrier(*, sync: SyncArgs, slot: int, device: int | None = None,
                 verify: bool = False) -> LeanKernel:
    """All ranks meet (one block, stream-ordered, graph-safe, bounded; no tensors):
    ``.launch()``."""
    return LeanKernel(_barrier_kernel, 1, call=(),
                      fixed=dict(pad_addrs=sync.pad_addrs, my_pad_addr=sync.my_pad_addr,
                                 counter_ptr=sync.counters, err_ptr=sync.err_dev,
                                 err_host=sync.err_host, rank=sync.rank,
                                 timeout_ns=sync.timeout_ns),
                      constexprs=dict(SLOT=slot, R=sync.world, RP=sync.wp), num_warps=1,
                      device=device, verify=verify)


# ---- the call check: every rank's kernel compares the calls of its peers ---------------------
#
# Every collective kernel (push family and pull) is launched with a 48-bit call hash of the
# Communicator call it serves (:func:`call_hash`: op, dtype, total numel of the whole call, not
# of the chunk). At its start each block stores the header word
#
#     (hash << 16) | (call_epoch & 0xFFFF)
#
# into slot [call_epoch % 2][block][rank] of the header area of every peer it sends to, and,
# before it reads any peer's data, waits (bounded) until the peers' headers for its call epoch
# are there and compares their hashes with its own. ``call_epoch`` comes from a per-block
# counter that every checked kernel advances (push and pull kernels alike), so calls that ran
# different algorithms or chunk counts on different ranks still meet in the same header slots.
# A differing hash records an error word with phase PHASE_MISMATCH (the first error of the
# rank, as a timeout) and the two hashes in the next device words; the block then waits for
# nothing more, writes no output (an in-place input keeps its values), and every later kernel
# of the rank returns at once (``dead``) without writing its output either. The host raises
# MismatchError at the next call (or ``check``), after every rank reset its engine
# (``cuda/p2p_collectives.py``, recovery): a mismatched call may have stored into a peer's
# receive slots, which no later call may trust.
#
# Slot reuse: a block stores into parity p at call epoch c + 2 only after its call c + 1, which
# waited for the peers' headers of c + 1, which they stored after finishing c. So a header of a
# newer epoch than expected comes from a peer that went on without waiting: one whose kernels
# are dead (it recorded an error, e.g. found the mismatch first, and its host launched more
# calls before this rank's block looked). The check treats it as a mismatch whose other call is
# unknown (hash 0): every rank that takes part in a mismatched call records the error at that
# call, whichever of the two it saw (a differing hash or a newer header), and none waits for
# data the stopped peer never sends. A dead kernel still posts its headers (peers never wait
# for a dead rank's header) and still pushes its data and raises its flags (a peer's block
# already past its check is not left waiting); the recovery resets all of it.
# Cost: one 8-byte store per peer and block, and a load of R words: in the one-shot push
# kernels (the latency-bound decode path) inside the first data poll (``_lamport.
# poll_sum_call``: no extra round trip); in the others one wait before the first poll.
# Warps: a [WP] vector of headers is held (and loaded) by every warp of the block, and its
# tl.reduce is a warp shuffle, so a verdict drawn from it alone is per warp; in a loop that
# also runs a block-wide reduction (bar.sync) every branch must be taken by all warps alike, so
# poll_sum_call folds the header verdicts into the block-wide reduction of the data.
PHASE_MISMATCH = 15
MAX_BLOCKS: tl.constexpr = tl.constexpr(256)   # header slots per parity: the largest grid
CALL_OPS = {"all_reduce": 1, "reduce_scatter": 2, "all_gather": 3, "all_reduce_add_rms_norm": 4}
CALL_DTYPES = {"float32": 1, "float16": 2, "bfloat16": 3}
_CALL_OP_NAMES = {v: k for k, v in CALL_OPS.items()}
_CALL_DTYPE_NAMES = {v: k for k, v in CALL_DTYPES.items()}


def call_hash(op: str, dtype: str, total: int) -> int:
    """The 48-bit hash of one call: op (4 bits), dtype (4 bits), total numel folded to 40 bits
    (exact below 2**40 elements). Never below 2**44, so Triton passes it as an int64."""
    numel = (total ^ (total >> 40)) & ((1 << 40) - 1)
    return (CALL_OPS[op] << 44) | (CALL_DTYPES[dtype] << 40) | numel


def describe_call(h: int) -> str:
    """'all_reduce float32 numel=4096' from a hash (numel exact below 2**40 elements)."""
    h &= (1 << 48) - 1
    op = _CALL_OP_NAMES.get(h >> 44, f"op {h >> 44}")
    dt = _CALL_DTYPE_NAMES.get((h >> 40) & 0xF, f"dtype {(h >> 40) & 0xF}")
    return f"{op} {dt} numel={h & ((1 << 40) - 1)}"


@triton.jit
def call_begin(call_ptr, h):
    """(call_epoch, header word) of this block; the kernel stores call_epoch back at its end."""
    cep = tl.load(call_ptr + tl.program_id(0)) + 1
    return cep, (h.to(tl.int64) << 16) | (cep & 0xFFFF)


@triton.jit
def _hdr_slot(cep, src, W: tl.constexpr):
    return (((cep % 2) * MAX_BLOCKS + tl.program_id(0)) * W + src) * 8


@triton.jit
def call_post(addrs, off, cep, word, rank, skip, N: tl.constexpr, W: tl.constexpr):
    """Store the header word into slot [cep % 2][block][rank] of the header areas at
    ``addrs[q] + off`` for q < N, q != skip."""
    for q in tl.static_range(N):
        if q != skip:
            tl.store((addrs[q] + off + _hdr_slot(cep, rank, W)).to(tl.pointer_type(tl.int64)),
                     word)


@triton.jit
def pick(addrs, i, N: tl.constexpr):
    """``addrs[i]`` for a run-time ``i`` < N (a tuple takes constant indices only)."""
    a = addrs[0]
    for q in tl.static_range(1, N):
        a = tl.where(i == q, addrs[q], a)
    return a


@triton.jit
def call_check(hdr_addr, cep, word, rank, only, t0, timeout_ns, dead, err_ptr, err_host, op,
               epoch, W: tl.constexpr, WP: tl.constexpr):
    """Wait (bounded) for the headers of call epoch ``cep`` in this rank's header area at
    ``hdr_addr`` from every other rank (``only`` >= 0: from that rank alone) and compare their
    hashes with ``word``'s. Records a timeout or a mismatch; returns the updated ``dead``."""
    idx = tl.arange(0, WP)
    mask = (idx < W) & (idx != rank) & ((only < 0) | (idx == only))
    ptrs = (hdr_addr + _hdr_slot(cep, idx, W)).to(tl.pointer_type(tl.int64))
    ep = cep & 0xFFFF
    h = tl.zeros([WP], tl.int64) + word
    late = -1
    pending = dead == 0
    while pending:
        h = tl.load(ptrs, mask=mask, other=word, volatile=True)
        ahead = ((h & 0xFFFF) - ep) & 0xFFFF          # 0: this epoch; < 0x8000: newer
        bits = tl.reduce(((ahead >= 0x8000) & mask).to(tl.int32) << idx, 0, _bit_or)
        pending, dead, late = keep_waiting(bits, t0, timeout_ns, dead, late, WP)
    if late >= 0:
        record_error(err_ptr, err_host, op, 0, rank, late, epoch)
    elif dead == 0:
        ahead = ((h & 0xFFFF) - ep) & 0xFFFF
        differs = mask & (ahead == 0) & ((h >> 16) != (word >> 16))
        bad = tl.reduce(differs.to(tl.int32) << idx, 0, _bit_or)
        # a header of a newer call: the peer went on without waiting, i.e. it had stopped at
        # an error of its own (a live peer cannot be two calls ahead, see "Slot reuse")
        newer = tl.reduce((mask & (ahead != 0)).to(tl.int32) << idx, 0, _bit_or)
        if (bad | newer) != 0:
            q = lowest_bit(bad | newer, WP)
            theirs = tl.sum(tl.where(idx == q, h, 0), 0)
            theirs = tl.where(((bad >> q) & 1) != 0, theirs >> 16, 0)
            record_mismatch(err_ptr, err_host, op, rank, q, epoch, word >> 16, theirs)
            dead = 1
    return dead


@triton.jit
def record_mismatch(err_ptr, err_host, op, rank, peer, epoch, mine, theirs):
    """Record a mismatch as this rank's first error (phase PHASE_MISMATCH), the two call hashes
    in the two device words after the error word."""
    base = epoch.to(tl.int64)
    zero = base * 0
    word = ((base & 0xFFFFFFFF) << 24) | ((zero + 15) << 20)
    word = word | (((zero + op) & 0xF) << 16) | (((zero + peer) & 0xFF) << 8)
    word = word | ((zero + rank) & 0xFF) | (1 << 62)
    old = tl.atomic_cas(err_ptr, word * 0, word, sem="relaxed", scope="gpu")
    if old == 0:
        tl.store(err_ptr + 1, (zero + mine) & 0xFFFFFFFFFFFF)
        tl.store(err_ptr + 2, (zero + theirs) & 0xFFFFFFFFFFFF)
        if err_host != 0:
            tl.store(err_host.to(tl.pointer_type(tl.int64)), word, cache_modifier=".wt")
