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

# Under TRITON_INTERPRET=1 (tests of the protocol on a CPU) there is no inline PTX; the global
# timer comes from the host clock instead.
INTERPRET: tl.constexpr = tl.constexpr(bool(triton.knobs.runtime.interpret))
NPHASE: tl.constexpr = tl.constexpr(2)

# op codes in the error word
OP_ONE_SHOT_PUSH, OP_ONE_SHOT_PULL, OP_TWO_SHOT, OP_RING = 1, 2, 3, 4
OP_REDUCE_SCATTER, OP_ALL_GATHER, OP_BARRIER, OP_ADD_RMS_NORM = 5, 6, 7, 8
OP_MATMUL_RS, OP_ALL_GATHER_MATMUL, OP_MATMUL_AR = 9, 10, 11
OP_NAMES = {OP_ONE_SHOT_PUSH: ("all_reduce", "one_shot_push"),
            OP_ONE_SHOT_PULL: ("all_reduce", "one_shot_pull"),
            OP_TWO_SHOT: ("all_reduce", "two_shot"), OP_RING: ("all_reduce", "ring"),
            OP_REDUCE_SCATTER: ("reduce_scatter", "direct"),
            OP_ALL_GATHER: ("all_gather", "direct"), OP_BARRIER: ("barrier", "barrier"),
            OP_ADD_RMS_NORM: ("all_reduce_add_rms_norm", "one_shot_push_fused"),
            OP_MATMUL_RS: ("matmul_reduce_scatter", "fused"),
            OP_ALL_GATHER_MATMUL: ("all_gather_matmul", "fused"),
            OP_MATMUL_AR: ("matmul_all_reduce", "fused")}


def _host_now_ns():  # interpreter only
    return time.monotonic_ns()


def decode_error(word: int) -> dict:
    """The fields of an error word written by :func:`record_error`."""
    return {"rank": word & 0xFF, "peer": (word >> 8) & 0xFF, "op": (word >> 16) & 0xF,
            "phase": (word >> 20) & 0xF, "epoch": (word >> 24) & 0xFFFFFFFF}


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
        pending = bits != 0
        if pending:
            if now_ns() - t0 > timeout_ns:
                late = lowest_bit(bits, RP)
                dead = 1
                pending = False
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
                             now_ns(), timeout_ns, dead, 7, 0, R, RP)
    tl.store(counter_ptr, epoch)


@triton.jit
def _write_word_kernel(addr, value):
    tl.store(addr.to(tl.pointer_type(tl.int64)), value, cache_modifier=".wt")


def barrier(pad_addrs: tuple, my_pad_addr: int, counter, err_dev, err_host: int, rank: int,
            timeout_ns: int, slot: int, rp: int) -> None:
    """All ranks of the group meet (one block, stream-ordered, graph-safe, bounded)."""
    _barrier_kernel[(1,)](pad_addrs, my_pad_addr, counter, err_dev, err_host, rank, timeout_ns,
                          SLOT=slot, R=len(pad_addrs), RP=rp, num_warps=1)


def write_word(addr: int, value: int) -> None:
    """Store one int64 at ``addr`` from the GPU (checks that host-mapped memory is reachable)."""
    _write_word_kernel[(1,)](addr, value, num_warps=1)


def bind_barrier(common: dict, *, pad_addrs: tuple, my_pad_addr: int, slot: int, rp: int,
                 device=None, verify=False) -> LeanKernel:
    """The standalone barrier with everything bound: ``.launch()``."""
    return LeanKernel(_barrier_kernel, 1, call=(),
                      fixed=dict(common, pad_addrs=pad_addrs, my_pad_addr=my_pad_addr),
                      constexprs=dict(SLOT=slot, R=len(pad_addrs), RP=rp), num_warps=1,
                      device=device, verify=verify)
