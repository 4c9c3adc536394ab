"""Several ranks' symmetric buffers in ONE process on ONE device: emulated ranks.

What the GPU backend needs from a buffer (``rank``, ``world_size``, ``device``, ``buffer_ptrs``,
``signal_pad_ptrs``, ``signal_pad(peer)``, ``local_data()``), over plain tensors of one device
instead of memory mapped from other processes. Each emulated rank gets its own
:class:`~tpcomm.cuda.p2p_collectives.P2PCollectives` over such a buffer, and the kernels reach the other
ranks' buffers through raw addresses exactly as they reach peers through NVLink.

Used by the protocol tests under Triton's CPU interpreter (ranks are threads over CPU tensors,
``tests/unit/gpu_protocol_sim.py``) and, with :class:`StreamRanks` (ranks are CUDA streams of
one GPU: the kernels compiled for the GPU, its memory model between the SMs of one chip,
CUDA-graph replays; not NVLink, not separate processes, and no timing claim), by
``scripts/gpu_emulated_ranks.py``, ``scripts/gpu_host_path.py`` and ``tests/_emulated.py``.

Recovery after a call mismatch: each rank meets its peers twice (``P2PCollectives._recover``).
Separate processes meet through the group's store; emulated ranks meet in a
:class:`ThreadRendezvous`, each rank from its own thread: one thread cannot stand for several
ranks at a blocking meeting, so a harness that drives every rank from one thread lets each rank
notice the mismatch in a thread of its own (:func:`check_ranks`).
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from ..errors import TpcommError

PAD_ALIGN = 4096


class EmulatedBuffer:
    """Rank ``rank``'s view of ``tensors`` (one uint8 tensor per rank: pad, then data)."""

    def __init__(self, rank: int, tensors: list[torch.Tensor], pad_nbytes: int):
        self.rank, self.world_size = rank, len(tensors)
        self.device = tensors[0].device
        self.signal_pad_nbytes = pad_nbytes
        self._t = tensors
        self.signal_pad_ptrs = [t.data_ptr() for t in tensors]
        self.buffer_ptrs = [p + pad_nbytes for p in self.signal_pad_ptrs]

    def signal_pad(self, peer: int) -> torch.Tensor:
        return self._t[peer][: self.signal_pad_nbytes].view(torch.int64)

    def local_data(self) -> torch.Tensor:
        return self._t[self.rank][self.signal_pad_nbytes:]

    def close(self) -> None:
        pass


class ThreadRendezvous:
    """Where ``world`` emulated ranks of one process meet (``all_gather`` of one value per
    rank, each rank from its own thread, bounded by ``timeout_s``); :meth:`for_rank` is what
    a rank's engine holds (the interface of ``groups.group.GroupStore.all_gather``)."""

    def __init__(self, world: int, timeout_s: float):
        self.world, self.timeout_s = world, timeout_s
        self._cond = threading.Condition()
        self._posted: dict[str, dict[int, bytes]] = {}

    def for_rank(self, rank: int) -> "_RankRendezvous":
        return _RankRendezvous(self, rank)

    def all_gather(self, rank: int, name: str, value: bytes | str) -> list[bytes]:
        with self._cond:
            rows = self._posted.setdefault(name, {})
            rows[rank] = value.encode() if isinstance(value, str) else bytes(value)
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: len(rows) == self.world, self.timeout_s):
                missing = [r for r in range(self.world) if r not in rows]
                raise TpcommError(f"emulated rank {rank}: ranks {missing} did not meet at "
                                  f"{name!r} within {self.timeout_s:g} s (each emulated rank "
                                  f"meets from its own thread: emulated.check_ranks)")
            return [rows[r] for r in range(self.world)]


class _RankRendezvous:
    def __init__(self, meeting: ThreadRendezvous, rank: int):
        self._meeting, self._rank = meeting, rank

    def all_gather(self, name: str, value: bytes | str) -> list[bytes]:
        return self._meeting.all_gather(self._rank, name, value)


def check_ranks(backs, timeout_s: float = 60.0) -> list:
    """Every rank's ``check(sync=True)``, each in a thread of its own (so that ranks recovering
    from a mismatch can meet); returns what each raised, None where nothing."""
    errors: list = [None] * len(backs)

    def one(r):
        try:
            backs[r].check(sync=True)
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            errors[r] = e
    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in range(len(backs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        if t.is_alive():
            raise TimeoutError(f"check_ranks: a rank's check() ran past {timeout_s:g} s")
    return errors


def make_emulated_group(world: int, max_bytes: int, grid: int, *, device="cpu",
                        timeout_s: float = 20.0, num_warps: int | None = None):
    """``world`` GPU backends over emulated buffers on ``device``; returns (backends, tensors).

    ``grid``: blocks of every kernel (keep ``world * grid`` small enough for all ranks' blocks
    to be resident at once on a GPU: the kernels wait for each other)."""
    from .p2p_collectives import NUM_WARPS, Layout, P2PCollectives
    layout = Layout.make(world, max_bytes, grid)
    pad = -(-layout.pad_bytes // PAD_ALIGN) * PAD_ALIGN
    tensors = []
    for _ in range(world):
        t = torch.empty(pad + layout.data_bytes, dtype=torch.uint8, device=device)
        t[:pad].zero_()
        t[pad:].fill_(0xFF)
        tensors.append(t)
    warps = num_warps if num_warps is not None else NUM_WARPS
    meeting = ThreadRendezvous(world, timeout_s)
    backs = [P2PCollectives(EmulatedBuffer(r, tensors, pad), layout, timeout_s, max_bytes,
                            num_warps=warps, rendezvous=meeting.for_rank(r))
             for r in range(world)]
    return backs, tensors


def run_on_streams(streams: list, fn: Callable[[int], object], device) -> None:
    """``fn(r)`` on ``streams[r]`` for every rank r, then ``device``'s current stream waits for
    all of them.

    The ranks' kernels wait for each other, so they must run at the same time: every stream
    starts after the work queued so far on the current stream (one event), rank r's calls are
    queued on its own stream, and the current stream joins them (one event each). Inside a CUDA
    graph capture the fork and join become the graph's edges, so a replay runs the ranks
    concurrently too."""
    main = torch.cuda.current_stream(device)
    start = torch.cuda.Event()
    start.record(main)
    for r, s in enumerate(streams):
        s.wait_event(start)
        with torch.cuda.stream(s):
            fn(r)
    for s in streams:
        ev = torch.cuda.Event()
        ev.record(s)
        main.wait_event(ev)


class StreamRanks:
    """``world`` emulated ranks on one GPU: the GPU engines of :func:`make_emulated_group`
    (``backs``, over ``tensors``) and one CUDA stream each; :meth:`run` fans a call out to every
    rank's stream (:func:`run_on_streams`), :meth:`check` waits and raises a rank's error."""

    def __init__(self, world: int, max_bytes: int, grid: int, *, device,
                 timeout_s: float = 20.0):
        self.world, self.device = world, torch.device(device)
        self.backs, self.tensors = make_emulated_group(world, max_bytes, grid,
                                                       device=self.device, timeout_s=timeout_s)
        self.streams = [torch.cuda.Stream(self.device) for _ in range(world)]

    def run(self, fn: Callable[[int], object]) -> None:
        """fn(r) on rank r's stream, for every rank; the current stream waits for all."""
        run_on_streams(self.streams, fn, self.device)

    def check(self) -> None:
        """Wait for the GPU, then raise the first rank's recorded error (PeerTimeoutError, ...;
        every rank checks in a thread of its own, so that ranks recovering from a mismatch can
        meet: :func:`check_ranks`)."""
        torch.cuda.synchronize(self.device)
        for e in check_ranks(self.backs):
            if e is not None:
                raise e
