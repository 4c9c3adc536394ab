"""Device helpers of the push kernels: data that carries its own arrival flag (Lamport style).

A receive slot that holds the sentinel (every bit one: a NaN pattern in fp32, bf16 and fp16) has
not arrived yet; the sender never stores the sentinel, because :func:`sanitize` maps an input
whose bits are all ones to the canonical quiet NaN of its dtype (NaN in, NaN out: a sum with a
NaN is NaN anyway). The receiver polls its slots with volatile loads until no element holds the
sentinel, uses those very values, and stores the sentinel back (:func:`clear`), so the slot is
ready for the op after next.

Receive buffers rotate over NB = 2 regions by the op's epoch (``epoch % 2``). Why two suffice:
when rank w stores into rank r's region during op E, w has finished op E-1, which needed data
that r produced during its own op E-1 (directly, or through the owner of a slice or the ring
predecessor, which in turn waited for r); so r had finished op E-2, the last op that used this
region, including the clearing. Every op with at least one element makes every rank wait on
every other rank in this way; ops with zero elements launch nothing.

All waits are bounded as in ``barrier.py``: past ``timeout_ns`` the poll stops, the error word
names the missing source rank, and later polls return at once.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .barrier import (_bit_or, _hdr_slot, call_begin, call_check, call_post, is_dead,
                      keep_waiting, lowest_bit, now_ns, record_error, record_mismatch)


@triton.jit
def prologue(counter_ptr, err_ptr, buf_stride):
    """The first lines of every kernel with per-block epochs: (pid, G, epoch, buf_off, dead,
    t0): this block's epoch (its counter + 1; the kernel stores it back at its end), the offset
    of the region of that epoch (regions alternate, ``buf_stride`` bytes apart), whether this
    rank already recorded an error, and the start of the wait bound."""
    pid = tl.program_id(0)
    epoch = tl.load(counter_ptr + pid) + 1
    return pid, tl.num_programs(0), epoch, (epoch % 2) * buf_stride, is_dead(err_ptr), now_ns()


@triton.jit
def sanitize(x, ITYPE: tl.constexpr, CANON: tl.constexpr):
    """Bits of ``x`` as ITYPE, with the sentinel (all ones) replaced by the canonical NaN."""
    b = x.to(ITYPE, bitcast=True)
    return tl.where(b == -1, tl.full(b.shape, CANON, ITYPE), b)


@triton.jit
def typed(addr, ITYPE: tl.constexpr):
    """An int64 address (16-byte aligned by construction) as an ITYPE pointer."""
    return tl.multiple_of(addr.to(tl.pointer_type(ITYPE)), 16)


@triton.jit
def push(dst_addr, offs, bits, mask, ITYPE: tl.constexpr):
    tl.store(typed(dst_addr, ITYPE) + offs, bits, mask=mask)


@triton.jit
def clear(addr, offs, mask, ITYPE: tl.constexpr):
    tl.store(typed(addr, ITYPE) + offs, tl.full(offs.shape, -1, ITYPE), mask=mask)


@triton.jit
def poll_sum(base_addr, slot_stride, offs, mask, t0, timeout_ns, dead, DTYPE: tl.constexpr,
             ITYPE: tl.constexpr, R: tl.constexpr):
    """Wait until slots 0..R-1 (``slot_stride`` elements apart) hold data at ``offs``; return
    their float32 sum in slot order 0, 1, .., R-1 (the same order on every rank), the updated
    ``dead`` flag and the lowest slot still missing at a timeout (-1 if none)."""
    base = typed(base_addr, ITYPE)
    acc = tl.zeros(offs.shape, tl.float32)
    late = -1
    pending = dead == 0
    while pending:
        acc, missing = _load_slots(base, slot_stride, offs, mask, DTYPE, R)
        bits = tl.reduce(missing, 0, _bit_or)
        pending, dead, late = keep_waiting(bits, t0, timeout_ns, dead, late, R)
    return acc, dead, late


@triton.jit
def _load_slots(base, slot_stride, offs, mask, DTYPE: tl.constexpr, R: tl.constexpr):
    """One round of a poll of slots 0..R-1 (volatile loads): their float32 sum in slot order
    and, per element, a bit per slot that still holds the sentinel."""
    acc = tl.zeros(offs.shape, tl.float32)
    missing = tl.zeros(offs.shape, tl.int32)
    for q in tl.static_range(R):
        b = tl.load(base + q * slot_stride + offs, mask=mask, other=0, volatile=True)
        missing = missing | (((b == -1) & mask).to(tl.int32) << q)
        acc += b.to(DTYPE, bitcast=True).to(tl.float32)
    return acc, missing


@triton.jit
def poll_sum_call(base_addr, slot_stride, offs, mask, t0, timeout_ns, dead, hdr_addr, cep, word,
                  rank, DTYPE: tl.constexpr, ITYPE: tl.constexpr, R: tl.constexpr,
                  WP: tl.constexpr):
    """:func:`poll_sum` and the call check (``barrier.py``) in one loop: the peers' call
    headers at ``hdr_addr`` are loaded with the data, so checking them costs no extra round
    trip. Ends when every header of call epoch ``cep`` is there and either a hash differs from
    ``word``'s (then ``bad`` is that peer and ``theirs`` its header; the data is not waited
    for: a mismatched peer may never send it), or a header is of a newer call (a peer that had
    stopped at an error: ``theirs`` 0), or all the data is there. Returns (acc, dead, late,
    bad, theirs); ``late`` as poll_sum's (a missing slot or header), ``bad`` -1 if none."""
    tl.static_assert(WP <= 16, "poll_sum_call packs per-rank bits into 16-bit fields")
    base = typed(base_addr, ITYPE)
    idx = tl.arange(0, WP)
    hmask = (idx < R) & (idx != rank)
    hptrs = (hdr_addr + _hdr_slot(cep, idx, R)).to(tl.pointer_type(tl.int64))
    ep = cep & 0xFFFF
    acc = tl.zeros(offs.shape, tl.float32)
    late = -1
    bad = -1
    theirs = word * 0
    pending = dead == 0
    while pending:
        # the headers, then the data. In this order ptxas (sm_90, Triton 3.6) issues slot 1's
        # load only after slot 0's and the header's have returned: two round trips per poll
        # round, +0.3 us per one-shot push at 2 emulated ranks on one H200 since b5ba387
        # (benchmarks/results/push-latency-h200x1-2026-12-03-s4.md). Loading the data first
        # issues every load back to back and recovers it on the GPU, but the interpreted
        # protocol sims (tests/unit/gpu_protocol_sim.py: quick, mismatch, mixed4) then failed
        # in one full-suite run (wrong fused-norm and push sums, no error recorded); not
        # understood yet, so the order stays
        h = tl.load(hptrs, mask=hmask, other=word, volatile=True)
        acc, missing = _load_slots(base, slot_stride, offs, mask, DTYPE, R)
        ahead = ((h & 0xFFFF) - ep) & 0xFFFF      # 0: this call; < 0x8000: a newer one
        # per warp (a warp shuffle); _block_verdicts makes them the block's
        hbits = tl.reduce(((ahead >= 0x8000) & hmask).to(tl.int32) << idx, 0, _bit_or)
        # dbits: a peer's hash differs; nbits: a peer's header is of a newer call (the peer had
        # stopped at an error and went on: barrier.py, "Slot reuse"); both stop the wait
        dmask = hmask & (ahead == 0) & ((h >> 16) != (word >> 16))
        nmask = hmask & (ahead != 0) & (ahead < 0x8000)
        bits, hbits, dbits, nbits = _block_verdicts(missing, hbits, dmask, nmask, idx, WP)
        if (hbits == 0) & ((dbits | nbits) != 0):
            bad = lowest_bit(dbits | nbits, WP)
            theirs = tl.sum(tl.where(idx == bad, h, 0), 0)
            theirs = tl.where(((dbits >> bad) & 1) != 0, theirs, 0)   # 0: the call is unknown
            dead = 1
            pending = False
        else:
            pending, dead, late = keep_waiting(bits, t0, timeout_ns, dead, late, WP)
    return acc, dead, late, bad, theirs


@triton.jit
def _block_verdicts(missing, hbits, dmask, nmask, idx, WP: tl.constexpr):
    """The block-wide OR of :func:`poll_sum_call`'s round: the data's ``missing`` bits and the
    per-warp header verdicts (``hbits``: a header not there yet; ``dmask`` / ``nmask``: a
    peer's hash differs / its header is of a newer call) packed as fields of one word, so one
    block-wide reduction serves all four. Returns (bits, hbits, dbits, nbits), the same in
    every warp; ``bits`` = missing | hbits (what the wait still waits for).

    The [WP] header vector is replicated in every warp, and its reduction is a warp shuffle:
    the header verdicts alone are per warp (each warp loaded the headers itself). Folded into
    the block-wide reduction, every warp takes the same branch: warps that left the loop at
    different rounds would meet the next block-wide reduction's bar.sync out of step (wrong
    sums, stalls; seen at world 4). Up to WP 8 the fields are 8 bits of an int32, whose warp
    level is one redux.sync.or.b32 (sm_80+); WP 16 needs 16-bit fields of an int64, whose
    warp level is 5 rounds of two shuffles and whose block level doubles its shuffles, in
    every round of the poll, so it serves WP 16 only. (The 0.4-0.5 us per push call that
    b5ba387 cost inside CUDA graphs was mostly the load schedule, not this word: see the
    comment on the loads in :func:`poll_sum_call`.)"""
    if WP <= 8:
        dn = tl.reduce((dmask.to(tl.int32) << idx) | (nmask.to(tl.int32) << (idx + 8)), 0,
                       _bit_or)
        fields = tl.reduce(missing | (hbits << 8) | (dn << 16), 0, _bit_or)
        hbits = (fields >> 8) & 0xFF
        dbits = (fields >> 16) & 0xFF
        nbits = (fields >> 24) & 0xFF
        bits = (fields & 0xFF) | hbits
    else:
        dn = tl.reduce((dmask.to(tl.int32) << idx) | (nmask.to(tl.int32) << (idx + 16)), 0,
                       _bit_or)
        fields = tl.reduce(missing.to(tl.int64) | (hbits.to(tl.int64) << 16)
                           | (dn.to(tl.int64) << 32), 0, _bit_or)
        hbits = ((fields >> 16) & 0xFFFF).to(tl.int32)
        dbits = ((fields >> 32) & 0xFFFF).to(tl.int32)
        nbits = ((fields >> 48) & 0xFFFF).to(tl.int32)
        bits = (fields & 0xFFFF).to(tl.int32) | hbits
    return bits, hbits, dbits, nbits


@triton.jit
def poll_one(addr, offs, mask, t0, timeout_ns, dead, ITYPE: tl.constexpr):
    """Wait until one slot holds data at ``offs``; return its bits, ``dead`` and 1 if it timed
    out (else 0)."""
    base = typed(addr, ITYPE)
    b = tl.zeros(offs.shape, ITYPE)
    late = 0
    pending = dead == 0
    while pending:
        b = tl.load(base + offs, mask=mask, other=0, volatile=True)
        n = tl.sum(((b == -1) & mask).to(tl.int32), 0)
        pending = n != 0
        if pending:
            if now_ns() - t0 > timeout_ns:
                late = 1
                dead = 1
                pending = False
    return b, dead, late


@triton.jit
def clear_slots(base_addr, slot_stride, offs, mask, ITYPE: tl.constexpr, R: tl.constexpr):
    base = typed(base_addr, ITYPE)
    for q in tl.static_range(R):
        tl.store(base + q * slot_stride + offs, tl.full(offs.shape, -1, ITYPE), mask=mask)


# ---- the steps every push kernel shares (``sync``: kernels/sync.DeviceSync) -------------------
#
#     pid, G, epoch, buf_off, dead, t0, cep, word = begin(sync, rank, call_hash, R, CALL_OFF)
#     ... push; check_calls (or receive_sum with check=0 first) before any peer's data is read
#     ... receive: receive_sum (R slots summed) / receive_copy (one slot copied) / receive_one
#     end(sync, pid, epoch, cep, CALL_OFF)


@triton.jit
def begin(sync, rank, call_hash, R: tl.constexpr, CALL_OFF: tl.constexpr):
    """:func:`prologue`, then this block's call header (``barrier.call_begin``) stored into
    every peer's header area (at its receive base + 2 x buf_stride). Returns (pid, G, epoch,
    buf_off, dead, t0, cep, word)."""
    pid, G, epoch, buf_off, dead, t0 = prologue(sync.counter_ptr, sync.err_ptr, sync.buf_stride)
    cep, word = call_begin(sync.counter_ptr + CALL_OFF, call_hash)
    call_post(sync.recv_addrs, 2 * sync.buf_stride, cep, word, rank, rank, R, R)
    return pid, G, epoch, buf_off, dead, t0, cep, word


@triton.jit
def end(sync, pid, epoch, cep, CALL_OFF: tl.constexpr):
    """This block's epoch and call epoch stored back (the next op of the family waits for
    the next ones)."""
    tl.store(sync.counter_ptr + pid, epoch)
    tl.store(sync.counter_ptr + CALL_OFF + pid, cep)


@triton.jit
def check_calls(sync, cep, word, rank, t0, dead, op, epoch, R: tl.constexpr, WP: tl.constexpr):
    """``barrier.call_check`` against every peer's header in this rank's header area; returns
    the updated ``dead``."""
    return call_check(sync.my_recv_addr + 2 * sync.buf_stride, cep, word, rank, -1, t0,
                      sync.timeout_ns, dead, sync.err_ptr, sync.err_host, op, epoch, R, WP)


@triton.jit
def receive_one(sync, src, offs, mask, t0, dead, rank, peer, epoch, op, phase,
                ITYPE: tl.constexpr):
    """Wait (bounded) until the slot at ``src`` holds data at ``offs`` (:func:`poll_one`);
    a timeout is recorded against ``peer``. Returns (bits, dead); the caller clears."""
    bits, dead, late = poll_one(src, offs, mask, t0, sync.timeout_ns, dead, ITYPE)
    if late != 0:
        record_error(sync.err_ptr, sync.err_host, op, phase, rank, peer, epoch)
    return bits, dead


@triton.jit
def receive_copy(sync, src, dst, offs, mask, t0, dead, rank, peer, epoch, op, phase, fwd,
                 ITYPE: tl.constexpr, DTYPE: tl.constexpr, FWD: tl.constexpr):
    """The receive step of a copy: :func:`receive_one`, the bits stored at the DTYPE pointer
    ``dst`` + offs, forwarded to ``fwd`` (a push into a peer's slot) where FWD, and the slot
    cleared. Returns ``dead``."""
    bits, dead = receive_one(sync, src, offs, mask, t0, dead, rank, peer, epoch, op, phase,
                             ITYPE)
    # none after an error (a mismatch, a timeout): the slot is still cleared, the bits forwarded
    tl.store(dst + offs, bits.to(DTYPE, bitcast=True), mask=mask & (dead == 0))
    if FWD:
        push(fwd, offs, bits, mask, ITYPE)
    clear(src, offs, mask, ITYPE)
    return dead


@triton.jit
def receive_sum(sync, mine, slot_stride, offs, mask, t0, dead, rank, epoch, checked, cep, word,
                op, DTYPE: tl.constexpr, ITYPE: tl.constexpr, R: tl.constexpr,
                WP: tl.constexpr):
    """The reduce-scatter receive: the float32 sum of slots 0..R-1 at ``mine`` + offs in slot
    order (:func:`poll_sum`; while ``checked`` is 0, :func:`poll_sum_call`: the peers' call
    headers checked in the same loop); a timeout or a mismatch recorded. Returns (acc, dead); the
    caller stores and then clears the slots (:func:`clear_slots`)."""
    if checked == 0:
        acc, dead, late, bad, theirs = poll_sum_call(
            mine, slot_stride, offs, mask, t0, sync.timeout_ns, dead,
            sync.my_recv_addr + 2 * sync.buf_stride, cep, word, rank, DTYPE, ITYPE, R, WP)
        if bad >= 0:
            record_mismatch(sync.err_ptr, sync.err_host, op, rank, bad, epoch, word >> 16,
                            theirs >> 16)
    else:
        acc, dead, late = poll_sum(mine, slot_stride, offs, mask, t0, sync.timeout_ns, dead,
                                   DTYPE, ITYPE, R)
    if late >= 0:
        record_error(sync.err_ptr, sync.err_host, op, 0, rank, late, epoch)
    return acc, dead
