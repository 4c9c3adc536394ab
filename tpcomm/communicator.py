"""Communicator: tpcomm's collectives over one torch.distributed process group.

It owns the registered buffers (one symmetric buffer per rank, set up once), validates every
call, makes the call's one :class:`~tpcomm.algorithms.Choice` (algorithm, mechanism, round size,
reason: ``tpcomm.selection.select``, cached per call shape), runs the one chunk loop
(``tpcomm.engine.run_rounds``) for calls larger than an engine round, keeps statistics under
the choice's name, and sends whatever tpcomm cannot do to torch.distributed, logging the first
fallback of each reason once.

Shape letters in the docstrings: R = world size, m = rows per rank.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from time import perf_counter

import torch

from . import flight_recorder, reference
from .algorithms import FUSED_NORM, Choice, choice, split
from .engine import run_rounds
from .errors import (CommunicatorBrokenError, CommunicatorClosedError, MismatchError,
                     PeerDiedError, PeerTimeoutError, TpcommError)
from .flight_recorder import DONE
from .groups.group import GroupInfo, GroupStore, setup_budget
from .selection.select import (FALLBACK_DTYPES, FAST_DTYPES, UNSUPPORTED_DTYPES, Topology,
                               check_algorithm, engine_choice, fallback_reason,
                               select_algorithm)
from .settings import get_settings
from .groups.topology import layout_of
from .multinode.hierarchical import HierarchicalAllReduce as _TwoLevel

# torch.cuda.is_current_stream_capturing() is a Python wrapper of this C function; the GPU hot
# path calls it directly (one call per eager all_reduce). A CPU build of torch has only a dummy.
_capturing = (torch._C._cuda_isCurrentStreamCapturing if torch.version.cuda is not None
              else lambda: torch.cuda.is_current_stream_capturing())

log = logging.getLogger("tpcomm")
_Tensor = torch.Tensor   # the hot path's type check: one global load
_logged_reasons: set[str] = set()
_OP_CODES = {"all_reduce": 1, "reduce_scatter": 2, "all_gather": 3}
_DTYPE_CODES = {d: i for i, d in enumerate(FAST_DTYPES + FALLBACK_DTYPES)}
_SUPPORTED_DTYPES = frozenset(FAST_DTYPES + FALLBACK_DTYPES)
# True only while torch.compile's frontend (dynamo) traces the calling frame: the public
# methods then emit torch.ops.tpcomm.* (one check per eager call, ~0.1 us:
# scripts/host_cost_compile.py). Not torch.compiler.is_compiling(): that is one flag for the
# whole process, set while any thread compiles, and an op running eagerly in another thread
# meanwhile would re-enter its own op.
_is_compiling = torch.compiler.is_dynamo_compiling


def _log_fallback_once(reason: str) -> None:
    if reason in _logged_reasons or get_settings().quiet:
        return
    _logged_reasons.add(reason)
    log.warning("tpcomm: falling back to torch.distributed: %s (logged once; set TPCOMM_QUIET=1 "
                "to silence, see comm.stats()['fallbacks'] for counts)", reason)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _traced_out(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """A traced op's result ``y`` in ``out`` where one was given (as the eager methods write
    it), else ``y`` itself."""
    if out is None or out is y:
        return y
    return out.copy_(y.view(out.shape))


def _traced_local(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """A collective of a world of one under torch.compile: the identity, recorded as a copy
    (or nothing, in place) that the compiler folds into the code around it."""
    if out is None:
        return x.reshape(-1).clone() if x.dim() == 0 else x.clone()
    return out if out is x else out.copy_(x.view(out.shape))


def _refuse_during_capture(what: str, device) -> None:
    """Set-up that allocates or hands out registered memory cannot be recorded in a CUDA
    graph: a capture would bake a one-off allocation into every replay, and a rank whose
    capture is re-recorded would get other offsets than its peers. Raise at once instead of
    hanging in a rendezvous or corrupting a buffer."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda":
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise TpcommError(f"{what} during CUDA graph capture: do it before capturing (buffers "
                          f"are registered once, outside graphs)")


class Communicator:
    """tpcomm's collectives on a torch.distributed group.

    Args:
        group: the ProcessGroup (default: the world group). Every member must create the
            Communicator, in the same order relative to other tpcomm objects on that group.
        device: where the tensors live (default: the current CUDA device for an NCCL group,
            else the CPU).
        max_bytes: upper bound of the registered buffer per rank, i.e. of the input handled
            in one round; larger inputs are processed in chunks (default TPCOMM_MAX_BYTES,
            32 MiB; the CPU backend uses at most 1 MiB rounds, see SHM_CHUNK_BYTES).
        timeout_s: bound on every wait for a peer (default TPCOMM_TIMEOUT_S, 60 s), on tpcomm's
            engines and, for CPU tensors, on the torch.distributed (gloo) fallback too. Past it
            the call raises PeerTimeoutError naming the op, its sequence number, this rank and
            the missing peers, and the Communicator refuses further calls. Set-up (this
            constructor) shares one budget of timeout_s among all its waits: a peer that never
            creates its Communicator is noticed within one timeout_s.

    Use as a context manager, or call ``close()``; both release the shared buffers.
    """

    def __init__(self, group=None, *, device=None, max_bytes: int | None = None,
                 timeout_s: float | None = None):
        settings = get_settings()
        _refuse_during_capture("creating a Communicator", device)
        self._info = GroupInfo.of(group)
        self.group = self._info.group
        self.rank, self.world_size = self._info.rank, self._info.world_size
        self.timeout_s = float(timeout_s if timeout_s is not None else settings.timeout_s)
        self.max_bytes = int(max_bytes if max_bytes is not None else settings.max_bytes)
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if self.max_bytes < 4096:
            raise ValueError(f"max_bytes must be at least 4096, got {max_bytes}")
        self.device = self._pick_device(device)
        self._is_cuda = self.device.type == "cuda"
        self._is_cpu = self.device.type == "cpu"
        self._debug = settings.debug
        self._fused_norm = settings.fused_norm
        # one item while no collective runs: a call takes it (list.pop, atomic) and puts it
        # back; a second thread finds the list empty and is refused (a lock's acquire(False)
        # costs the hot path ~0.12 us more per call, measured on the CPU VM)
        self._free: list = [None]
        self._closed = False
        self._backend = None
        self._broken: str | None = None   # the torch.distributed path failed (timeout, peer gone)
        self._torch_seq = 0               # calls that went to torch.distributed
        self.disabled_reason: str | None = None
        self._stats = collections.defaultdict(lambda: [0, 0, 0.0])  # (op, algo) -> calls, bytes, s
        self._fallbacks: collections.Counter = collections.Counter()
        self._layout = layout_of(self._info)      # from the launch; not collective
        self._topology = Topology(device_type=self.device.type, nnodes=self._layout.nnodes)
        self._two_level = None                    # HierarchicalAllReduce when nnodes > 1
        self._recorder = flight_recorder.FlightRecorder()
        # (op, nbytes, dtype, requested, graph) -> (Choice, stats entry, on the engine, one round)
        self._decisions: dict = {}
        # the all_reduce hot path (_all_reduce_hot): (dtype, numel, requested, graph) -> entry;
        # off under TPCOMM_DEBUG (every call takes the general path and its checks)
        self._fast: dict = {}
        # the entries of _fast whose decision is the same captured or not (a forced algorithm,
        # world 1's copy), by (dtype, numel, requested): their calls skip the capture query
        self._fast_any: dict = {}
        self._hot = not settings.debug
        # the capture query of the hot path: a CPU Communicator never captures (bool() is
        # False, a C call); a CUDA one asks torch's C function
        self._capture = _capturing if self._is_cuda else bool
        # what x.get_device() says of a tensor on this Communicator's device (CPU: -1)
        self._dev_index = self.device.index if self._is_cuda else -1
        # the hot path as a CUDA Communicator's: tensors checked by device index, entries per
        # capture state; else a CPU one's: x.is_cpu (a flag read; get_device() says -1 of a
        # meta tensor too), and every entry serves every call (a CPU call is never captured)
        self._hot_cuda = self._is_cuda
        self._setup(settings)
        flight_recorder.register(self)
        from .ops import library   # torch.ops.tpcomm.*, and this Communicator's handle there
        self.handle: str = library.register(self)

    # ------------------------------------------------------------------ set-up
    def _pick_device(self, device) -> torch.device:
        if device is None:
            if self._info.backend == "nccl" and torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device("cpu")
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"tpcomm supports cpu and cuda devices, got {dev}")
        return dev

    def _setup(self, settings) -> None:
        """Create the backend on every rank, then agree: if any rank failed, all fall back.
        Every rendezvous in here draws on one budget of ``timeout_s`` (``group.setup_budget``)."""
        with setup_budget(self.timeout_s):
            self._setup_in_budget(settings)

    def _setup_in_budget(self, settings) -> None:
        reason = None
        if settings.disable:
            reason = "TPCOMM_DISABLE=1"
        elif self.world_size > 1:
            try:
                self._backend = self._make_backend()
            except Exception as e:  # a fast path that cannot start is a fallback, not a crash
                reason = f"{type(e).__name__}: {e}"
        if self.world_size > 1 and not settings.disable:
            store = GroupStore(self._info, "verdict", self.timeout_s)
            verdicts = store.all_gather("ok", reason or "")
            bad = [(r, v.decode()) for r, v in enumerate(verdicts) if v]
            if bad and reason is None:
                r, why = bad[0]
                reason = f"rank {r} could not start the fast path ({why})"
        if reason is not None:
            self._close_paths()
            self.disabled_reason = reason
            _log_fallback_once(f"Communicator on {self.world_size} ranks: {reason}")

    def _make_backend(self):
        if self._topology.nnodes > 1:
            # never build the flat backend across a node boundary: the two-level all-reduce
            # builds one per node, and everything else goes to torch.distributed
            self._two_level = HierarchicalAllReduce(self.group, device=self.device,
                                                    max_bytes=self.max_bytes,
                                                    timeout_s=self.timeout_s)
            return None
        if self.device.type == "cpu":
            from .cpu.shm_collectives import SHM_CHUNK_BYTES, ShmCollectives, should_use_shm
            from .memory.shm import ShmSymmetricBuffer, shm_available
            why = should_use_shm() or shm_available()
            if why:
                raise TpcommError(why)
            # two slots (double buffering) of at most SHM_CHUNK_BYTES: larger calls go in
            # chunks, which keeps each round's data in the caches
            slot = min(-(-self.max_bytes // 64) * 64, SHM_CHUNK_BYTES)
            buf = ShmSymmetricBuffer(self._info, 2 * slot, self.timeout_s)
            return ShmCollectives(buf, self.timeout_s)
        if get_settings().nccl_p2p_disable:
            raise TpcommError("NCCL_P2P_DISABLE=1: no peer-to-peer access between the GPUs")
        from .cuda.p2p_collectives import make_cuda_backend
        return make_cuda_backend(self._info, self.device, self.max_bytes, self.timeout_s)

    @property
    def backend_name(self) -> str:
        """'shm', 'p2p' (GPU), 'two_level' (a group that spans nodes), 'local' (world 1) or
        'torch' (everything falls back)."""
        if self.world_size == 1:
            return "local"
        if self._two_level is not None:
            return "two_level"
        return self._backend.name if self._backend is not None else "torch"

    # ------------------------------------------------------------------ public ops
    def all_reduce(self, x: torch.Tensor, *, out: torch.Tensor | None = None,
                   algorithm: str = "auto") -> torch.Tensor:
        """Sum of ``x`` over all ranks, in ``out`` (a new tensor if None; may be ``x``).

        algorithm: "auto", "torch", or one of ``tpcomm.algorithms.choices("all_reduce", device)``;
        on the GPU ``"one_shot/push"`` / ``"one_shot/pull"`` force one_shot's mechanism (stats
        name the call so).

        x: any shape, contiguous, float32/float16/bfloat16 (other dtypes go to
        torch.distributed). 16-bit inputs are accumulated in float32; every rank gets bitwise
        the same result.
        """
        if _is_compiling():   # torch.compile: one registered op (tpcomm/ops/library.py)
            return self._traced(torch.ops.tpcomm.all_reduce, x, out, algorithm)
        if self._hot:    # a call decided before: the hot path (issue 16)
            y = self._all_reduce_hot(x, out, algorithm)
            if y is not None:
                return y
        self._check_tensor("all_reduce", x)
        out = self._out("all_reduce", x, out, x.shape)
        return self._run("all_reduce", x, out, algorithm)

    def all_reduce_(self, x: torch.Tensor, *, algorithm: str = "auto") -> torch.Tensor:
        """In-place :meth:`all_reduce`; returns ``x``."""
        if _is_compiling():
            return self.all_reduce(x, out=x, algorithm=algorithm)
        if self._hot:    # a call decided before: the hot path (issue 16)
            y = self._all_reduce_hot(x, x, algorithm)
            if y is not None:
                return y
        self._check_tensor("all_reduce", x)   # the eager path of all_reduce(x, out=x), inline
        return self._run("all_reduce", x, x, algorithm)

    def reduce_scatter(self, x: torch.Tensor, *, out: torch.Tensor | None = None,
                       algorithm: str = "auto") -> torch.Tensor:
        """x: [R*m, ...] -> out: [m, ...], the sum over ranks of x's rows [rank*m, (rank+1)*m)."""
        if _is_compiling():
            return self._traced(torch.ops.tpcomm.reduce_scatter, x, out, algorithm)
        self._check_tensor("reduce_scatter", x)
        if x.dim() == 0 or x.shape[0] % self.world_size:
            raise ValueError(f"reduce_scatter needs dim 0 divisible by the world size "
                             f"{self.world_size}, got shape {tuple(x.shape)}")
        shape = (x.shape[0] // self.world_size, *x.shape[1:])
        out = self._out_apart("reduce_scatter", x, out, shape)
        return self._run("reduce_scatter", x, out, algorithm)

    def all_gather(self, x: torch.Tensor, *, out: torch.Tensor | None = None,
                   algorithm: str = "auto") -> torch.Tensor:
        """x: [m, ...] -> out: [R*m, ...], rank p's x in rows [p*m, (p+1)*m). A 0-d x gives [R]."""
        if _is_compiling():
            return self._traced(torch.ops.tpcomm.all_gather, x, out, algorithm)
        self._check_tensor("all_gather", x)
        shape = (self.world_size * x.shape[0], *x.shape[1:]) if x.dim() else (self.world_size,)
        out = self._out_apart("all_gather", x, out, shape)
        return self._run("all_gather", x, out, algorithm)

    def all_reduce_coalesced(self, tensors: list[torch.Tensor], *,
                             algorithm: str = "auto") -> list[torch.Tensor]:
        """All-reduce several tensors in place with one collective per dtype (pack, reduce
        once, unpack). Cuts the fixed cost per call when a layer produces many small results.
        Returns ``tensors``."""
        if _is_compiling():
            if self.world_size > 1:
                sums = torch.ops.tpcomm.all_reduce_coalesced(list(tensors), self.handle, algorithm)
                for t, s in zip(tensors, sums):
                    t.copy_(s)
            return tensors
        if isinstance(tensors, torch.Tensor) or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("all_reduce_coalesced takes a list of tensors")
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            self._check_tensor("all_reduce_coalesced", t)
            by_dtype.setdefault(t.dtype, []).append(t)
        # the same dtype order on every rank: first appearance in the list
        for dtype, group in by_dtype.items():
            flat = torch.cat([t.reshape(-1) for t in group]) if len(group) > 1 else group[0].reshape(-1)
            self._run("all_reduce", flat, flat, algorithm, op_name="all_reduce_coalesced")
            if len(group) > 1:
                off = 0
                for t in group:
                    n = t.numel()
                    t.copy_(flat[off:off + n].view_as(t))
                    off += n
        return tensors

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor,
                                weight: torch.Tensor, eps: float = 1e-6, *,
                                algorithm: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """The end of a TP sublayer in one op: all-reduce ``x``, add it to ``residual`` (in
        place), RMS-normalize the sum and scale by ``weight``.

        x, residual: [..., H] of one dtype; weight: [H]. ``x`` is reduced in place. Returns
        (normed, residual); see ``tpcomm.reference.add_rms_norm`` for the exact arithmetic.

        Routing: with TPCOMM_FUSED_NORM=1 (experimental, off by default), where the
        all-reduce of x would run on tpcomm's GPU kernels (calls captured in a CUDA graph, or a
        kernel algorithm forced) and H <= 16384, one fused kernel does all three steps
        (``kernels/all_reduce_add_rms_norm.py``; stats name it ``one_shot/push+norm``): x and
        residual come out bitwise equal to the unfused path, normed within one rounding of it.
        Otherwise it is the all-reduce (tpcomm's path) followed by the epilogue as torch ops.

        Under torch.compile: the fused op ``torch.ops.tpcomm.all_reduce_add_rms_norm`` where the
        fused kernel can take the call (TPCOMM_FUSED_NORM=1, GPU engine); otherwise the
        all-reduce op followed by the epilogue as torch ops, which the compiler fuses into the
        code around it (at world 1: the epilogue alone).
        """
        if _is_compiling():
            return self._traced_add_rms_norm(x, residual, weight, eps, algorithm)
        self._check_tensor("all_reduce_add_rms_norm", x)
        for name, t in (("residual", residual), ("weight", weight)):
            if not isinstance(t, torch.Tensor) or t.device != x.device or t.dtype != x.dtype:
                raise ValueError(f"all_reduce_add_rms_norm: {name} must be a {x.dtype} tensor "
                                 f"on {x.device}")
        if residual.shape != x.shape or not residual.is_contiguous():
            raise ValueError(f"all_reduce_add_rms_norm: residual must be contiguous with x's "
                             f"shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if x.dim() == 0 or weight.shape != (x.shape[-1],):
            raise ValueError(f"all_reduce_add_rms_norm: weight must be [{x.shape[-1] if x.dim() else '?'}], "
                             f"got {tuple(weight.shape)}")
        normed = self._run("all_reduce", x, x, algorithm, op_name="all_reduce_add_rms_norm",
                           epilogue=(residual, weight, eps))
        if normed is not None:
            return normed, residual
        return reference.add_rms_norm(x, residual, weight, eps)

    def matmul_reduce_scatter_fused(self, a: torch.Tensor, b: torch.Tensor,
                                    out: torch.Tensor) -> bool:
        """The fused GEMM + reduce-scatter kernel (its epilogue sends each tile to the rank
        that owns its rows, and receives this rank's): a [M, K], b [K, N], out [M/R, N], one
        float dtype. Returns False, doing nothing, where that kernel cannot run (no GPU backend:
        CPU, world 1, fallback; other dtypes): the caller then takes the unfused path
        (``tpcomm.matmul_reduce_scatter`` does, and logs why once). Opt-in through
        ``matmul_reduce_scatter(..., method="fused")`` until it has been measured on several
        GPUs."""
        return self._fused_gemm("matmul_reduce_scatter", a, b, out,
                                out.numel() * out.element_size() * self.world_size)

    def all_gather_matmul_fused(self, a_shard: torch.Tensor, b: torch.Tensor,
                                out: torch.Tensor) -> bool:
        """The fused all-gather + GEMM (each rank pushes its shard; the GEMM's tiles wait for
        the row tiles they read, own shard first): a_shard [m, K], b [K, N], out [R*m, N].
        Returns False, doing nothing, where it cannot run (as
        :meth:`matmul_reduce_scatter_fused`). Opt-in through
        ``all_gather_matmul(..., method="fused")``."""
        return self._fused_gemm("all_gather_matmul", a_shard, b, out,
                                a_shard.numel() * a_shard.element_size() * self.world_size)

    def matmul_all_reduce_fused(self, a: torch.Tensor, b: torch.Tensor,
                                out: torch.Tensor) -> bool:
        """GEMM + all-reduce as the fused GEMM + reduce-scatter and a push all-gather: a
        [M, K], b [K, N], out [M, N]. Returns False, doing nothing, where it cannot run (as
        :meth:`matmul_reduce_scatter_fused`). Opt-in through
        ``matmul_all_reduce(..., method="fused")``."""
        return self._fused_gemm("matmul_all_reduce", a, b, out,
                                out.numel() * out.element_size())

    def _fused_gemm(self, op: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                    nbytes: int) -> bool:
        """Run the engine's fused ``op`` (stats and flight recorder name it ``fused``), or
        record why it cannot and return False."""
        self._check_tensor(op, a)
        engine = self._backend
        if not self._supports(op) or a.dtype not in FAST_DTYPES:
            why = (f"{op}(method='fused') needs the GPU backend and float32/float16/bfloat16; "
                   f"here: backend {self.backend_name}, {a.dtype}")
            _log_fallback_once(why)
            self._fallbacks[why] += 1
            return False
        if self._backend.broken:
            raise CommunicatorBrokenError(f"{op}: Communicator is broken by an earlier error: "
                                          f"{self._backend.broken}")
        if not self._take():
            raise TpcommError(f"{op}: this Communicator is already running a collective in "
                              f"another thread; use one Communicator per thread")
        try:
            self._timed(op, "fused", nbytes, a.dtype, getattr(engine, op), a, b, out)
            return True
        finally:
            self._free.append(None)

    def empty(self, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialized tensor that lives in this rank's symmetric buffer (GPU backend):
        an all_reduce of it reads it where it is, skipping the copy into the buffer (zero-copy).

        Collective by convention: every rank asks for the same shapes and dtypes in the same
        order (the peers find the tensor at the same offset). The tensors live until
        ``close()``; together they hold at most ``max_bytes``. Without such a buffer (CPU,
        fallback, world 1) this is ``torch.empty`` on the Communicator's device.
        """
        if self._closed:
            raise CommunicatorClosedError("empty on a closed Communicator")
        _refuse_during_capture("comm.empty (a buffer in the symmetric memory)", self.device)
        if not self._supports("empty"):
            return torch.empty(shape, dtype=dtype, device=self.device)
        return self._backend.empty(shape, dtype)

    def stats(self) -> dict:
        """Calls, bytes and host seconds per (op, algorithm), and fallbacks per reason.

        On the GPU the seconds are host time of the launches, not GPU time (use the benchmark
        for that).
        """
        ops = {}
        for (op, algo), (calls, nbytes, secs) in sorted(self._stats.items()):
            ops.setdefault(op, {})[algo] = {"calls": calls, "bytes": nbytes, "seconds": secs}
        p2p = self._backend.p2p_check if self._backend is not None else None
        return {"backend": self.backend_name, "world_size": self.world_size, "rank": self.rank,
                "disabled_reason": self.disabled_reason, "ops": ops,
                "fallbacks": dict(self._fallbacks),
                "p2p_check": dataclasses.asdict(p2p) if p2p is not None else None}

    def dump(self) -> str:
        """The flight recorder: the last calls of this Communicator with their state and
        timing, as text (also written to stderr for every Communicator on SIGUSR1)."""
        broken = self._broken or (self._backend.broken if self._backend is not None else None)
        state = "closed" if self._closed else (f"broken: {broken}" if broken else "ok")
        return self._recorder.render(f"rank {self.rank}/{self.world_size}, backend "
                                     f"{self.backend_name}, {state}")

    def close(self) -> None:
        """Release the shared buffers. Safe to call twice; later calls raise."""
        if self._closed:
            return
        self._closed = True
        handle = getattr(self, "handle", None)
        if handle is not None:
            from .ops import library
            library.unregister(handle)
        self._close_paths()

    def _close_paths(self) -> None:
        """Release the fast paths (the flat backend, the two-level all-reduce)."""
        for attr in ("_backend", "_two_level"):
            path = getattr(self, attr)
            if path is not None:
                setattr(self, attr, None)
                path.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        # never free cross-process memory here: at most note that close() was forgotten
        if not getattr(self, "_closed", True) and getattr(self, "_backend", None) is not None:
            log.debug("tpcomm Communicator garbage-collected without close()")

    def __repr__(self):
        return (f"Communicator(rank={self.rank}, world_size={self.world_size}, "
                f"device={self.device}, backend={self.backend_name!r})")

    # ------------------------------------------------------------------ internals
    def _traced_add_rms_norm(self, x, residual, weight, eps, algorithm):
        """What torch.compile records for :meth:`all_reduce_add_rms_norm` (see its docstring)."""
        if self.world_size == 1:
            return reference.add_rms_norm(x, residual, weight, eps)
        if self._fused_norm and self._supports("all_reduce_add_rms_norm"):
            normed = torch.ops.tpcomm.all_reduce_add_rms_norm(x, residual, weight, eps,
                                                               self.handle, algorithm)
            return normed, residual
        x.copy_(torch.ops.tpcomm.all_reduce(x, self.handle, algorithm))
        return reference.add_rms_norm(x, residual, weight, eps)

    def _supports(self, op: str) -> bool:
        """The engine runs ``op`` (:meth:`tpcomm.engine.Engine.supports`); False without one."""
        return self._backend is not None and self._backend.supports(op)

    def _check_tensor(self, op: str, x) -> None:
        if self._closed:
            raise CommunicatorClosedError(f"{op} on a closed Communicator")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op} takes a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _SUPPORTED_DTYPES:
            why = UNSUPPORTED_DTYPES.get(x.dtype)
            raise TypeError(f"{op} does not support dtype {x.dtype}"
                            f"{f' ({why})' if why else ''}; supported: "
                            f"{', '.join(str(d).removeprefix('torch.') for d in FAST_DTYPES)} on "
                            f"tpcomm's engines, "
                            f"{', '.join(str(d).removeprefix('torch.') for d in FALLBACK_DTYPES)}"
                            f" through torch.distributed")
        # x.is_cpu is a flag read; x.device builds a torch.device on every call
        if (not x.is_cpu) if self._is_cpu else (x.device != self.device):
            raise ValueError(f"{op}: tensor is on {x.device} but this Communicator is on {self.device}")
        if not x.is_contiguous():
            raise ValueError(f"{op} needs a contiguous tensor, got shape {tuple(x.shape)} with "
                             f"strides {x.stride()}; call .contiguous() first")

    def _traced(self, op, x: torch.Tensor, out: torch.Tensor | None,
                algorithm: str) -> torch.Tensor:
        """A collective while torch.compile traces it: ``op`` (``torch.ops.tpcomm.<name>``, one
        node of the graph), its result in ``out`` where one was given; at world 1 a copy."""
        if self.world_size == 1:
            return _traced_local(x, out)
        return _traced_out(op(x, self.handle, algorithm), out)

    def _out_apart(self, op: str, x: torch.Tensor, out, shape) -> torch.Tensor:
        """:meth:`_out`, for an op whose output must not overlap its input (reduce_scatter,
        all_gather)."""
        out = self._out(op, x, out, shape)
        if _overlaps(out, x):
            raise ValueError(f"{op}: out must not overlap the input")
        return out

    def _out(self, op: str, x: torch.Tensor, out, shape) -> torch.Tensor:
        if out is x:  # in place: x was checked already
            return out
        shape = torch.Size(shape)
        if out is None:
            return torch.empty(shape, dtype=x.dtype, device=x.device)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{op}: out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"{op}: out must be {tuple(shape)} {x.dtype} on {x.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        if not out.is_contiguous():
            raise ValueError(f"{op}: out must be contiguous, got strides {out.stride()}")
        return out

    def _run(self, op: str, x: torch.Tensor, out: torch.Tensor, algorithm: str,
             op_name: str | None = None, epilogue: tuple | None = None):
        # the hot path of every call: an eager GPU call is bound by host time, so no context
        # manager here and the algorithm decision is cached per (op, size, dtype, graph).
        # ``epilogue`` = (residual, weight, eps): all_reduce_add_rms_norm; then the return value
        # is ``normed`` when the fused kernel ran, else None (the caller adds and normalizes).
        name = op_name or op
        if not self._take():
            raise TpcommError(f"{name}: this Communicator is already running a collective in "
                              f"another thread; use one Communicator per thread")
        try:
            return self._run_locked(op, x, out, algorithm, name, epilogue)
        finally:
            self._free.append(None)

    def _take(self) -> bool:
        """Take the Communicator for one call (``self._free``'s item); False where another
        thread runs a collective on it now."""
        try:
            self._free.pop()
        except IndexError:
            return False
        return True

    def _decide(self, op: str, nbytes: int, dtype: torch.dtype, requested: str, name: str,
                graph: bool) -> Choice:
        """The one Choice of this call (cached by :meth:`_decision`): the algorithm (asked for,
        or ``select_algorithm``), on the engine its mechanism and round size
        (``engine_choice``), for torch.distributed why."""
        check_algorithm(op, requested, self.device.type)
        algorithm, mechanism = split(requested)
        if algorithm == "auto":
            algorithm = select_algorithm(op, nbytes, dtype, self.world_size, self._topology,
                                         graph)
        elif algorithm != "torch" and dtype not in FAST_DTYPES:
            raise ValueError(f"{name}: algorithm={algorithm!r} needs float32/float16/bfloat16, "
                             f"got {dtype}")
        elif algorithm == "two_level" and self._two_level is None:
            raise ValueError(f"{name}: algorithm='two_level' needs a group that spans nodes; "
                             f"this one is on {self._topology.nnodes} node")
        if algorithm == "two_level" and self._two_level is not None:
            return choice(algorithm)
        if self._backend is None and algorithm not in ("local", "torch"):
            algorithm = "torch"
        if algorithm == "local":
            return choice(algorithm)
        if algorithm != "torch":
            return engine_choice(op, algorithm, mechanism, self._round_numel(op, nbytes, dtype),
                                 dtype, self._backend)
        if self._backend is None and self._two_level is None:
            reason = self.disabled_reason or "no fast path"
        elif requested == "torch":
            return choice(algorithm, reason="algorithm='torch' was asked for")  # not logged
        else:
            reason = fallback_reason(op, dtype, self.world_size, self._topology, graph)
        _log_fallback_once(reason)
        return choice(algorithm, reason=reason)

    def _run_locked(self, op, x, out, requested, name, epilogue=None):
        if self._broken:
            raise CommunicatorBrokenError(f"{name}: Communicator is broken by an earlier error: "
                                          f"{self._broken}")
        backend = self._backend
        if backend is not None and backend.broken:
            raise CommunicatorBrokenError(f"{name}: Communicator is broken by an earlier error: "
                                          f"{backend.broken}")
        nbytes = x.nbytes
        if self._debug and self.world_size > 1:
            self._debug_check(name, x)
        graph = self._is_cuda and torch.cuda.is_current_stream_capturing()
        dtype = x.dtype
        decision = self._decisions.get((name, nbytes, dtype, requested, graph))
        if decision is None:
            decision = self._decision(op, nbytes, dtype, requested, name, graph)
        chosen, st, on_backend, one_round = decision
        algorithm = chosen.name
        result = out
        if epilogue is not None:
            result = None
            if self._should_fuse_norm(chosen, x, epilogue):
                algorithm, st = FUSED_NORM, self._stats[(name, FUSED_NORM)]
        rec = self._recorder.start(name, algorithm, nbytes, dtype)
        try:
            if algorithm == FUSED_NORM:
                residual, weight, eps = epilogue
                result = torch.empty_like(x)
                self._backend.all_reduce_add_rms_norm(x, residual, weight, eps, result)
            elif on_backend:
                if one_round and op == "all_reduce":   # one round, inline
                    backend.all_reduce(x, out, algorithm)
                else:
                    run_rounds(backend, op, x, out, algorithm, chosen.chunk, self.world_size)
            else:
                self._dispatch(op, x, out, chosen)
        except BaseException as e:
            self._failed(rec, e)
            raise
        self._recorder.finish(rec)
        st[0] += 1
        st[1] += nbytes
        st[2] += rec[7] - rec[6]   # the recorder's perf_counter readings
        return result

    def _round_numel(self, op: str, nbytes: int, dtype: torch.dtype) -> int:
        """The elements a Choice's chunk counts for a call of ``nbytes``: the input's
        (all_reduce, all_gather), the output's per rank (reduce_scatter)."""
        numel = nbytes // dtype.itemsize
        return numel // self.world_size if op == "reduce_scatter" else numel

    def _decision(self, op, nbytes, dtype, requested, name, graph) -> tuple:
        """(Choice, stats entry, runs on the flat engine, in one round) of a call, cached per
        (name, nbytes, dtype, requested, graph): a repeated call looks up one tuple and
        recomputes nothing (``_decide`` raises for a bad request, which is never cached)."""
        c = self._decide(op, nbytes, dtype, requested, name, graph)
        on_engine = c.algorithm not in ("torch", "two_level", "local")
        decision = (c, self._stats[(name, c.name)], on_engine,
                    on_engine and self._round_numel(op, nbytes, dtype) <= c.chunk)
        if len(self._decisions) > 4096:
            self._decisions.clear()
        self._decisions[(name, nbytes, dtype, requested, graph)] = decision
        return decision

    def _all_reduce_hot(self, x, out, algorithm: str):
        """An all_reduce whose shape was decided before, on either device: one engine round
        (CPU shared memory, GPU kernels, eager or captured), the CPU engine's rounds of a larger
        call (its ``hot_all_reduce`` loops over them) or world 1's copy, with only what a
        call must do: the checks that depend on the tensors (type, device, layout, ``out``),
        the cached decision, the flight record and the stats. Everything else is answered at
        set-up or by the cache entry (the capture query is a C call on CUDA and none on the CPU;
        the decision, its stats row, the byte count and the engine's call for this shape,
        ``hot_all_reduce``, are one dict lookup). Returns None,
        having done nothing, where the general path must take the call: anything unusual (a
        subclass, a fallback, a GPU call of several rounds, a closed or broken Communicator, a
        thread already inside) and the first call of each (dtype, numel, algorithm, capture)
        (the general path decides it, with its checks and messages). TPCOMM_DEBUG=1 keeps
        every call on the general path. Allocates nothing but the flight record (and ``out``
        where none is given).

        Host cost (issue 16, 2026-12-03, 2-core CPU VM): see docs/host_path.md. Each check is
        the cheapest C call that answers it: ``x.is_cpu`` (a flag) on the CPU, not
        ``get_device()`` (which says -1 of a meta tensor too); ``out.shape != x.shape``, not
        ``is_same_size`` (an aten op through the dispatcher); the busy flag is a list's pop,
        not a lock's ``acquire(False)`` (argument parsing: ~0.12 us more per call)."""
        b = self._backend
        if self._broken or self._closed or type(x) is not _Tensor:
            return None   # broken or closed: the general path raises
        if b is None:
            if self.world_size != 1:
                return None   # everything goes to torch.distributed
        elif b.broken:
            return None
        dtype = x.dtype
        k3 = (dtype, x.numel(), algorithm)
        entry = self._fast_any.get(k3)
        if entry is None or entry[4] is not b:   # the capture state decides: ask for it
            key = k3 + (self._capture(),)
            entry = self._fast.get(key)
            if entry is None or (entry and entry[4] is not b):   # new, or for another engine
                entry = self._fast_entry(key)
        if not entry:
            return None
        cuda, idx = self._hot_cuda, self._dev_index
        if not (x.get_device() == idx if cuda else x.is_cpu) or not x.is_contiguous():
            return None
        if out is None:
            out = torch.empty_like(x)
        elif out is not x and (type(out) is not _Tensor or out.dtype is not dtype
                               or not (out.get_device() == idx if cuda else out.is_cpu)
                               or out.shape != x.shape or not out.is_contiguous()):
            return None
        free = self._free
        try:
            free.pop()       # atomic: a thread already inside has taken the one item
        except IndexError:
            return None
        try:
            algo, nbytes, st, go, _ = entry
            rec = self._recorder.start("all_reduce", algo, nbytes, dtype)
            try:
                if go is not None:    # the engine's call for this shape (hot_all_reduce)
                    go(x, out)
                elif algo == "local":   # world 1: the sum is x itself
                    if out is not x:
                        out.copy_(x)
                else:
                    b.all_reduce(x, out, algo)
            except BaseException as e:
                self._failed(rec, e)
                raise
            # the books of a finished call (what _done does), inline: a frame less per call
            rec[7] = end = perf_counter()
            rec[5] = DONE
            st[0] += 1
            st[1] += nbytes
            st[2] += end - rec[6]
        finally:
            free.append(None)
        return out

    def _fast_entry(self, key: tuple):
        """(algorithm, nbytes, stats, the engine's call or None, the engine it was made for)
        of the hot path for ``key``,
        from the decision the general path cached; False where the call is not on the engine in
        one round or in rounds that the engine's call loops over (stored too); None before the
        general path decided such a call. The engine's call is its
        ``hot_all_reduce(algorithm, dtype, numel)`` (the GPU engine: plan and call hash
        answered once per shape, one round only; the CPU engine: any number of rounds) where it
        has one, else None (``all_reduce`` per call, one round). The key
        holds everything the entry depends on (dtype, numel, requested algorithm, capture
        state); the engine's call re-reads what may change between calls (stream, device,
        error word, a dropped plan)."""
        dtype, numel, requested, graph = key
        nbytes = numel * dtype.itemsize
        decision = self._decisions.get(("all_reduce", nbytes, dtype, requested, graph))
        if decision is None:
            return None
        algo = decision[0].name
        if algo == "local":   # world 1 (no engine): one copy, or nothing in place
            ok = dtype in FAST_DTYPES and nbytes > 0
        else:   # on the flat engine
            ok = decision[2] and dtype in FAST_DTYPES and self._backend is not None and nbytes > 0
        st = self._stats.get(("all_reduce", algo))
        if ok and st is None:
            return None     # the general path has not completed such a call yet
        go = None
        if ok and algo != "local":
            hot = getattr(self._backend, "hot_all_reduce", None)
            go = hot(algo, dtype, numel) if hot is not None else None
            # several rounds: only where the engine's call loops over them itself (the CPU
            # engine's); else the general path's run_rounds
            ok = decision[3] or go is not None
        if len(self._fast) > 4096:
            self._fast.clear()
            self._fast_any.clear()
        entry = (algo, nbytes, st, go, self._backend) if ok else False
        self._fast[key] = entry
        if entry and (not self._hot_cuda or    # a CPU Communicator never captures
                      self._same_captured_or_not(decision, nbytes, dtype, requested, graph)):
            self._fast_any[(dtype, numel, requested)] = entry
        return entry

    def _same_captured_or_not(self, decision: tuple, nbytes: int, dtype, requested: str,
                              graph: bool) -> bool:
        """The all_reduce of this shape makes the same Choice whether captured or not: a forced
        algorithm (only "auto" selects by the capture state; a fallback to torch, which would
        name it in its reason, is never a hot entry) or world 1 (its copy). Checked by making
        the other state's Choice (without caching or logging it: neither path logs)."""
        if split(requested)[0] == "auto" and self.world_size != 1:
            return False
        try:
            other = self._decide("all_reduce", nbytes, dtype, requested, "all_reduce", not graph)
        except (ValueError, TpcommError):
            return False
        return other == decision[0]

    def _forget_decisions(self) -> None:
        """Drop every cached decision and hot-path entry (they are made again on use)."""
        self._decisions.clear()
        self._fast.clear()
        self._fast_any.clear()

    def _failed(self, rec: list, e: BaseException) -> None:
        """A call that raised: its flight record ends with the error; where the error broke the
        Communicator, the error and the flight recorder's dump go to the log."""
        self._recorder.finish(rec, e)
        if self._broken or (self._backend is not None and self._backend.broken):
            log.error("%s\n%s", e, self.dump())

    def _done(self, rec: list, st: list, nbytes: int) -> None:
        """A call that returned: its flight record ends, its stats entry counts it (seconds
        from the recorder's perf_counter readings). :meth:`_run_locked` does the same inline
        (the CPU hot path)."""
        self._recorder.finish(rec)
        st[0] += 1
        st[1] += nbytes
        st[2] += rec[7] - rec[6]

    def _timed(self, name: str, algorithm: str, nbytes: int, dtype, fn, *args) -> None:
        """Run ``fn(*args)`` with the flight recorder and stats bookkeeping of one call (what
        :meth:`_run_locked` does inline: going through this helper costs the collectives'
        hot path about 0.2 us per call, measured on the CPU machine)."""
        rec = self._recorder.start(name, algorithm, nbytes, dtype)
        try:
            fn(*args)
        except BaseException as e:
            self._failed(rec, e)
            raise
        self._done(rec, self._stats[(name, algorithm)], nbytes)

    def _should_fuse_norm(self, chosen: Choice, x: torch.Tensor, epilogue: tuple) -> bool:
        """The fused all-reduce + add + RMSNorm kernel takes the call: the all-reduce would
        run on the GPU kernels, x is float16/bfloat16/float32 and a row fits one block."""
        if (not self._fused_norm or chosen.algorithm in ("torch", "two_level", "local")
                or not self._supports("all_reduce_add_rms_norm")
                or x.dim() == 0):
            return False
        if not epilogue[1].is_contiguous():
            return False
        return x.shape[-1] <= self._backend.fused_norm_max_hidden()

    def _dispatch(self, op, x, out, chosen: Choice) -> None:
        """A call that no flat engine runs: torch.distributed, the two-level all-reduce, or
        world 1's copy."""
        algorithm = chosen.algorithm
        if algorithm == "torch":
            self._fallbacks[chosen.reason] += 1
            self._torch_call(op, x, out)
        elif algorithm == "two_level":
            self._two_level.all_reduce(x, out=out)
        elif out.data_ptr() != x.data_ptr():   # local
            out.copy_(x.view(out.shape))

    def _torch_call(self, op: str, x: torch.Tensor, out: torch.Tensor,
                    name: str | None = None) -> None:
        """``reference.<op>`` on the group. CPU tensors (gloo): every wait bounded by
        ``timeout_s``; past it PeerTimeoutError and the Communicator is broken (the group has a
        collective in flight that the peers never matched). CUDA tensors (NCCL) are left to
        the stream and the process group's own timeout: a bounded wait would block the host
        on every fallback call and cannot be captured in a CUDA graph."""
        self._torch_seq += 1
        bound = None if self._is_cuda else self.timeout_s
        try:
            getattr(reference, op)(x, out, self.group, timeout_s=bound)
        except TimeoutError as e:
            err = PeerTimeoutError(name or op, self._torch_seq, self.rank, self._others(),
                                   self.timeout_s, f"torch.distributed {self._info.backend}: {e}",
                                   "torch", x.numel() * x.element_size())
            self._broken = str(err)
            raise err from e
        except RuntimeError as e:
            if bound is None or isinstance(e, TpcommError):
                raise
            err = PeerDiedError(name or op, self._torch_seq, self.rank, self._others(),
                                self.timeout_s, f"torch.distributed {self._info.backend} failed: "
                                f"{str(e).splitlines()[0][:200]}", "torch",
                                x.numel() * x.element_size())
            self._broken = str(err)
            raise err from e

    def _others(self) -> list[int]:
        """The peers a torch.distributed wait may be missing (gloo does not say which)."""
        return [r for r in range(self.world_size) if r != self.rank]

    def _debug_check(self, name: str, x: torch.Tensor) -> None:
        """TPCOMM_DEBUG=1: every rank called the same op with the same numel and dtype."""
        mine = torch.tensor([_OP_CODES.get(name, 4), x.numel(), _DTYPE_CODES[x.dtype]],
                            dtype=torch.int64, device=self.device)
        every = torch.empty(self.world_size * 3, dtype=torch.int64, device=self.device)
        self._torch_call("all_gather", mine, every, f"{name} (TPCOMM_DEBUG check)")
        rows = every.view(self.world_size, 3).tolist()
        for r, row in enumerate(rows):
            if row != rows[self.rank]:
                raise MismatchError(f"tpcomm {name} (TPCOMM_DEBUG check): rank {self.rank} "
                                    f"has {x.numel()} elements of {x.dtype} but rank {r} "
                                    f"called {'the same op' if row[0] == rows[self.rank][0] else 'another op'} "
                                    f"with {row[1]} elements (dtype code {row[2]}); every rank "
                                    f"must call the same collective with the same size and dtype")


class HierarchicalAllReduce(_TwoLevel):
    """The two-level all-reduce for groups that span nodes
    (:class:`tpcomm.multinode.hierarchical.HierarchicalAllReduce`), with a :class:`Communicator`
    inside each node; the same arguments but ``intra_factory``."""

    def __init__(self, group=None, **kwargs):
        super().__init__(group, intra_factory=Communicator, **kwargs)
