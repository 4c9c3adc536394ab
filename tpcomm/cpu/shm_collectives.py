"""Collectives over POSIX shared memory, one process per rank (the CPU backend).

Naming grammar of the algorithms, shared with the GPU kernels: ``<collective>_<algorithm>``:
``all_reduce_one_shot`` (every rank reads every peer's input and reduces all of it),
``all_reduce_two_shot`` (rank r reduces slice r of every input, then every rank gathers the
slices), ``reduce_scatter`` and ``all_gather`` (one round each).

Signal pad of each rank (int64 words; written only by its owner, read by peers)::

    word   0   pid of the owner (peers use it to notice a dead rank)
    word   8   state: 0 running, 1 closed, 2 aborted (peers waiting on it raise at once)
    word  16   arrive[0]: seq of the last op whose phase 0 this rank finished (input posted)
    word  24   arrive[1]: seq of the last op whose phase 1 this rank finished (slice reduced)
    word  64   meta[0]: seq, op, algorithm, dtype, numel of the round, total numel of the
               call, offset of the round in the call, of the last even-seq round
    word  72   meta[1]: the same for the last odd-seq round

One engine call is one round (one op, one seq) of at most :meth:`ShmCollectives.round_limit`
elements, which one slot holds: a larger Communicator call is split into rounds by the
Communicator's one chunk loop (``tpcomm.engine.run_rounds``). Every round
carries the whole call's total numel and its own offset, so ranks that called with different
sizes see different meta in the FIRST round, whatever the round size, and all raise
:class:`MismatchError` there, before anyone reads a peer's data: no rank returns a result and
no round is left half done, so the ranks stay in step and the next call is unaffected.

Flags hold sequence numbers, which only grow, so a flag never needs resetting and a phase an
algorithm skips does no harm. Each word sits on its own 64-byte line.

The data region holds two slots (double buffering by seq parity). Op ``s`` writes slot ``s % 2``;
the last op that used that slot is ``s - 2``, and every peer finished reading it before it posted
``arrive[0] = s - 1``, which this rank waited for during op ``s - 1``. So no extra round is needed
to know a slot is free again.

Two implementations of this protocol, interchangeable rank by rank: the native core
(``_shm_core.c``, built at first use by :mod:`tpcomm.cpu.native`; one C call per round does the
meta words, the copy-in, the flag, the bounded wait, the meta check, the reduction and the
copy-out) and the pure-Python path below (torch ops and memoryview words), which runs where the
core cannot be built or with ``TPCOMM_CPU_NATIVE=0``. Both write the same words in the same
order and reduce in the same order with the same rounding, so their results are bitwise equal
(the core reads this rank's own term from its input instead of its slot: the same values).

Memory ordering: a rank writes the data, then the meta words, then the arrive flag; a peer reads
the flag, then the meta and the data. x86-64 keeps stores in order and loads in order (TSO), and
each Python-level access is a separate C call the compiler cannot move, so this is sufficient
there. Other architectures would need fences: ``should_use_shm`` refuses them and the
Communicator falls back to torch.distributed.
"""
from __future__ import annotations

import ctypes
import os
import platform
import time

import torch

from ..engine import CORE_OPS, run_rounds
from ..errors import CommunicatorBrokenError, MismatchError, PeerDiedError, PeerTimeoutError
from ..memory.shm import ShmSymmetricBuffer
from . import native

W_PID, W_STATE, W_ARRIVE, W_META = 0, 8, 16, 64
STATE_RUNNING, STATE_CLOSED, STATE_ABORTED = 0, 1, 2
OPS = {"all_reduce": 1, "reduce_scatter": 2, "all_gather": 3}
ALGORITHMS = {"one_shot": 1, "two_shot": 2, "direct": 3}
DTYPES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_OP_NAMES = {v: k for k, v in OPS.items()}
_ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
_DTYPE_NAMES = {v: str(k).removeprefix("torch.") for k, v in DTYPES.items()}
# Meta words of one op: seq, op, algorithm, dtype, numel of the round, total numel of the call,
# offset of the round (compared word by word across ranks). The native core writes and compares
# the first META_WORDS words too (total and offset are the two extra values of its run()); a new
# field is one more value passed to run() and one more word here.
META_WORDS = 7

# Largest round of one op: bigger calls go in chunks of this size. A 1 MiB round fits the
# 1 MiB L2 of a core of the 2-core CI machine (AMD EPYC), so the reduction reads the slots from
# the caches rather than from DRAM: a 16 MiB float32 all-reduce on 2 ranks took 4.7 ms in 1 MiB
# rounds against 7.9 ms in one 32 MiB round (2026-11-22, one run, machine shared with other jobs).
# Re-checked on the later Intel 2-core machine (2 MiB L2), bare C, 2 ranks, min per round: 148 /
# 144 / 152 / 175 us per MiB in 256 KiB / 512 KiB / 1 MiB / 2 MiB rounds; smaller rounds would
# add a Python call and a flag round trip each for at most 5 % (2026-12-03, machine loaded).
SHM_CHUNK_BYTES = 1 << 20
SPINS_BEFORE_YIELD = 2000     # about 0.2 ms of polling before giving the core away
SECONDS_BEFORE_SLEEP = 0.01   # after 10 ms of waiting, sleep between polls instead of spinning
LIVENESS_EVERY_S = 0.2        # how often a waiting rank checks that its peers are alive
SLICE_NS = int(LIVENESS_EVERY_S * 1e9)   # the native core's longest wait before it returns


def should_use_shm() -> str | None:
    """None when the shared-memory collectives are safe on this machine, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return (f"the CPU shared-memory collectives rely on x86-64 store ordering; "
                f"this machine is {platform.machine()}")
    return None


def _process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    except OSError:
        return True  # cannot tell: assume alive, the timeout still bounds the wait


def sum_in_rank_order(srcs: list[torch.Tensor], out: torch.Tensor, acc: torch.Tensor | None) -> None:
    """out = srcs[0] + srcs[1] + ... in that order, accumulated in float32.

    The same order on every rank makes every rank's result bitwise identical. ``acc`` is a
    float32 scratch of out's size, needed only for 16-bit dtypes with more than two sources
    (with two, torch's 16-bit add already computes in float32 and rounds once). ``out`` must not
    alias any source but the first two.
    """
    if len(srcs) == 1:
        out.copy_(srcs[0])
    elif len(srcs) == 2 or out.dtype == torch.float32:
        torch.add(srcs[0], srcs[1], out=out)
        for s in srcs[2:]:
            out.add_(s)
    else:
        acc.copy_(srcs[0])
        for s in srcs[1:]:
            acc.add_(s)
        out.copy_(acc)


class ShmCollectives:
    """The CPU engine of a Communicator (:class:`tpcomm.engine.Engine`): collectives over one
    :class:`ShmSymmetricBuffer`; the three collectives only."""

    name = "shm"
    device_type = "cpu"
    p2p_check = None

    @staticmethod
    def supports(op: str) -> bool:
        return op in CORE_OPS

    def __init__(self, buf: ShmSymmetricBuffer, timeout_s: float):
        self.buf = buf
        self.rank, self.world = buf.rank, buf.world_size
        self.timeout_s = timeout_s
        self.slot_nbytes = (buf.nbytes // 2) & ~63
        # largest input in bytes one call can take (the Communicator chunks above it); an
        # attribute, not a property: the Communicator reads it on every call
        self.capacity = self.slot_nbytes
        self.seq = 0
        self.broken: str | None = None
        self._pads = [buf.pad_memoryview(p) for p in range(self.world)]
        self._mine = self._pads[self.rank]
        self._peers = [p for p in range(self.world) if p != self.rank]
        self._pids = [0] * self.world
        self._acc = torch.empty(0, dtype=torch.float32)
        self._views: dict = {}
        self._mine[W_PID] = os.getpid()
        self._mine[W_STATE] = STATE_RUNNING
        self._core, self._ctx = None, 0
        core = native.load()
        if core is not None and self.world <= core.MAX_WORLD:
            self._ctx = core.create(self.rank, self.world, META_WORDS, self.slot_nbytes,
                                    [buf.signal_pad(p).data_ptr() for p in range(self.world)],
                                    [buf.data(p).data_ptr() for p in range(self.world)])
            self._core, self._core_run = core, core.run
            # the hot call goes straight to the core: no extra Python frame per call
            self.all_reduce = self._native_all_reduce

    def round_limit(self, op: str, name: str, dtype: torch.dtype) -> int:
        """Elements of one round (:meth:`tpcomm.engine.Engine.round_limit`): what one slot
        holds of the published input (reduce_scatter: world rows, so per rank a world-th),
        a multiple of 16."""
        if name not in ALGORITHMS or op not in OPS:
            raise ValueError(f"{op} on the CPU has no algorithm {name!r}")
        rows = self.world if op == "reduce_scatter" else 1
        return (self.slot_nbytes // (dtype.itemsize * rows)) & ~15

    @property
    def native(self) -> bool:
        """True when the calls run on the native core, False on the Python path."""
        return self._core is not None

    # ---------------------------------------------------------------- synchronization
    def _post(self, phase: int, seq: int) -> None:
        self._mine[W_ARRIVE + 8 * phase] = seq

    def _wait(self, phase: int, seq: int, op: str, algorithm: str, nbytes: int) -> None:
        """Wait until every peer has posted ``phase`` of op ``seq``; bounded by the timeout."""
        word = W_ARRIVE + 8 * phase
        pads = self._pads
        for p in self._peers:
            if pads[p][word] >= seq:
                continue
            start = time.monotonic()
            next_check = start + LIVENESS_EVERY_S
            spins = 0
            while pads[p][word] < seq:
                spins += 1
                if spins < SPINS_BEFORE_YIELD:
                    continue
                now = time.monotonic()
                if now - start > SECONDS_BEFORE_SLEEP:
                    time.sleep(50e-6)
                else:
                    os.sched_yield()
                if now >= next_check:
                    next_check = now + LIVENESS_EVERY_S
                    self._check_peer(p, op, seq, algorithm, nbytes)
                if now - start > self.timeout_s:
                    late = [q for q in self._peers if pads[q][word] < seq]
                    self._fail(PeerTimeoutError(op, seq, self.rank, late, self.timeout_s,
                                                f"phase {phase}", algorithm, nbytes))
        # a peer that gave up on an op (timeout, dead rank) may still have posted this one:
        # return nothing from a Communicator that is broken anywhere
        for p in self._peers:
            if pads[p][W_STATE] == STATE_ABORTED:
                self._fail(PeerDiedError(op, seq, self.rank, [p], self.timeout_s,
                                         f"peer {p} aborted after an error", algorithm, nbytes))

    def _check_peer(self, p: int, op: str, seq: int, algorithm: str, nbytes: int) -> None:
        pad = self._pads[p]
        state = pad[W_STATE]
        if state != STATE_RUNNING:
            what = "closed its Communicator" if state == STATE_CLOSED else "aborted after an error"
            self._fail(PeerDiedError(op, seq, self.rank, [p], self.timeout_s,
                                     f"peer {p} {what}", algorithm, nbytes))
        pid = self._pids[p] or pad[W_PID]
        self._pids[p] = pid
        if pid and not _process_alive(pid):
            self._fail(PeerDiedError(op, seq, self.rank, [p], self.timeout_s,
                                     f"peer {p} (pid {pid}) exited", algorithm, nbytes))

    def _fail(self, err: Exception):
        """Mark this backend broken, tell the peers, raise."""
        self.broken = str(err)
        try:
            self._mine[W_STATE] = STATE_ABORTED
        except (ValueError, TypeError):
            pass
        raise err

    def _begin(self, op: str, algorithm: str, dtype: torch.dtype, numel: int, total: int,
               offset: int) -> int:
        if self.broken:
            raise CommunicatorBrokenError(f"tpcomm Communicator is broken by an earlier error: {self.broken}")
        self.seq += 1
        seq = self.seq
        m = W_META + 8 * (seq % 2)
        mine = self._mine
        mine[m + 1] = OPS[op]
        mine[m + 2] = ALGORITHMS[algorithm]
        mine[m + 3] = DTYPES[dtype]
        mine[m + 4] = numel
        mine[m + 5] = total
        mine[m + 6] = offset
        mine[m] = seq
        return seq

    def _check_meta(self, seq: int, op: str) -> None:
        """Every peer posted the same op, algorithm, dtype, round size, call size and round
        offset for ``seq``."""
        m = W_META + 8 * (seq % 2)
        mine = tuple(self._mine[m:m + META_WORDS])
        for p in self._peers:
            if tuple(self._pads[p][m:m + META_WORDS]) != mine:
                raise self._mismatch(seq, op, p)

    def _mismatch(self, seq: int, op: str, p: int) -> MismatchError:
        """The error for peer ``p``'s meta words of ``seq`` differing from this rank's.

        Every rank sees the mismatch at the same seq and raises; the protocol stays in step,
        so the Communicator stays usable."""
        m = W_META + 8 * (seq % 2)
        mine = tuple(self._mine[m:m + META_WORDS])
        theirs = tuple(self._pads[p][m:m + META_WORDS])

        def fmt(t):
            where = f", round at {t[6]}" if t[5] != t[4] else ""
            return (f"{_OP_NAMES.get(t[1], t[1])}/{_ALGORITHM_NAMES.get(t[2], t[2])} "
                    f"{_DTYPE_NAMES.get(t[3], t[3])} numel={t[5]}{where} (seq {t[0]})")
        return MismatchError(
            f"tpcomm {op} #{seq}: rank {self.rank} called {fmt(mine)} but rank {p} "
            f"called {fmt(theirs)}; every rank must call the same collective with the "
            f"same size and dtype")

    def _slots(self, seq: int, dtype: torch.dtype, numel: int) -> list[torch.Tensor]:
        """Every rank's slot for op ``seq`` as 1-D ``dtype`` views of ``numel`` elements.

        Cached: a torch view costs a few microseconds on a small CPU, and a decode loop asks for
        the same few sizes over and over.
        """
        key = (seq % 2, dtype, numel)
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 256:
                self._views.clear()
            off = (seq % 2) * self.slot_nbytes
            views = [self.buf.view(p, dtype, numel, off) for p in range(self.world)]
            self._views[key] = views
        return views

    def _scratch(self, numel: int) -> torch.Tensor:
        if self._acc.numel() < numel:
            self._acc = torch.empty(numel, dtype=torch.float32)
        return self._acc[:numel]

    def _publish(self, op: str, algorithm: str, src: torch.Tensor, total: int,
                 offset: int) -> tuple[int, list[torch.Tensor]]:
        """Phase 0 of every op: copy the input into this rank's slot, post, wait, check.
        ``total``: numel of the whole call (-1: this round is the call), ``offset``: where
        this round starts in it."""
        n = src.numel()
        nbytes = n * src.element_size()
        seq = self._begin(op, algorithm, src.dtype, n, n if total < 0 else total, offset)
        slots = self._slots(seq, src.dtype, n)
        if src.is_contiguous():
            ctypes.memmove(slots[self.rank].data_ptr(), src.data_ptr(), nbytes)
        else:
            slots[self.rank].view(src.shape).copy_(src)
        self._post(0, seq)
        self._wait(0, seq, op, algorithm, nbytes)
        self._check_meta(seq, op)
        return seq, slots

    # ---------------------------------------------------------------- native core
    def _native(self, op: str, algorithm: str, inp: torch.Tensor, out: torch.Tensor,
                total: int, offset: int) -> None:
        """One round on the native core (inp and out contiguous); ``total``, ``offset`` as in
        :meth:`_publish` (the core writes and compares them as meta words 5 and 6)."""
        if self.broken:
            raise CommunicatorBrokenError(f"tpcomm Communicator is broken by an earlier error: {self.broken}")
        self.seq = seq = self.seq + 1
        src = inp.data_ptr()
        n = inp.numel()
        args = (seq, src, src if out is inp else out.data_ptr(), SLICE_NS, OPS[op],
                ALGORITHMS[algorithm], DTYPES[inp.dtype], n, n if total < 0 else total, offset)
        rc = self._core.run(self._ctx, 0, *args)
        if rc:
            self._native_slow(rc, op, algorithm, inp, args)

    def _native_all_reduce(self, inp: torch.Tensor, out: torch.Tensor, algorithm: str, *,
                           total: int = -1, offset: int = 0) -> None:
        """:meth:`all_reduce` on the native core (what ``self.all_reduce`` is bound to then)."""
        if self.broken:
            raise CommunicatorBrokenError(f"tpcomm Communicator is broken by an earlier error: {self.broken}")
        self.seq = seq = self.seq + 1
        src = inp.data_ptr()
        dst = src if out is inp else out.data_ptr()
        n = inp.numel()
        # positional arguments, no tuple: a call with *args costs ~0.25 us more at 4 KiB
        rc = self._core_run(self._ctx, 0, seq, src, dst, SLICE_NS, 1, ALGORITHMS[algorithm],
                       DTYPES[inp.dtype], n, n if total < 0 else total, offset)
        if rc:
            self._native_slow(rc, "all_reduce", algorithm, inp,
                              (seq, src, dst, SLICE_NS, 1, ALGORITHMS[algorithm],
                               DTYPES[inp.dtype], n, n if total < 0 else total, offset))

    def hot_all_reduce(self, algorithm: str, dtype: torch.dtype, numel: int):
        """``go(inp, out)``: :meth:`_native_all_reduce` of a call of ``numel`` (> 0) elements of
        ``dtype`` (the caller guarantees both, as the Communicator's cache key does) with the
        core's arguments but the sequence number and the pointers bound now; None on the Python
        path or for an unknown algorithm or dtype. A call of more than one round (over
        :meth:`round_limit`) runs its rounds in one loop here, each round with the arguments
        that ``run_rounds`` and :meth:`_native_all_reduce` would give it (its pointers by
        offset, no views; the whole call's numel and the round's offset as meta words), so a
        size mismatch still raises in the first round. Per call (and round) it still checks
        ``broken`` (raises as the engine does), that the core is still open (else the call goes
        to ``all_reduce`` / ``run_rounds``, as before the cache) and resumes or raises through
        :meth:`_native_slow` like every native call."""
        if self._core is None or numel <= 0 or algorithm not in ALGORITHMS or dtype not in DTYPES:
            return None
        algo, dt, run, eng = ALGORITHMS[algorithm], DTYPES[dtype], self._core_run, self
        slow = self._native_slow
        limit = self.round_limit("all_reduce", algorithm, dtype)

        def broken():
            return CommunicatorBrokenError(
                f"tpcomm Communicator is broken by an earlier error: {eng.broken}")

        if numel <= limit:
            def go(inp, out):
                if eng.broken:
                    raise broken()
                ctx = eng._ctx
                if not ctx:          # closed: what all_reduce does then
                    return eng.all_reduce(inp, out, algorithm)
                eng.seq = seq = eng.seq + 1
                src = inp.data_ptr()
                dst = src if out is inp else out.data_ptr()
                rc = run(ctx, 0, seq, src, dst, SLICE_NS, 1, algo, dt, numel, numel, 0)
                if rc:
                    slow(rc, "all_reduce", algorithm, inp,
                         (seq, src, dst, SLICE_NS, 1, algo, dt, numel, numel, 0))
            return go
        # several rounds: (byte offset, elements, element offset) of each
        rounds = tuple((lo * dtype.itemsize, min(limit, numel - lo), lo)
                       for lo in range(0, numel, limit))

        def go_rounds(inp, out):
            if eng.broken:
                raise broken()
            if not eng._ctx:     # closed: the general loop (which raises or falls back as before)
                return run_rounds(eng, "all_reduce", inp, out, algorithm, limit, eng.world)
            src0 = inp.data_ptr()
            dst0 = src0 if out is inp else out.data_ptr()
            for off, n, lo in rounds:
                eng.seq = seq = eng.seq + 1
                rc = run(eng._ctx, 0, seq, src0 + off, dst0 + off, SLICE_NS, 1, algo, dt, n,
                         numel, lo)
                if rc:
                    slow(rc, "all_reduce", algorithm, inp,
                         (seq, src0 + off, dst0 + off, SLICE_NS, 1, algo, dt, n, numel, lo))
        return go_rounds

    def _native_slow(self, rc: int, op: str, algorithm: str, inp: torch.Tensor, args) -> None:
        """A round the core could not finish at once: a wait that ran out of its slice (check
        the peers' liveness and the timeout, then resume), a peer that stopped, a mismatch."""
        core, seq = self._core, args[0]
        nbytes = inp.numel() * inp.element_size()
        start = time.monotonic() - SLICE_NS * 1e-9   # the core has waited one slice already
        while rc:
            kind, p = rc & ~0xFF, rc & 0xFF
            if kind == core.RC_MISMATCH:
                raise self._mismatch(seq, op, p)
            if kind in (core.RC_ABORTED, core.RC_CLOSED):
                what = "closed its Communicator" if kind == core.RC_CLOSED else "aborted after an error"
                self._fail(PeerDiedError(op, seq, self.rank, [p], self.timeout_s,
                                         f"peer {p} {what}", algorithm, nbytes))
            phase = rc - core.RC_PENDING
            word = W_ARRIVE + 8 * phase
            late = [q for q in self._peers if self._pads[q][word] < seq]
            for q in late:
                self._check_peer(q, op, seq, algorithm, nbytes)
            if time.monotonic() - start > self.timeout_s:
                self._fail(PeerTimeoutError(op, seq, self.rank, late, self.timeout_s,
                                            f"phase {phase}", algorithm, nbytes))
            rc = core.run(self._ctx, 1 + phase, *args)

    # ---------------------------------------------------------------- collectives
    def all_reduce(self, inp: torch.Tensor, out: torch.Tensor, algorithm: str, *,
                   total: int = -1, offset: int = 0) -> None:
        """out = sum over ranks of inp (contiguous, same numel; out may alias inp).
        ``total``, ``offset``: the whole call's numel and this round's place in it."""
        if self._core is not None:
            self._native("all_reduce", algorithm, inp, out, total, offset)
            return
        n = inp.numel()
        seq, slots = self._publish("all_reduce", algorithm, inp, total, offset)
        wide = inp.dtype != torch.float32 and self.world > 2
        if out.dim() != 1:
            out = out.view(-1)
        if algorithm == "one_shot":
            sum_in_rank_order(slots, out, self._scratch(n) if wide else None)
            return
        # two_shot: reduce slice r into out, copy it into this rank's slot for the peers
        bounds = self._split(n)
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        sum_in_rank_order([s[lo:hi] for s in slots], out[lo:hi],
                          self._scratch(hi - lo) if wide else None)
        slots[self.rank][lo:hi].copy_(out[lo:hi])
        self._post(1, seq)
        self._wait(1, seq, "all_reduce", algorithm, n * inp.element_size())
        for p in self._peers:
            a, b = bounds[p], bounds[p + 1]
            out[a:b].copy_(slots[p][a:b])

    def reduce_scatter(self, inp: torch.Tensor, out: torch.Tensor, algorithm: str = "direct", *,
                       total: int = -1, offset: int = 0) -> None:
        """inp is [world, c] (rows may be strided), out is [c]: out = sum over ranks of inp[rank]."""
        if self._core is not None and inp.is_contiguous():
            self._native("reduce_scatter", algorithm, inp, out, total, offset)
            return
        seq, slots = self._publish("reduce_scatter", algorithm, inp, total, offset)
        c = out.numel()
        rows = [s.view(self.world, c)[self.rank] for s in slots]
        wide = inp.dtype != torch.float32 and self.world > 2
        sum_in_rank_order(rows, out, self._scratch(c) if wide else None)

    def all_gather(self, inp: torch.Tensor, out: torch.Tensor, algorithm: str = "direct", *,
                   total: int = -1, offset: int = 0) -> None:
        """inp is [c], out is [world, c] (rows may be strided): out[p] = inp of rank p."""
        if self._core is not None and out.is_contiguous():
            self._native("all_gather", algorithm, inp, out, total, offset)
            return
        seq, slots = self._publish("all_gather", algorithm, inp, total, offset)
        for p in range(self.world):
            out[p].copy_(slots[p])

    def _split(self, n: int) -> list[int]:
        """Slice bounds of the two-shot algorithm: world slices, 64-byte aligned starts."""
        per = -(-n // self.world)
        per = -(-per // 16) * 16
        return [min(n, r * per) for r in range(self.world)] + [n]

    def close(self) -> None:
        """Tell the peers this rank is gone and drop the views over the mapping."""
        if self._mine is None:
            return
        if self._ctx:
            self._core.destroy(self._ctx)
            self._core, self._ctx = None, 0
            self.__dict__.pop("all_reduce", None)
        try:
            if self._mine[W_STATE] == STATE_RUNNING:
                self._mine[W_STATE] = STATE_CLOSED
        except ValueError:
            pass
        for mv in self._pads:
            mv.release()
        self._pads, self._mine = [], None
        self._views.clear()
