"""Communicators of R emulated ranks in ONE process on ONE GPU, for tests of what the
Communicator adds across ranks (CUDA graphs, torch.compile) where a single GPU is all there is.

Each is a real :class:`tpcomm.Communicator` (made on a torch.distributed group of one) whose
engine is replaced by an emulated rank's GPU engine (``tpcomm.cuda.emulated``: R engines over
R buffers of one GPU, reaching each other's memory by address as over NVLink). Every rank has
its own CUDA stream; :meth:`EmulatedRanks.run` launches ``fn(r)`` on rank r's stream for every
r (the R ranks' kernels must run at the same time: they wait for each other), and joins.

Test scaffolding, not API: it sets private attributes of the Communicator. Eager calls must
force a kernel algorithm (``algorithm="one_shot"``): an eager GPU call on "auto" would go to
torch.distributed, which these ranks do not have (their group refuses every use).
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

GRID = 16          # blocks per rank: 4 ranks x 16 blocks stay resident on any recent GPU


class _NoGroup:
    """The torch.distributed group of an emulated rank: there is none."""

    def __getattr__(self, name):
        raise RuntimeError("an emulated rank has no torch.distributed group: force a kernel "
                           "algorithm (algorithm='one_shot') for eager calls")


def init_single_process_group() -> None:
    """A gloo group of one (the Communicator needs torch.distributed initialized)."""
    if dist.is_initialized():
        return
    path = os.path.join(tempfile.mkdtemp(prefix="tpcomm-emul-"), "store")
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)


class EmulatedRanks:
    def __init__(self, world: int, *, max_bytes: int = 8 << 20, timeout_s: float = 10.0,
                 device=None):
        import tpcomm
        from tpcomm.cuda.emulated import make_emulated_group
        from tpcomm.selection.select import Topology
        init_single_process_group()
        self.device = torch.device("cuda", 0) if device is None else torch.device(device)
        self.world = world
        backs, self._tensors = make_emulated_group(world, max_bytes, GRID, device=self.device,
                                                   timeout_s=timeout_s)
        self.comms = []
        for r, back in enumerate(backs):
            c = tpcomm.Communicator(device=self.device, max_bytes=max_bytes, timeout_s=timeout_s)
            c.rank, c.world_size = r, world
            c.group = _NoGroup()
            c._backend = back
            c._topology = Topology(device_type=self.device.type, nnodes=1)
            c._decisions.clear()
            self.comms.append(c)
        self.streams = [torch.cuda.Stream(self.device) for _ in range(world)]

    def run(self, fn) -> None:
        """fn(r) on rank r's stream, for every rank; the current stream waits for all."""
        main = torch.cuda.current_stream(self.device)
        start = torch.cuda.Event()
        start.record(main)
        for r, s in enumerate(self.streams):
            s.wait_event(start)
            with torch.cuda.stream(s):
                fn(r)
        for s in self.streams:
            ev = torch.cuda.Event()
            ev.record(s)
            main.wait_event(ev)

    def check(self) -> None:
        """Wait for the GPU; raise PeerTimeoutError if a rank's kernel gave up waiting."""
        torch.cuda.synchronize(self.device)
        for c in self.comms:
            c._backend.check(sync=True)

    def close(self) -> None:
        for c in self.comms:
            c.close()
