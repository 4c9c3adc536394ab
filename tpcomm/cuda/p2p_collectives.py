"""The GPU backend: collectives over NVLink peer memory with tpcomm's Triton kernels.

:func:`make_cuda_backend` sets up one :class:`~tpcomm.memory.cuda_symm.TorchSymmetricBuffer`
per Communicator and returns a :class:`P2PCollectives` (name ``"p2p"``) that implements
:class:`tpcomm.engine.Engine`. Every call only launches kernels on the current stream: no host
synchronization, no allocation, so it works eagerly and inside CUDA-graph capture (warm each
size up once before capturing, as for any Triton kernel: the first call of a new size or
alignment compiles).

Layout of each rank's symmetric buffer (``Layout``)::

    signal pad (int64 words)                 data region (bytes)
    +--------------------------------+       +----------------------------------------+
    | counters[family][block]        |       | push region 0  | push region 1         |  2 x buf
    |   0 push kernels, 1 pull,      |       |  (receive slots of the push kernels,    |
    |   2 standalone barrier         |       |   sentinel-filled, rotated by epoch)    |
    | error word (device copy)       |       +----------------------------------------+
    | flags[block*2 + phase][src]    |       | staging slot 0 | staging slot 1        |  pull
    | flags[barrier slot][src]       |       +----------------------------------------+
    | fused flags[src][row tile]     |       | user region: Communicator.empty()      |
    +--------------------------------+       +----------------------------------------+

Algorithms (``all_reduce``, names of ``tpcomm.algorithms``): ``one_shot/push``,
``one_shot/pull`` (zero-copy when the input lives in the user region, else staged),
``two_shot`` (push), ``ring`` (push). ``reduce_scatter`` and ``all_gather``: ``direct`` (push).
Every call is one round of a :class:`tpcomm.algorithms.Choice` (its ``name``), at most
:meth:`P2PCollectives.round_limit` elements: the Communicator decided the mechanism and runs
the one chunk loop (``tpcomm.engine.run_rounds``). A larger call, or a plain ``one_shot``,
from a caller outside a Communicator (tests, benchmarks) goes through
``tpcomm.engine.run_call``: the same choice, the same loop.

Calls compared. Every collective kernel carries the hash of its Communicator call (op, dtype,
total numel: ``kernels/barrier.call_hash``) and compares it with its peers' in the call-header
area before it reads their data (``kernels/barrier.py``, the call check). A mismatch records
an error word like a timeout, on every rank of the call (a rank that finds a peer's header of
a later call, from a peer already stopped, records it too), and the kernel writes no output;
kernels launched after it return at once without writing theirs. The fused GEMM + collective
kernels are not checked (a call of one against another op times out instead).

Recovery. Where the host finds a mismatch in the error word (the next call, ``check``), every
rank resets its engine and the call raises :class:`MismatchError` naming both calls; the
Communicator stays usable::

    synchronize the device              this rank's kernels are done (they stopped at the error)
    meet 1 (rendezvous, timeout_s)      post the error words; every rank is past its kernels,
                                        so no peer writes into this rank's buffer any more
    reset: pad words 0, push regions,   the state at set-up (sentinels, epochs 0); the user
      headers, staging all ones, sync   region (``empty``) is left alone
    meet 2 (rendezvous, timeout_s)      every rank reset: no peer kernel can find old state
    raise MismatchError                 named from every rank's words (the first that saw both
                                        hashes, if this rank only saw a stopped peer)

The rendezvous is the group's store (``GroupStore``; ``cuda/emulated.py``'s in-process one for
emulated ranks, each rank from its own thread). A rank that does not come within ``timeout_s``
(its host makes no call and no ``check``) leaves its peers with ``CommunicatorBrokenError``.
No reset inside a CUDA-graph capture (it synchronizes): a capture that finds the word raises
MismatchError saying so, and the next call outside a capture recovers. Raising in the
mismatched call itself would need the kernel's verdict on the host, i.e. a stream
synchronization per call (the eager host path launches and returns; the verdict comes a
kernel latency later, and inside a graph there is no host at all), so the error comes from
the next call; the calls launched in between (the host runs ahead of the GPU) wrote no output
either. Graph replays are not seen by the host: ``check()`` after them.

Errors. A kernel that waits longer than ``timeout_s`` for a peer stops, and writes an error word
into a host-mapped (pinned) int64 that the host reads with a plain load: every call checks it
first, at no synchronization cost, and raises :class:`PeerTimeoutError` (op, rank, missing peer)
once the GPU has recorded one; ``check(sync=True)`` waits for the queued work first, and
``close()`` looks once more. Where host-mapped memory cannot be written from the GPU (checked at
set-up), only ``check(sync=True)`` and ``close()`` see the device copy of the word.

Streams. Calls are ordered on the current stream. A call on another stream than the previous
one first makes the new stream wait for the old one (outside graph capture), so two streams
never run this Communicator's kernels at the same time; inside a capture, use one stream per
Communicator.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import socket

import torch
import triton
import triton.language as tl

from ..engine import CORE_OPS, EXTRA_OPS, run_call
from ..errors import CommunicatorBrokenError, MismatchError, PeerTimeoutError, TpcommError
from ..groups.group import GroupInfo, GroupStore
from ..settings import get_settings
from ..kernels import (all_gather as k_all_gather, all_gather_matmul_fused as k_ag_matmul,
                       all_reduce_add_rms_norm as k_add_norm,
                       all_reduce_one_shot as k_one_shot,
                       all_reduce_ring as k_ring, all_reduce_two_shot as k_two_shot,
                       barrier as k_barrier, reduce_scatter as k_reduce_scatter)
from ..kernels.sync import SyncArgs
from . import fused_gemm

log = logging.getLogger("tpcomm")

# Largest size of the push receive areas: a two-shot round of 8 MiB keeps the push region at
# 2 x 16 MiB per rank; larger calls go in 8 MiB rounds (each a few microseconds of launch and
# pipeline fill against about 30 us of NVLink transfer).
PUSH_ROUND_BYTES = 8 << 20
# Staging slots of the pull kernel (copy-in mode).
STAGE_BYTES = 4 << 20
MAX_GRID = 256
NUM_WARPS = 8
DTYPES = {torch.bfloat16: (tl.int16, 0x7FC0), torch.float16: (tl.int16, 0x7E00),
          torch.float32: (tl.int32, 0x7FC00000)}
FAM_PUSH, FAM_PULL, FAM_BARRIER = 0, 1, 2
ALGORITHMS = ("one_shot", "one_shot/push", "one_shot/pull", "two_shot", "ring")
# the names of one_shot's mechanisms before tpcomm.algorithms qualified them (scripts, results)
_ALIASES = {"one_shot_push": "one_shot/push", "one_shot_pull": "one_shot/pull"}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_HASH_NUMEL = (1 << 40) - 1   # k_barrier.call_hash's numel field


def _round_down(x: int, m: int) -> int:
    return x // m * m


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything lives in a rank's pad and data region (see the module docstring)."""
    world: int
    grid: int                 # blocks of every push and pull kernel (fixed: counters per block)
    rs_slot: int              # bytes of one reduce-scatter / all-gather slot
    push_buf: int             # bytes of one push region (2 of them, rotated by epoch)
    stage: int                # bytes of one staging slot (2 of them)
    user: int                 # bytes of the user region (Communicator.empty)

    @classmethod
    def make(cls, world: int, max_bytes: int, grid: int) -> "Layout":
        round_bytes = max(4096, min(max_bytes, PUSH_ROUND_BYTES))
        rs_slot = max(256, _round_down(round_bytes // world, 256))
        return cls(world=world, grid=min(grid, MAX_GRID), rs_slot=rs_slot,
                   push_buf=2 * world * rs_slot, stage=min(_round_up(max_bytes, 256), STAGE_BYTES),
                   user=_round_up(max_bytes, 4096))

    @property
    def rp(self) -> int:
        return max(2, 1 << (self.world - 1).bit_length())

    # pad, in int64 words
    def counter_word(self, family: int) -> int:
        return family * MAX_GRID

    @property
    def err_word(self) -> int:
        return 3 * MAX_GRID

    @property
    def flags_word(self) -> int:
        return 4 * MAX_GRID

    @property
    def barrier_slot(self) -> int:
        return MAX_GRID * 2

    @property
    def fused_flags_word(self) -> int:
        """Arrival flags of the fused all-gather + GEMM: flags[src][row tile], world x MAX_T."""
        return self.flags_word + (self.barrier_slot + 1) * self.rp

    @property
    def call_word(self) -> int:
        """The call counters (one per block) of the call check, after the fused flags."""
        return self.fused_flags_word + self.world * k_ag_matmul.MAX_T

    def call_off(self, family: int) -> int:
        """Words from a family's counters to the call counters (a kernel constant)."""
        return self.call_word - self.counter_word(family)

    @property
    def pad_bytes(self) -> int:
        return 8 * (self.call_word + MAX_GRID)

    # data region, in bytes
    @property
    def push_off(self) -> int:
        return 0

    @property
    def hdr_off(self) -> int:
        """The call headers [parity][block][src] (int64), right after the two push regions:
        the push kernels find them at their receive base + 2 x push_buf."""
        return 2 * self.push_buf

    @property
    def stage_off(self) -> int:
        return self.hdr_off + _round_up(2 * MAX_GRID * self.world * 8, 256)

    @property
    def user_off(self) -> int:
        return self.stage_off + 2 * self.stage

    @property
    def data_bytes(self) -> int:
        return self.user_off + self.user

    # per-algorithm limits, in elements
    def one_shot_push_max(self, item: int) -> int:
        return _round_down(self.push_buf // self.world // item, 16)

    def two_shot_max(self, item: int) -> int:
        return self.world * _round_down(self.rs_slot // item, 16)

    def ring_max(self, item: int) -> int:
        return _round_down(self.push_buf // (4 + item), 16)

    def slot_max(self, item: int) -> int:   # reduce_scatter / all_gather columns
        return _round_down(self.rs_slot // item, 16)


def _split(n: int, world: int) -> int:
    """Elements per slice of the two-shot and ring kernels (a multiple of 16)."""
    return _round_up(-(-n // world), 16)


class P2PCollectives:
    """The GPU engine of a Communicator (:class:`tpcomm.engine.Engine`; see the module
    docstring): the collectives, the fused ones and ``empty``."""

    name = "p2p"
    device_type = "cuda"
    p2p_check = None   # make_cuda_backend sets the P2P check's verdict
    _OPS = frozenset(CORE_OPS + EXTRA_OPS)

    def supports(self, op: str) -> bool:
        return op in self._OPS

    def __init__(self, buf, layout: Layout, timeout_s: float, max_bytes: int, *,
                 num_warps: int = NUM_WARPS, rendezvous=None):
        """``rendezvous``: where the ranks meet to recover from a call mismatch, an object with
        ``all_gather(name, value) -> [bytes per rank]`` bounded by ``timeout_s`` (the group's
        store; ``cuda/emulated.py``'s for ranks in one process); None: a mismatch breaks the
        engine."""
        self.buf, self.layout = buf, layout
        self._rendezvous = rendezvous
        self._recoveries = 0
        self.rank, self.world = buf.rank, buf.world_size
        self.device = buf.device
        self.timeout_s = timeout_s
        self.timeout_ns = int(timeout_s * 1e9)
        self.capacity = max_bytes
        self.broken: str | None = None
        self.num_warps = num_warps
        # 16-byte vectors per thread in one tile, per kernel (tile = num_warps * 32 * vecs
        # vectors); more vectors per tile keep more bytes in flight per block
        # (algorithm, dtype) -> (limit in elements, run(inp, out, n, call_hash), hash of numel 0,
        # the round's one LeanKernel or None, whether it takes the two-shot / ring split)
        self._plans: dict = {}
        self.vecs = _Tuning(self._plans, {"one_shot/push": 1, "two_shot": 1, "ring": 1,
                                          "direct": 1})
        self.fused_norm_warps: int | None = None   # None: from the hidden size
        self._kw_cache: dict = {}
        self._closed = False
        self._is_cuda = self.device.type == "cuda"
        self._last_stream = None
        self._user_next = 0
        L = layout
        data, pads = buf.buffer_ptrs, buf.signal_pad_ptrs
        self._push_addrs = tuple(p + L.push_off for p in data)
        self._my_push = self._push_addrs[self.rank]
        self._hdr_addrs = tuple(p + L.hdr_off for p in data)
        self._stage_addrs = tuple(p + L.stage_off for p in data)
        self._my_stage = self._stage_addrs[self.rank]
        self._user_addrs = tuple(p + L.user_off for p in data)
        self._pad_addrs = tuple(pads)
        self._my_pad = pads[self.rank]
        self._flags = tuple(p + 8 * L.flags_word for p in pads)
        self._my_flags = self._flags[self.rank]
        pad = buf.signal_pad(self.rank)
        self._counters = [pad[L.counter_word(f):L.counter_word(f) + MAX_GRID] for f in range(3)]
        self._err_dev = pad[L.err_word:L.err_word + 3]   # error word, then a mismatch's hashes
        self._err_host_tensor = None
        self._err_host = 0
        self._err_word = None       # a ctypes view of the host-mapped error word (read per call)
        self._setup_error_word()
        # the lean launch path (kernels/launch.py): kernels bound once per (op, algorithm,
        # dtype, ...) with everything that does not change between calls; a call binds the
        # tensors' pointers and its sizes and launches (issue 16). What every kernel needs to
        # synchronize travels as one bundle per family, built here once (kernels/sync.py)
        self._sync = tuple(SyncArgs(
            recv_addrs=self._push_addrs, my_recv_addr=self._my_push, buf_stride=L.push_buf,
            counters=self._counters[f], call_off=L.call_off(f), err_dev=self._err_dev,
            err_host=self._err_host, rank=self.rank, timeout_ns=self.timeout_ns, wp=L.rp,
            hdr_addrs=self._hdr_addrs, pad_addrs=self._flags, my_pad_addr=self._my_flags)
            for f in range(3))
        self._verify = get_settings().debug
        self._dev_index = self.device.index if self._is_cuda else None
        self._sites: dict = {}
        self._last_raw = None       # raw handle of the last call's stream
        self._raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        # the current device: torch.cuda.current_device()'s C function (the Python wrapper
        # adds a lazy-init check, which a set-up engine has passed)
        self._get_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)

    # ---------------------------------------------------------------- errors
    def _setup_error_word(self) -> None:
        """A host-mapped int64 the kernels write their error word to (checked every call)."""
        if not self._is_cuda:
            self._err_host_tensor = torch.zeros(1, dtype=torch.int64)
            self._err_host = self._err_host_tensor.data_ptr()
            return
        try:
            t = torch.zeros(1, dtype=torch.int64, pin_memory=True)
            with torch.cuda.device(self.device):
                k_barrier.write_word(addr=t.data_ptr(), value=12345)
                torch.cuda.synchronize(self.device)
            if int(t[0]) != 12345:
                raise TpcommError(f"read back {int(t[0])}")
            t.zero_()
            self._err_host_tensor, self._err_host = t, t.data_ptr()
            self._err_word = ctypes.c_int64.from_address(self._err_host)
        except Exception as e:  # noqa: BLE001 - fall back to checks at sync points
            log.warning("tpcomm: GPU cannot write host-mapped memory (%s); peer timeouts are "
                        "reported by check(sync=True) and close() only", e)
            self._err_host_tensor, self._err_host = None, 0

    def _read_error(self, sync: bool) -> int:
        if self._err_host:
            return ctypes.c_int64.from_address(self._err_host).value
        if sync:
            return int(self._err_dev[0].item())
        return 0

    def check(self, sync: bool = False) -> None:
        """Raise PeerTimeoutError if a kernel of this rank gave up waiting for a peer.

        Costs one host load; ``sync=True`` first waits for the work queued on this device."""
        if sync and self._is_cuda:
            torch.cuda.synchronize(self.device)
        word = self._read_error(sync)
        if word:
            self._fail(word)

    def _fail(self, word: int):
        info = k_barrier.decode_error(word)
        op, algorithm = k_barrier.OP_NAMES.get(info["op"], ("collective", "?"))
        if info["mismatch"]:
            raise self._recover(info, op, algorithm)
        err = PeerTimeoutError(op, info["epoch"], self.rank, [info["peer"]], self.timeout_s,
                               f"{algorithm}, GPU-side wait in phase {info['phase']}")
        err.algorithm = algorithm
        self.broken = str(err)
        raise err

    # ---------------------------------------------------------------- recovery
    def _recover(self, info: dict, op: str, algorithm: str) -> TpcommError:
        """After a call mismatch that this rank's kernels recorded: bring every rank's engine
        back to its initial state and return the MismatchError to raise (module docstring,
        "Recovery"); where that cannot be done, the error that breaks the engine."""
        head = f"tpcomm {op} ({algorithm}, GPU call check, epoch {info['epoch']})"
        if self.broken:     # a recovery that failed is not tried again
            return CommunicatorBrokenError(f"{head}: the engine is broken: {self.broken}")
        if self._is_cuda and torch.cuda.is_current_stream_capturing():
            return MismatchError(
                f"{head}: the kernels recorded a call mismatch before or during this CUDA-graph "
                f"capture. The engine resets itself (on every rank) at the next call or "
                f"check() outside a capture: a reset synchronizes the device, which a capture "
                f"does not allow. End this capture and discard its graph")
        if self._rendezvous is None:
            err = MismatchError(f"{head}: every rank must call the same collective with the "
                                f"same size and dtype; this engine cannot reset itself (no "
                                f"rendezvous): close the Communicator and create a new one")
            self.broken = str(err)
            return err
        n = self._recoveries
        self._recoveries += 1
        try:
            if self._is_cuda:
                torch.cuda.synchronize(self.device)   # this rank's kernels are done (dead)
            mine = " ".join(str(int(v)) for v in self._err_dev[0:3].tolist())
            rows = self._rendezvous.all_gather(f"mismatch{n}/stopped", mine)
            self._reset()                             # no peer writes into this buffer now
            self._rendezvous.all_gather(f"mismatch{n}/reset", "1")
        except Exception as e:  # noqa: BLE001 - a peer that never came, a CUDA error
            err = CommunicatorBrokenError(
                f"{head}: the kernels stopped at a call mismatch (or at a peer that had "
                f"stopped at an error of its own), and the engine could not reset itself with "
                f"its peers (every rank must make a call or check() within timeout_s = "
                f"{self.timeout_s:g} s of the mismatch): {type(e).__name__}: {e}")
            self.broken = str(err)
            return err
        return MismatchError(
            f"{head}: {self._describe_calls(rows)}; every rank must call the same collective "
            f"with the same size and dtype. The kernels found it after the launch: the "
            f"mismatched call wrote no output (an in-place input keeps its values; all_gather "
            f"may have copied its input into its own row), nor did the calls this rank launched "
            f"after it before this error. Every rank's engine has been reset: the "
            f"Communicator stays usable")

    def _describe_calls(self, rows: list) -> str:
        """'rank 0 called ... but rank 1 called ...' from every rank's error words (word, my
        hash, the peer's hash; 0: the peer had already stopped, its call unknown)."""
        words = [[int(v) for v in bytes(r).decode().split()] for r in rows]
        first = [(r, w) for r, w in enumerate(words) if w[2]]
        mine = words[self.rank]
        text = f"rank {self.rank} called {k_barrier.describe_call(mine[1])}"
        peer = k_barrier.decode_error(mine[0])["peer"]
        if mine[2]:
            return f"{text} but rank {peer} called {k_barrier.describe_call(mine[2])}"
        if first:
            r, w = first[0]
            return (f"{text}; rank {r} called {k_barrier.describe_call(w[1])} but rank "
                    f"{k_barrier.decode_error(w[0])['peer']} called "
                    f"{k_barrier.describe_call(w[2])}")
        return f"{text}; its peers had stopped before their calls could be compared"

    def _reset(self) -> None:
        """This rank's pad and receive areas back to their state at set-up: counters, flags,
        error words zero; push regions, call headers and staging slots all ones (the
        sentinel). The user region (``empty``) is left alone. Only while no peer runs a
        kernel (between the recovery's two meetings)."""
        L = self.layout
        with self._dev():
            self.buf.signal_pad(self.rank)[:L.pad_bytes // 8].zero_()
            self.buf.local_data()[:L.user_off].fill_(0xFF)
            if self._is_cuda:
                torch.cuda.synchronize(self.device)
        if self._err_host_tensor is not None:
            self._err_host_tensor.zero_()

    def _begin(self) -> None:
        if self.broken:
            raise CommunicatorBrokenError(f"tpcomm Communicator is broken by an earlier error: "
                                          f"{self.broken}")
        if self._closed:
            raise TpcommError("the GPU backend is closed")
        if self._err_word is not None:
            word = self._err_word.value
            if word:
                self._fail(word)
        if self._is_cuda and self._raw_stream(self._dev_index) != self._last_raw:
            self._order_streams()

    def _begin_round(self) -> None:
        """:meth:`_begin` for a round after a call's first (``offset`` > 0): the error word is
        read at the start of a call only. A mismatch the first round recorded makes the kernels
        of the later rounds write nothing, and the next call raises it (and recovers); raising
        in the middle of a call would make this rank meet its peers for the recovery while a
        peer whose call had fewer rounds may not call again for a while (and, with emulated
        ranks driven from one thread, never: the peer's turn comes after this call)."""
        if self.broken:
            raise CommunicatorBrokenError(f"tpcomm Communicator is broken by an earlier error: "
                                          f"{self.broken}")
        if self._is_cuda and self._raw_stream(self._dev_index) != self._last_raw:
            self._order_streams()

    def _order_streams(self) -> None:
        """A call on another stream than the previous one: order it after the old stream."""
        self._last_raw = self._raw_stream(self._dev_index)
        stream = torch.cuda.current_stream(self.device)
        last = self._last_stream
        if last is not None and last != stream and not torch.cuda.is_current_stream_capturing():
            ev = torch.cuda.Event()
            ev.record(last)
            stream.wait_event(ev)
        self._last_stream = stream

    # ---------------------------------------------------------------- helpers
    def _kw(self, dtype: torch.dtype, algorithm: str = "direct") -> dict:
        """Launch options of one kernel (cached: this runs on every call's host path)."""
        key = (dtype, algorithm, self.vecs.get(algorithm, 1))
        kw = self._kw_cache.get(key)
        if kw is None:
            itype, canon = DTYPES[dtype]
            kw = dict(grid=self.layout.grid, num_warps=self.num_warps, itype=itype, canon=canon,
                      block=self.num_warps * 32 * (16 // dtype.itemsize) * key[2])
            self._kw_cache[key] = kw
        return kw

    def _user_offset(self, t: torch.Tensor) -> int | None:
        """Offset of ``t`` in this rank's user region, or None if it does not lie inside."""
        lo = self._user_addrs[self.rank]
        p = t.data_ptr()
        if lo <= p and p + t.numel() * t.element_size() <= lo + self.layout.user:
            return p - lo
        return None

    def _dev(self):
        """A guard making this backend's GPU current (a no-op when it already is)."""
        if self._is_cuda and self._get_device() != self._dev_index:
            return torch.cuda.device(self.device)
        return _NULL

    def _site(self, key: tuple, bind, family: int, **kw):
        """The kernel bound by ``bind`` for ``key`` (made once; kernels/launch.py), with the
        sync bundle of kernel ``family``."""
        site = self._sites.get(key)
        if site is None:
            site = bind(sync=self._sync[family], device=self._dev_index, verify=self._verify,
                        **kw)
            self._sites[key] = site
        return site

    def round_limit(self, op: str, name: str, dtype: torch.dtype) -> int:
        """Elements of one round of ``op`` as ``name`` (:meth:`tpcomm.engine.Engine.round_limit`):
        the push slot (one_shot/push), the staging slot (one_shot/pull: a zero-copy input,
        which needs no stage, runs in rounds of the same size, as the choice is made per call
        shape, not per address), the two-shot and ring receive areas, the reduce-scatter /
        all-gather slot (columns)."""
        item, L = dtype.itemsize, self.layout
        if op != "all_reduce":
            if op not in ("reduce_scatter", "all_gather") or name not in ("direct", "auto"):
                raise ValueError(f"{op} on the GPU has no algorithm {name!r}")
            return L.slot_max(item)
        name = _ALIASES.get(name, name)
        if name == "one_shot/push":
            return L.one_shot_push_max(item)
        if name == "one_shot/pull":
            return _round_down(L.stage // item, 16)
        if name == "two_shot":
            return L.two_shot_max(item)
        if name == "ring":
            return L.ring_max(item)
        raise ValueError(f"all_reduce on the GPU runs one of {ALGORITHMS[1:]} per round, got "
                         f"{name!r} (a plain 'one_shot' is resolved by the caller: "
                         f"tpcomm.selection.select.engine_choice)")

    # ---------------------------------------------------------------- collectives
    def all_reduce(self, inp: torch.Tensor, out: torch.Tensor, algorithm: str, *,
                   total: int = -1, offset: int = 0) -> None:
        """out = sum over ranks of inp (contiguous, same numel, any shape: the kernels take
        pointers and a numel, so no flattening view; out may alias inp): one round as
        ``algorithm`` (a Choice's name). ``total``: numel of the whole Communicator call (-1:
        this is the call), in the call hash. More than one round, or a plain ``one_shot``, from
        a caller outside a Communicator: ``tpcomm.engine.run_call``. A caller that repeats one
        shape may take :meth:`hot_all_reduce`'s call instead (the same launch, less host work)."""
        self._begin() if offset == 0 else self._begin_round()
        n = inp.numel()
        if n == 0:
            return
        plan = self._plans.get((algorithm, inp.dtype))
        if plan is None:
            plan = self._plan_all_reduce(algorithm, inp.dtype)
        limit, run, hbase = plan[:3]
        if n > limit:      # not one round: a caller outside a Communicator
            if total >= 0:
                raise ValueError(f"all_reduce as {algorithm!r}: a round of {n} elements, this "
                                 f"engine's rounds hold {limit}")
            run_call(self, "all_reduce", inp, out, algorithm, self.world)
            return
        # the call check's hash (op, dtype, numel of the whole Communicator call): per call,
        # a launch argument of every kernel, never bound (k_barrier.call_hash, inline)
        t = n if total < 0 else total
        h = hbase | ((t ^ (t >> 40)) & _HASH_NUMEL)
        if self._is_cuda and self._get_device() != self._dev_index:
            with torch.cuda.device(self.device):
                run(inp, out, n, h)
        else:
            run(inp, out, n, h)

    def hot_all_reduce(self, algorithm: str, dtype: torch.dtype, numel: int):
        """``go(inp, out)``: what ``all_reduce(inp, out, algorithm)`` does for a one-round call
        of ``numel`` (> 0) elements of ``dtype`` (the caller guarantees both, as the
        Communicator's cache key does: they are not read per call), with what depends only on
        those answered now (the plan, the call hash, the kernel's key but the pointers'
        alignment: ``LeanKernel.pinned``); None where such a call is not one round. Per call it
        still reads the broken / closed state and the error word (any of them set: ``_begin``
        raises, or recovers from a mismatch and raises, as ``all_reduce`` does), compares the
        current stream with the last call's (ordering after another stream), checks that the
        plan is still the one it was made from (a tuning change or ``close()`` drops it: the
        call then goes through ``all_reduce``) and the current device, and launches on the
        current stream (capture-safe). For a caller that caches it per (dtype, numel,
        algorithm): the Communicator's hot path."""
        if numel <= 0:
            return None
        key = (algorithm, dtype)
        plan = self._plans.get(key) or self._plan_all_reduce(algorithm, dtype)
        limit, run, hbase, site, split = plan
        if numel > limit:
            return None
        h = hbase | ((numel ^ (numel >> 40)) & _HASH_NUMEL)
        plans, all_reduce = self._plans, self.all_reduce
        if not self._is_cuda:   # the CPU interpreter's engine (tests): no device, no stream
            begin = self._begin

            def go(inp, out):
                begin()
                if plans.get(key) is not plan:
                    return all_reduce(inp, out, algorithm)
                run(inp, out, numel, h)
            return go
        pinned = None
        if site is not None:
            pinned = (site.pinned(dtype, dtype, numel, _split(numel, self.world), h) if split
                      else site.pinned(dtype, dtype, numel, h))
        if pinned is None:      # the general launch, the stream read again there
            pinned = lambda stream, i, o: run(i, o, numel, h)  # noqa: E731
        get_device, idx, device = self._get_device, self._dev_index, self.device
        stream_of, eng = self._raw_stream, self

        def go_cuda(inp, out):
            w = eng._err_word
            if eng.broken or eng._closed or (w is not None and w.value):
                eng._begin()      # raises (after a mismatch's recovery), as all_reduce's does
            raw = stream_of(idx)
            if raw != eng._last_raw:
                eng._order_streams()
            if plans.get(key) is not plan:
                return all_reduce(inp, out, algorithm)
            if get_device() != idx:
                with torch.cuda.device(device):
                    pinned(raw, inp, out)
            else:
                pinned(raw, inp, out)
        return go_cuda

    def _plan_all_reduce(self, algorithm: str, dtype: torch.dtype) -> tuple:
        """(elements of one round, run(inp, out, n, call_hash), the call hash of numel 0, the
        round's one bound kernel or None (pull: three, by where the input lives), whether that
        kernel takes the split) of ``algorithm`` for ``dtype`` (once). A plain ``one_shot`` has rounds of 0: its calls go to ``run_call``, which
        picks the mechanism as a Communicator does."""
        name = _ALIASES.get(algorithm, algorithm)
        if name not in ALGORITHMS:
            raise ValueError(f"all_reduce on the GPU has no algorithm {algorithm!r}; choose one "
                             f"of {ALGORITHMS}")
        if dtype not in DTYPES:
            raise ValueError(f"all_reduce on the GPU takes {list(DTYPES)}, got {dtype}")
        item = dtype.itemsize
        L, W = self.layout, self.world
        kw = self._kw(dtype, "one_shot/push" if name == "one_shot" else name)
        common = dict(grid=kw["grid"], num_warps=kw["num_warps"], itype=kw["itype"],
                      canon=kw["canon"], block=kw["block"], item=item)
        push, split = None, False   # the one bound kernel of a round (pull has three modes)
        if name == "one_shot":
            run = None
        elif name == "one_shot/push":
            site = self._site(("one_shot/push", dtype, kw["block"]),
                              k_one_shot.bind_all_reduce_one_shot_push, FAM_PUSH,
                              slot_stride=L.push_buf // W // item, **common)
            # through a lambda: site.launch is replaced after its first call (launch.py)
            run = lambda i, o, n, h: site.launch(i, o, n, h)  # noqa: E731
            push = site
        elif name == "one_shot/pull":   # its modes depend on where the input lives
            run = lambda i, o, n, h: self._one_shot_pull(i, o, h)  # noqa: E731
        elif name == "two_shot":
            site = self._site(("two_shot", dtype, kw["block"]),
                              k_two_shot.bind_all_reduce_two_shot, FAM_PUSH,
                              rs_slot_stride=L.rs_slot // item, ag_off=W * L.rs_slot, **common)
            run = lambda i, o, n, h: site.launch(i, o, n, _split(n, W), h)  # noqa: E731
            push, split = site, True
        else:
            site = self._site(("ring", dtype, kw["block"]), k_ring.bind_all_reduce_ring, FAM_PUSH,
                              ag_off=4 * L.ring_max(item), **common)
            run = lambda i, o, n, h: site.launch(i, o, n, _split(n, W), h)  # noqa: E731
            push, split = site, True
        hbase = k_barrier.call_hash("all_reduce", _DTYPE_NAMES[dtype], 0)
        plan = (0 if run is None else self.round_limit("all_reduce", name, dtype), run, hbase,
                push if run is not None and name != "one_shot/pull" else None, split)
        self._plans[(algorithm, dtype)] = plan
        return plan

    def _one_shot_pull(self, inp, out, h: int) -> None:
        """One round of the pull kernel (at most a staging slot): zero-copy when ``inp`` lives
        in the user region (mode 1 out of place, mode 2 in place), else staged (mode 0);
        ``h``: the call check's hash of the call."""
        off = self._user_offset(inp)
        if off is not None and out.data_ptr() != inp.data_ptr():
            self._pull_site(1, inp.dtype).launch(inp, out, inp.numel(), h, self._user_src(off))
        elif off is not None:
            self._pull_site(2, inp.dtype).launch(inp, out, inp.numel(), h, self._user_src(off))
        else:
            self._pull_site(0, inp.dtype).launch(inp, out, inp.numel(), h)

    def _user_src(self, off: int) -> tuple:
        return tuple(a + off for a in self._user_addrs)

    def _pull_site(self, mode: int, dtype: torch.dtype):
        L = self.layout
        block = self._kw(dtype)["block"]
        return self._site(
            ("one_shot/pull", mode, dtype, block), k_one_shot.bind_all_reduce_one_shot_pull,
            FAM_PULL, src_addrs=self._stage_addrs if mode == 0 else None,
            my_src_addr=self._my_stage, slot_bytes=L.stage if mode != 1 else 0,
            mode=mode, grid=L.grid, num_warps=self.num_warps, block=block)

    def fused_norm_max_hidden(self) -> int:
        """Largest hidden size :meth:`all_reduce_add_rms_norm` takes (one row per block)."""
        return k_add_norm.MAX_H

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor,
                                weight: torch.Tensor, eps: float, normed: torch.Tensor) -> None:
        """One kernel per round: x = all_reduce(x); residual += x; normed = rms_norm(residual)
        * weight (``kernels/all_reduce_add_rms_norm.py``). x, residual, normed: [..., H]
        contiguous, weight [H]; rounds of whole rows that fit a push slot."""
        self._begin()
        hidden = x.shape[-1]
        rows = x.numel() // hidden if hidden else 0
        if rows == 0:
            return
        L = self.layout
        item = x.element_size()
        slot = L.push_buf // self.world // item
        per_round = max(1, slot // hidden)
        if hidden > slot:
            raise ValueError(f"all_reduce_add_rms_norm: a row of {hidden} elements does not fit "
                             f"the push slot of {slot}")
        h = k_barrier.call_hash("all_reduce_add_rms_norm", _DTYPE_NAMES[x.dtype], x.numel())
        x2, r2, n2 = x.view(rows, hidden), residual.view(rows, hidden), normed.view(rows, hidden)
        # a whole row per block: more warps for wide rows (8192 -> 16 warps, 16 values each)
        # rows of <= 32 values: one warp (a [<= 32] vector has no block-wide reduction, so the
        # warps of a wider block would poll and clear the slots out of step)
        warps = self.fused_norm_warps or (1 if triton.next_power_of_2(hidden) <= 32 else min(
            32, max(self.num_warps, triton.next_power_of_2(hidden) // 512)))
        site = self._sites.get(("fused_norm", x.dtype, hidden, warps))
        if site is None:
            kw = self._kw(x.dtype, "one_shot/push")
            site = self._site(("fused_norm", x.dtype, hidden, warps),
                              k_add_norm.bind_all_reduce_add_rms_norm_one_shot_push, FAM_PUSH,
                              hidden=hidden, slot_stride=slot, grid=kw["grid"],
                              num_warps=warps, itype=kw["itype"], canon=kw["canon"], item=item)
        eps = float(eps)
        with self._dev():
            if rows <= per_round:
                site.launch(x2, r2, weight, n2, rows, eps, h)
                return
            for lo in range(0, rows, per_round):
                hi = min(rows, lo + per_round)
                site.launch(x2[lo:hi], r2[lo:hi], weight, n2[lo:hi], hi - lo, eps, h)

    def reduce_scatter(self, inp: torch.Tensor, out: torch.Tensor,
                       algorithm: str = "direct", *, total: int = -1, offset: int = 0) -> None:
        """inp is [world, c] (rows may be strided), out is [c]: out = sum of row ``rank``; one
        round of at most :meth:`round_limit` columns (more: ``tpcomm.engine.run_call``)."""
        self._slot_round("reduce_scatter", inp, out, algorithm, total, offset)

    def _slot_round(self, op: str, inp: torch.Tensor, out: torch.Tensor, algorithm: str,
                    total: int, offset: int) -> None:
        """One round of reduce_scatter (inp: the [world, c] rows, out: [c]) or of all_gather
        (inp: [c], out: the rows): the checks, in the order inp then out, and the launch of
        the slot kernel. ``c`` is the flat side's numel; the call hash covers the call's input
        numel (``total``, else this round's: world * c to reduce-scatter, c to all-gather)."""
        self._begin() if offset == 0 else self._begin_round()
        gather = op == "all_gather"
        c = (inp if gather else out).numel()
        if c == 0:
            return
        if algorithm not in ("direct", "auto"):
            raise ValueError(f"{op} on the GPU has no algorithm {algorithm!r}")
        inp = inp.view(-1) if gather else self._as_rows(op, inp, c)
        out = self._as_rows(op, out, c) if gather else out.view(-1)
        flat, rows = (inp, out) if gather else (out, inp)
        if c > self.layout.slot_max(flat.element_size()):
            self._more_rounds(op, inp, out, algorithm, total)
            return
        site = self._slot_site(op, flat.dtype)
        numel = c if gather else self.world * c
        h = k_barrier.call_hash(op, _DTYPE_NAMES[flat.dtype], numel if total < 0 else total)
        with self._dev():
            site.launch(inp, out, c, rows.stride(0), h)

    def _as_rows(self, op: str, t: torch.Tensor, c: int) -> torch.Tensor:
        """``t`` as [world, c]: rows that may be strided, each of contiguous elements."""
        t = t.view(self.world, c) if t.dim() != 2 else t
        if t.stride(1) != 1:
            raise ValueError(f"{op} needs rows of contiguous elements")
        return t

    def _more_rounds(self, op: str, inp, out, algorithm: str, total: int) -> None:
        """A reduce_scatter / all_gather of more than one slot: ``run_call`` (callers outside a
        Communicator); a Communicator's round never is one."""
        if total >= 0:
            raise ValueError(f"{op}: a round larger than this engine's slot")
        run_call(self, op, inp, out, algorithm, self.world)

    def _slot_site(self, op: str, dtype: torch.dtype):
        """The bound reduce-scatter or all-gather kernel of ``dtype`` (push, direct)."""
        kw = self._kw(dtype)
        key = (op, dtype, kw["block"])
        site = self._sites.get(key)
        if site is None:
            bind = (k_reduce_scatter.bind_reduce_scatter if op == "reduce_scatter"
                    else k_all_gather.bind_all_gather)
            site = self._site(key, bind, FAM_PUSH,
                              slot_stride=self.layout.rs_slot // dtype.itemsize,
                              item=dtype.itemsize, **kw)
        return site

    # ------------------------------------------------- fused GEMM + collective (fused_gemm.py)
    def matmul_reduce_scatter(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                              **gemm) -> None:
        """out [M/world, N] = rows ``rank`` of sum over ranks of ``a @ b``, the send and the
        receive fused into the GEMM (``fused_gemm.matmul_reduce_scatter``)."""
        fused_gemm.matmul_reduce_scatter(self, self._sync[FAM_PUSH], a, b, out, **gemm)

    def all_gather_matmul(self, a_shard: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                          **gemm) -> None:
        """out [world*m, N] = all_gather(a_shard) @ b, the GEMM's tiles waiting only for the
        rows they read (``fused_gemm.all_gather_matmul``)."""
        fused_gemm.all_gather_matmul(self, self._sync[FAM_PUSH], a_shard, b, out, **gemm)

    def matmul_all_reduce(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                          **gemm) -> None:
        """out [M, N] = sum over ranks of ``a @ b``: the fused reduce-scatter, then a push
        all-gather (``fused_gemm.matmul_all_reduce``)."""
        fused_gemm.matmul_all_reduce(self, self._sync[FAM_PUSH], a, b, out, **gemm)

    def warm_up_fused(self, op: str, *args, **gemm) -> None:
        """Compile and load the kernels of fused ``op`` for these arguments without running
        them (``fused_gemm.warm_up``: ranks emulated in one process need it)."""
        fused_gemm.warm_up(self, self._sync[FAM_PUSH], op, *args, **gemm)

    def all_gather(self, inp: torch.Tensor, out: torch.Tensor,
                   algorithm: str = "direct", *, total: int = -1, offset: int = 0) -> None:
        """inp is [c], out is [world, c] (rows may be strided): out[p] = inp of rank p; one
        round of at most :meth:`round_limit` elements (more: ``tpcomm.engine.run_call``)."""
        self._slot_round("all_gather", inp, out, algorithm, total, offset)

    def barrier(self) -> None:
        """All ranks meet on the GPU (stream-ordered, graph-safe, bounded by the timeout)."""
        self._begin()
        site = self._sites.get(("barrier",))
        if site is None:
            site = self._site(("barrier",), k_barrier.bind_barrier, FAM_BARRIER,
                              slot=self.layout.barrier_slot)
        with self._dev():
            site.launch()

    # ---------------------------------------------------------------- zero-copy
    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A tensor in this rank's user region of the symmetric buffer.

        Collective by convention: every rank must ask for the same shapes in the same order, so
        that a tensor sits at the same offset on every rank (the pull kernel reads the peers'
        copies there). Allocations live until ``close()``; the region holds max_bytes."""
        if self._closed:
            raise TpcommError("the GPU backend is closed")
        shape = tuple(shape) if not isinstance(shape, int) else (shape,)
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * dtype.itemsize
        start = _round_up(self._user_next, 256)
        if start + nbytes > self.layout.user:
            raise TpcommError(f"empty{shape} {dtype}: the symmetric user region has "
                              f"{self.layout.user - start} of {self.layout.user} bytes left; "
                              f"create the Communicator with a larger max_bytes")
        self._user_next = start + nbytes
        region = self.buf.local_data()[self.layout.user_off:self.layout.user_off + self.layout.user]
        return region[start:start + nbytes].view(dtype).view(shape)

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the symmetric buffer (after the queued kernels finished). Safe twice."""
        if self._closed:
            return
        self._closed = True
        if self._is_cuda:
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # noqa: BLE001
                pass
        try:
            word = self._read_error(sync=True)
            if word and not self.broken:
                info = k_barrier.decode_error(word)
                what = "found a call mismatch with" if info["mismatch"] else "timed out waiting for"
                self.broken = f"a GPU kernel {what} peer {info['peer']} ({info})"
                log.warning("tpcomm: closing a Communicator whose GPU kernels %s peer %d", what,
                            info["peer"])
        except Exception:  # noqa: BLE001
            pass
        self.buf.close()
        self._err_word = None
        self._err_host_tensor = None
        self._err_host = 0
        self._sites.clear()
        self._plans.clear()


class _Tuning(dict):
    """Tuning values per kernel (``vecs``); setting one drops the cached launch plans."""

    def __init__(self, plans: dict, values: dict):
        super().__init__(values)
        self._plans = plans

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._plans.clear()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _Null()


def _agree_p2p(info: GroupInfo, device: torch.device, timeout_s: float) -> str | None:
    """Every rank's verdict on P2P (same host, peer access), gathered before anything is
    allocated, so that all ranks fall back together instead of some waiting in a rendezvous."""
    from ..memory.cuda_symm import p2p_reason
    mine = p2p_reason(info, device) or ""
    store = GroupStore(info, "cuda_p2p", timeout_s)
    rows = [v.decode().split("\n", 1) for v in
            store.all_gather("verdict", f"{socket.gethostname()}\n{mine}")]
    hosts = sorted({r[0] for r in rows})
    if len(hosts) != 1:
        return f"the group spans several hosts ({hosts}); NVLink P2P needs one"
    for r, (_, why) in enumerate(rows):
        if why:
            return f"rank {r}: {why}"
    return None


def make_cuda_backend(info: GroupInfo, device: torch.device, max_bytes: int,
                      timeout_s: float) -> P2PCollectives:
    """Set up the GPU backend of a Communicator (collective over ``info``'s group)."""
    from ..memory.cuda_symm import TorchSymmetricBuffer
    why = _agree_p2p(info, device, timeout_s)
    if why:
        raise TpcommError(why)
    # where the ranks meet after a call mismatch (made here, in the same order on every rank)
    rendezvous = GroupStore(info, "cuda_recover", timeout_s)
    props = torch.cuda.get_device_properties(device)
    layout = Layout.make(info.world_size, max_bytes, props.multi_processor_count)
    buf = TorchSymmetricBuffer(info, layout.data_bytes, layout.pad_bytes, device, timeout_s,
                               data_fill=0xFF)
    try:
        # data through every peer mapping before anything relies on it (the user region is
        # unused at set-up and restored byte for byte); a failure vetoes the fast path
        from .p2p_check import PROBE_BYTES, last_verdict, verify_p2p
        why = verify_p2p(buf, layout.user_off, info, device, timeout_s,
                         probe_nbytes=min(layout.user, PROBE_BYTES))
        if why:
            raise TpcommError(why)
        backend = P2PCollectives(buf, layout, timeout_s, max_bytes, rendezvous=rendezvous)
        backend.p2p_check = last_verdict()  # ok, source (probe / cache / skipped), reason, s
        return backend
    except BaseException:
        buf.close()
        raise
