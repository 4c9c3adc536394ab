"""Device helpers of the kernels: synchronization per tile (the fused GEMMs), per reduction.

Two mechanisms, as in the other push kernels (``_lamport.py``, ``barrier.py``):

- data that carries its own arrival flag (the fused GEMM + reduce-scatter): a 2-D tile of the
  R - 1 peers' receive slots is polled until no element holds the sentinel, summed with this
  rank's own contribution in slot order 0..R-1 in float32 and cleared (:func:`poll_sum_tile`,
  :func:`clear_tile`; ``_lamport.poll_sum`` and ``clear_slots`` on 1-D blocks);
- arrival flags (the fused all-gather + GEMM, whose data the GEMM reads through TMA and cannot
  inspect element by element): the sender stores its rows, then, after ``bar.sync``, stores the
  epoch into the receiver's flag word with release semantics at system scope
  (:func:`signal_flag`); the receiver spins with acquire loads until the word holds at least
  its epoch (:func:`wait_flag`), then makes the rows visible to the TMA unit
  (:func:`fence_async_proxy`: TMA reads through the async proxy, the acquire orders the generic
  proxy). Flags only grow (epochs), so nothing resets them.

Within one kernel (split-K and split-KV reductions: ``decode_attention.py``, ``skinny_gemm.py``):
the program that arrives last at a counter in GPU memory finishes the work of all
(:func:`last_to_arrive`).

Every wait is bounded as in ``barrier.py``: past ``timeout_ns`` it stops, the caller records
the error word, and later waits return at once (``dead``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._lamport import typed
from .barrier import INTERPRET, keep_waiting, now_ns


@triton.jit
def last_to_arrive(count_ptr, n):
    """The last-block pattern (CUDA's threadFenceReduction sample, CUTLASS's semaphore), for
    ``n`` programs that each stored their partial results and now meet at the int32 counter
    ``count_ptr`` (0 between launches)::

        barrier                                  # every thread's partial stores before the add
        done = atomic_add(count, 1)              # acq_rel, gpu scope, one thread
        if done == n - 1:  count = 0; True       # the last: every partial visible (acquire)
        else: False

    Returns whether this program is the last; the last one has reset the counter, which no
    program touches again in this launch, so the next launch (or graph replay) starts from 0
    with no memset. The last program should read the partials with .cg (from L2, never a line
    its SM's L1 kept from an earlier launch). No wait: nobody spins."""
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    last = done == n - 1
    if last:
        tl.store(count_ptr, 0)
    return last


@triton.jit
def poll_sum_tile(base_addr, slot_stride, own, offs, mask, t0, timeout_ns, dead, rank,
                  DTYPE: tl.constexpr, ITYPE: tl.constexpr, R: tl.constexpr):
    """Wait until slots q != rank (``slot_stride`` elements apart from ``base_addr``) hold data
    at the 2-D ``offs``; return the float32 sum over q = 0..R-1 in that order of slot q, or of
    ``own + offs`` (an ITYPE pointer: this rank's own contribution, never in a slot) for
    q = rank; ``dead``; and the lowest slot still missing at a timeout (-1 if none)."""
    base = typed(base_addr, ITYPE)
    acc = tl.zeros(offs.shape, tl.float32)
    late = -1
    pending = dead == 0
    while pending:
        acc = tl.zeros(offs.shape, tl.float32)
        bits = 0
        for q in tl.static_range(R):
            if q == rank:
                b = tl.load(own + offs, mask=mask, other=0)
            else:
                b = tl.load(base + q * slot_stride + offs, mask=mask, other=0, volatile=True)
                # one flag per slot (a reduction each), not a bit mask per element: registers
                bits = bits | (tl.max(((b == -1) & mask).to(tl.int32)) << q)
            acc += b.to(DTYPE, bitcast=True).to(tl.float32)
        pending, dead, late = keep_waiting(bits, t0, timeout_ns, dead, late, R)
    return acc, dead, late


@triton.jit
def clear_tile(base_addr, slot_stride, offs, mask, rank, ITYPE: tl.constexpr, R: tl.constexpr):
    """Store the sentinel back into slots q != rank at the 2-D ``offs``."""
    base = typed(base_addr, ITYPE)
    for q in tl.static_range(R):
        tl.store(base + q * slot_stride + offs, tl.full(offs.shape, -1, ITYPE),
                 mask=mask & (q != rank))


@triton.jit
def signal_flag(flag_addr, epoch):
    """After ``bar.sync`` (every thread's earlier stores done), store ``epoch`` into the int64
    at ``flag_addr`` with release semantics at system scope (one lane)."""
    tl.debug_barrier()
    idx = tl.arange(0, 2)
    ptrs = (flag_addr + idx * 0).to(tl.pointer_type(tl.int64))
    tl.atomic_xchg(ptrs, tl.zeros([2], tl.int64) + epoch, mask=idx == 0, sem="release",
                   scope="sys")


@triton.jit
def wait_flag(flag_addr, epoch, t0, timeout_ns, dead):
    """Spin (acquire, system scope) until the int64 at ``flag_addr`` holds at least ``epoch``;
    bounded. Returns (dead, late): ``late`` 1 if it timed out, else 0."""
    ptr = flag_addr.to(tl.pointer_type(tl.int64))
    late = 0
    pending = dead == 0
    while pending:
        f = tl.atomic_add(ptr, 0, sem="acquire", scope="sys")
        pending = f < epoch
        if pending:
            if now_ns() - t0 > timeout_ns:
                late = 1
                dead = 1
                pending = False
    tl.debug_barrier()
    return dead, late


@triton.jit
def wait_flags_below(flag_addr, n, epoch, t0, timeout_ns, dead, MAX_N: tl.constexpr):
    """Spin until the ``n`` (<= MAX_N) int64 words from ``flag_addr`` on all hold at least
    ``epoch``; bounded. Returns (dead, late) as :func:`wait_flag`."""
    idx = tl.arange(0, MAX_N)
    ptrs = (flag_addr + idx * 8).to(tl.pointer_type(tl.int64))
    late = 0
    pending = dead == 0
    while pending:
        f = tl.atomic_add(ptrs, tl.zeros([MAX_N], tl.int64), mask=idx < n, sem="acquire",
                          scope="sys")
        pending = tl.sum(((f < epoch) & (idx < n)).to(tl.int32), 0) != 0
        if pending:
            if now_ns() - t0 > timeout_ns:
                late = 1
                dead = 1
                pending = False
    return dead, late


if INTERPRET:
    @triton.jit
    def fence_async_proxy():
        """No TMA unit under the interpreter: nothing to order."""
        return 0
else:
    @triton.jit
    def fence_async_proxy():
        """``fence.proxy.async.global``: global memory this thread may read through the generic
        proxy (after an acquire) is ordered before its later TMA (async proxy) reads."""
        return tl.inline_asm_elementwise("fence.proxy.async.global; mov.u32 $0, 0;", "=r", [],
                                         dtype=tl.int32, is_pure=False, pack=1)
