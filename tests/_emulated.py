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

The ranks' kernels spin on each other, and the host launches them one rank after the other, so
nothing may hold up the host between the first rank's launch and the last one's:

- no kernel may be compiled or loaded then (a load may wait for the running kernels, which wait
  for the rank not yet launched: a stall until the timeout). Warm up every kernel at every size
  and algorithm with one call per :meth:`EmulatedRanks.run` (:meth:`EmulatedRanks.warm`) before
  calls that chain several, and run the process with CUDA_MODULE_LOADING=EAGER, set before CUDA
  starts (:func:`module_loading_mode` says what the driver uses; setting it later does nothing);
- host work per rank (torch.compile compiles once per rank's Communicator) must end within the
  timeout: :meth:`EmulatedRanks.patient` lengthens it for such a warm-up, and
  :meth:`EmulatedRanks.eager_auto_as_captured` lets a function on "auto" compile before its
  capture.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile

import torch
import torch.distributed as dist

from tpcomm.cuda.emulated import run_on_streams
from tpcomm.errors import PeerTimeoutError

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


def module_loading_mode() -> str:
    """"EAGER" or "LAZY": how this process's CUDA driver loads kernels (read once, when CUDA
    starts); "unknown (...)" where the driver cannot say."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        mode = ctypes.c_int(0)
        rc = lib.cuModuleGetLoadingMode(ctypes.byref(mode))
    except (OSError, AttributeError) as e:
        return f"unknown ({e})"
    if rc != 0:
        return f"unknown (cuModuleGetLoadingMode error {rc})"
    return {1: "EAGER", 2: "LAZY"}.get(mode.value, f"unknown ({mode.value})")


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
        run_on_streams(self.streams, fn, self.device)

    def warm(self, fn) -> None:
        """``run(fn)`` then :meth:`check`: fn(r) should make ONE call, so that a kernel it
        compiles or loads for the first time does so while no rank's kernel waits."""
        self.run(fn)
        self.check("a warm-up call")

    @contextlib.contextmanager
    def patient(self, timeout_s: float):
        """Kernels launched inside wait up to ``timeout_s`` for their peers (host work per rank
        between the ranks' launches, e.g. torch.compile compiling for each rank)."""
        backs = [c._backend for c in self.comms]
        saved = [(b.timeout_s, b.timeout_ns) for b in backs]
        # a multiple of 16 ns, as the usual timeouts: Triton specializes integer arguments
        # divisible by 16, and a new specialization would compile (and load) a kernel
        ns = int(timeout_s * 1e9) // 16 * 16
        for b in backs:
            b.timeout_s, b.timeout_ns = timeout_s, ns
        try:
            yield
        finally:
            for b, (t, n) in zip(backs, saved):
                b.timeout_s, b.timeout_ns = t, n

    @contextlib.contextmanager
    def eager_auto_as_captured(self):
        """Eager calls on "auto" pick what a captured call would (tpcomm's kernels) instead of
        torch.distributed, which emulated ranks lack. For the eager warm-up call that compiles a
        torch.compile'd function before it is captured, as an engine's warm-up does (with a
        real group that call would go to NCCL); compiling during a capture is refused (dynamo
        reads the CUDA RNG state, which a capture does not allow). The cached decisions are
        dropped on exit."""
        import tpcomm.communicator as communicator
        select = communicator.select_algorithm

        def as_captured(op, nbytes, dtype, world_size, topology, graph=True):
            return select(op, nbytes, dtype, world_size, topology, True)

        communicator.select_algorithm = as_captured
        try:
            yield
        finally:
            communicator.select_algorithm = select
            for c in self.comms:
                c._forget_decisions()

    def check(self, what: str = "") -> None:
        """Wait for the GPU; if a rank's kernel gave up waiting, raise TimeoutError (from the
        rank's PeerTimeoutError) saying what to look at (``what``: the step, for the message)."""
        torch.cuda.synchronize(self.device)
        for c in self.comms:
            try:
                c._backend.check(sync=True)
            except PeerTimeoutError as e:
                raise TimeoutError(
                    f"emulated rank {c.rank} of {self.world} gave up waiting for a peer"
                    f"{' in ' + what if what else ''}: {e}. With emulated ranks this is "
                    f"usually the host holding up a later rank's launch while an earlier rank's "
                    f"kernel spins: a kernel compiled or loaded for the first time (warm every "
                    f"kernel, size and algorithm up with EmulatedRanks.warm; CUDA_MODULE_LOADING "
                    f"is {module_loading_mode()}, EAGER is needed), or host work per rank "
                    f"longer than the timeout (EmulatedRanks.patient)") from e

    def close(self) -> None:
        for c in self.comms:
            c.close()
